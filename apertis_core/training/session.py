"""Everything one training process works with, built fresh or restored exactly from a checkpoint.

`open_session` reads the data, gets the tokenizer (given, trained, or the checkpoint's), builds the model,
optimizer, loss scaler, schedule and batch loaders, and on resume restores all of their state plus the RNGs;
`capture_state` is its inverse, the dict a checkpoint stores.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..bundle import load_weights, read_model_config
from ..configio import ConfigError
from ..data import BatchLoader, TokenDataset, build_datasets, corpus_texts, load_dataset
from ..model import ApertisModel, ModelConfig
from ..tokenizer import Tokenizer
from .build import fresh_model_config, image_cache, start_model
from .checkpoint import SHARDS_DIR, latest_checkpoint, load_trainer_state, resolve_checkpoint
from .config import RunConfig
from .distributed import DistContext, wrap_model
from .fsdp import load_shards
from .measure import measure_step_seconds
from .optim import build_optimizer
from .planning import budget_steps
from .precision import Precision, resolve_precision
from .schedule import LRSchedule, build_schedule, extend_schedule

STATE_VERSION = 1  # layout of trainer_state.pt


@dataclass
class Session:
    ctx: DistContext  # rank, world size, device
    precision: Precision  # autocast format
    tokenizer: Tokenizer
    model: ApertisModel  # the plain module: saving, sampling, evaluation, accounting
    train_model: nn.Module  # what training steps call: the model compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: LRSchedule
    train_data: TokenDataset
    val_data: TokenDataset
    loader: BatchLoader  # endless, seeded training stream (its position is part of the checkpoint)
    images: Any  # vision.ImageCache turning a batch's image files into tensors; None for text-only models
    data_summary: dict[str, Any]  # for the model card
    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # input tokens consumed by all processes
    best_val_loss: float | None = None
    start_step: int = 0  # step this process started from (resumed runs start > 0)

    def val_loader(self) -> BatchLoader:
        """A fresh loader over the validation set: every evaluation sees the same batches."""
        cfg_batch = self.loader.batch_size
        return BatchLoader(self.val_data, cfg_batch, seed=0, rank=self.ctx.rank, world_size=self.ctx.world_size)


def open_session(
    run: RunConfig, ctx: DistContext, started: float, resume_from: str | None, extra_steps: int
) -> Session:
    """Build (or restore) a session; `started` is when train() began, for the time budget."""
    cfg = run.train
    checkpoint = resolve_checkpoint(resume_from) if resume_from else None
    if checkpoint is None and latest_checkpoint(run.out_dir) is not None:
        raise ConfigError(f"{run.out_dir} already holds checkpoints of another run; resume it or choose a new out_dir")
    records, report = load_dataset(run.data.path)
    base = start_model(run, checkpoint)  # None when a resumed run's weights are all in its checkpoint
    tokenizer = base[1] if base else _tokenizer(run, ctx, records, checkpoint)
    if checkpoint and not base:
        model_config = read_model_config(checkpoint / "config.json")
    else:
        model_config = base[0].config if base else fresh_model_config(run.model, tokenizer)
    _check_images(report.stats["images"], model_config)
    holds = model_config.cross_attn_pos or model_config.image_distance_bias or model_config.cross_attn_relative_heads
    if cfg.places_frozen_steps and not holds:
        raise ConfigError(
            "train.places_frozen_steps holds the cross-attention place maps, the ViT's distance curves and the "
            "relative heads' place weights, which this model does not have: set model.cross_attn_pos=true (or "
            "model.image_distance_bias=true, or model.cross_attn_relative_heads above 0), or "
            "train.places_frozen_steps=0"
        )
    images = image_cache(model_config, run.data.image_augment)
    image_tokens = images.file_tokens if images else None
    train_data, val_data = build_datasets(records, tokenizer, run.data, image_tokens)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    # Under FSDP the model stays on the CPU until sharded: each rank then moves only its part to the device.
    model = (base[0] if base else ApertisModel(model_config)).to("cpu" if ctx.sharded else ctx.device)
    if checkpoint and not base:
        load_weights(checkpoint / "model.safetensors", model)
    elif not base and model.vision is not None and model_config.image_pretrained:
        model.vision.load_pretrained_backbone()  # from the local torch hub cache only; warns when absent
    precision = resolve_precision(cfg.precision, ctx.device)
    session = Session(
        ctx=ctx,
        precision=precision,
        tokenizer=tokenizer,
        model=model,
        train_model=wrap_model(model, ctx, cfg.compile, precision),
        # after train_model: FSDP has replaced the parameters by their shards
        optimizer=build_optimizer(
            model,
            cfg.lr,
            cfg.weight_decay,
            cfg.betas,
            ctx.device,
            cfg.encoder_lr_scale,
            separate_encoder=cfg.encoder_frozen_steps > 0,
            separate_places=cfg.places_frozen_steps > 0,
        ),
        scaler=precision.grad_scaler(),
        schedule=build_schedule(
            cfg.schedule, cfg.lr, cfg.min_lr_ratio, cfg.warmup_steps, cfg.max_steps, cfg.decay_fraction
        ),
        train_data=train_data,
        val_data=val_data,
        loader=BatchLoader(train_data, cfg.batch_size, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size),
        images=images,
        data_summary={
            "path": run.data.path,
            **{k: report.stats[k] for k in ("records", "characters", "images")},
            "skipped": report.skipped,  # records the reader left out (see `apertis data validate`)
            "tokens": train_data.tokens,
        },
    )
    if checkpoint:
        restore_state(session, load_trainer_state(checkpoint), checkpoint)
        if extra_steps > 0:
            session.schedule = extend_schedule(
                session.schedule, session.step, extra_steps, cfg.lr * cfg.rewarm_fraction
            )
    else:
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout differs per rank; initial weights did not
        if cfg.max_minutes > 0:
            session.schedule = session.schedule.with_total(_budget_total(run, session, started))
    return session


def _tokenizer(run: RunConfig, ctx: DistContext, records: list, checkpoint: Path | None) -> Tokenizer:
    if checkpoint:
        return Tokenizer.load(checkpoint / "tokenizer.json")
    if run.data.tokenizer:
        return Tokenizer.load(run.data.tokenizer)
    path = Path(run.out_dir) / "tokenizer.json"
    if ctx.is_main:  # one process trains it; the others read the same file, so every rank agrees
        Tokenizer.train(corpus_texts(records), run.data.vocab_size).save(path)
    ctx.barrier()
    return Tokenizer.load(path)


def _check_images(n_images: int, model_config: ModelConfig) -> None:
    if n_images and model_config.image_encoder == "none":
        raise ConfigError(
            f"the dataset has {n_images} images but the model has no image encoder; set model.image_encoder "
            "(for example --set model.image_encoder=vit), or train on text-only data"
        )


def _budget_total(run: RunConfig, session: Session, started: float) -> int:
    """Steps that fit in max_minutes, from a measured warm-up; rank 0 decides so all ranks agree."""
    step_s = measure_step_seconds(
        session.model.config, run.train, run.data.seq_len, session.ctx.device, session.precision
    )
    left = run.train.max_minutes * 60 - (time.perf_counter() - started)
    return int(session.ctx.broadcast(budget_steps(run.train, step_s, left)))


# ---- checkpoint state ---------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def capture_state(session: Session) -> dict[str, Any]:
    """What an exact resume needs besides the weights. Collective: every rank must call it."""
    rng = _rng_state(session.ctx.device)
    if session.ctx.enabled:
        import torch.distributed as dist

        ranks: list[Any] = [None] * session.ctx.world_size
        dist.all_gather_object(ranks, rng)  # dropout streams differ per rank; keep each one
    else:
        ranks = [rng]
    return {
        "version": STATE_VERSION,
        "step": session.step,
        "tokens_seen": session.tokens_seen,
        "best_val_loss": session.best_val_loss,
        "schedule": session.schedule.to_dict(),
        "optimizer": None if session.ctx.sharded else session.optimizer.state_dict(),  # FSDP: in shards/
        "sharded": session.ctx.sharded,
        "scaler": session.scaler.state_dict(),
        "loader": session.loader.state_dict(),  # one global position, valid for every rank
        "rng": ranks,
        "world_size": session.ctx.world_size,
    }


def restore_state(session: Session, state: dict[str, Any], source: Path) -> None:
    if state.get("version") != STATE_VERSION:
        raise ConfigError(
            f"{source}: trainer state version {state.get('version')!r} is not {STATE_VERSION}; it cannot be resumed"
        )
    if state["world_size"] != session.ctx.world_size:
        raise ConfigError(
            f"{source} was written by {state['world_size']} training processes; resume with the same number "
            f"(torchrun --nproc_per_node {state['world_size']}) for an exact continuation"
        )
    if state.get("sharded", False) != session.ctx.sharded:
        written, wanted = ("fsdp", "ddp") if state.get("sharded") else ("ddp", "fsdp")
        raise ConfigError(
            f"{source} was written with train.parallel={written}; resume it with --set train.parallel={written} "
            f"(this run has {wanted})"
        )
    session.step = session.start_step = state["step"]
    session.tokens_seen = state["tokens_seen"]
    session.best_val_loss = state["best_val_loss"]
    session.schedule = LRSchedule.from_dict(state["schedule"])
    if session.ctx.sharded:
        load_shards(session, source / SHARDS_DIR)
    else:
        session.optimizer.load_state_dict(state["optimizer"])
    session.scaler.load_state_dict(state["scaler"])
    session.loader.load_state_dict(state["loader"])
    rng = state["rng"][session.ctx.rank]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and session.ctx.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], session.ctx.device)
