"""The training loop: steps with gradient accumulation, evaluation, samples, checkpoints, stop requests.

`train()` is the one entry point, alone or under `torchrun` (see distributed.py). It reports only through
callbacks (a JSONL metrics file is always written) and stops cooperatively: a file named STOP in the run
directory, or a callback's `state.request_stop()`, ends the run after the current step with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..bundle import save_bundle
from ..filenames import FINAL_DIR, STOP_FILE
from ..generation import GenerationConfig, generate
from .callbacks import TENSORBOARD_DIR, Callback, CallbackList, JsonlLogger, TensorBoardLogger, TrainState
from .checkpoint import (
    checkpoint_dir,
    mark_best_if_better,
    prune_checkpoints,
    remove_unfinished_writes,
    save_checkpoint,
)
from .config import RunConfig
from .curriculum import cut_batch, length_at
from .distributed import gradient_sync, init_distributed, shutdown_distributed
from .fsdp import full_model, unsharded, write_shards
from .hardware import peak_flops, pick_device
from .measure import train_threads
from .optim import set_learning_rate
from .planning import budget_steps
from .session import Session, capture_state, open_session

IGNORE_INDEX = -100


@dataclass
class TrainResult:
    out_dir: str  # the run directory
    steps: int  # optimizer steps completed
    final_train_loss: float | None  # mean loss over the last logging window
    final_val_loss: float | None  # validation loss at the end (None without a validation set, or if stopped)
    best_val_loss: float | None  # lowest validation loss of the run
    bundle_dir: str | None  # the final bundle (None when the run was stopped before its end)
    stopped: bool  # True when a stop request ended the run early


def train(
    run_config: RunConfig, callbacks: Sequence[Callback] = (), resume_from: str | None = None, extra_steps: int = 0
) -> TrainResult:
    """Train (or resume, or extend by `extra_steps`) the run described by `run_config`."""
    started = time.perf_counter()
    with train_threads(run_config.train):  # the same helper times a plan's steps, so plans use these threads
        ctx = init_distributed(pick_device(run_config.train.device), run_config.train.parallel)
        try:
            board = []  # built before the session so a missing tensorboard package fails fast
            if run_config.train.tensorboard and ctx.is_main:
                board = [TensorBoardLogger(Path(run_config.out_dir) / TENSORBOARD_DIR)]
            session = open_session(run_config, ctx, started, resume_from, extra_steps)
            metrics = JsonlLogger(Path(run_config.out_dir) / "metrics.jsonl")
            sinks = CallbackList([metrics, *board, *callbacks]) if ctx.is_main else Callback()  # rank 0 reports
            try:
                return _Loop(run_config, session, sinks, started).run()
            finally:
                sinks.close()
        finally:
            shutdown_distributed(ctx)


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in fp32 over the positions that take a loss; callers divide by the global count."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


# The matmul peak is measured again at evaluations this far apart (a measurement takes a fraction of a
# second; runs that evaluate every few steps must not spend their time on it).
PEAK_REMEASURE_SECONDS = 60.0


class _Loop:
    def __init__(self, run: RunConfig, session: Session, sinks: Callback, started: float):
        self.run_config, self.cfg, self.session, self.sinks = run, run.train, session, sinks
        self.out = Path(run.out_dir)
        self.started = started
        self.state = TrainState(
            step=session.step,
            total_steps=session.schedule.total_steps,
            out_dir=str(self.out),
            tokens_seen=session.tokens_seen,
            best_val_loss=session.best_val_loss,
        )
        self.flops_per_token = session.model.flops_per_token(run.data.seq_len)
        self.peak = peak_flops(session.ctx.device, session.precision.dtype)
        self.peak_measured = time.perf_counter()
        self.window = self._new_window()
        self.step_width = run.data.seq_len  # the width of the latest training batch (train/seq_len)
        self.loop_started = self.window["time"]
        self.lr = session.schedule.lr_at(session.step)  # the latest step's rate and gradient norm, for logs
        self.grad_norm = torch.zeros(())
        self.train_loss: float | None = None
        self.val_loss: float | None = None
        self.val_step = -1  # step of the last evaluation
        # A time budget is re-planned every tenth of the run until the last fifth, from the recent step times
        # (which include torch.compile, evaluations, data loading and, on a shared machine, other programs'
        # load that the warm-up did not see), so the schedule still ends on time when the pace changes.
        self.replan_every = (
            max(10, session.schedule.total_steps // 10) if self.cfg.max_minutes > 0 and session.start_step == 0 else 0
        )

    def _new_window(self) -> dict:
        return {"time": time.perf_counter(), "step": self.session.step, "loss": 0.0, "targets": 0.0, "tokens": 0}

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self._write_run_files()
        self.sinks.on_train_start(self.state)
        stopped = False
        self.loop_started = time.perf_counter()
        self.pace_mark = (self.loop_started, self.session.step)  # where the pace of the next re-plan is measured from
        self.window = self._new_window()  # throughput counts training time only, not the setup above
        while self.session.step < self.session.schedule.total_steps:
            if self._stop_requested():  # also before the first step: a Stop pressed during the setup counts
                stopped = True
                break
            self._train_step()
            self._after_step()
        bundle = self._stop() if stopped else self._finish()
        self.sinks.on_train_end(self.state)
        final_val = None if stopped else self.val_loss
        return TrainResult(
            str(self.out), self.session.step, self.train_loss, final_val, self.session.best_val_loss, bundle, stopped
        )

    def _write_run_files(self) -> None:
        session = self.session
        if session.ctx.is_main:
            remove_unfinished_writes(self.out)  # what a process killed mid-write left
            resolved = dataclasses.replace(self.run_config, model=session.model.config)  # vocab_size from the tokenizer
            resolved.save(self.out / "run.yaml")
            session.tokenizer.save(self.out / "tokenizer.json")

    def _train_step(self) -> None:
        session, ctx = self.session, self.session.ctx
        lr = session.schedule.lr_at(session.step)
        set_learning_rate(
            session.optimizer,
            lr,
            encoder_frozen=session.step < self.cfg.encoder_frozen_steps,
            places_frozen=session.step < self.cfg.places_frozen_steps,
        )
        batches = [next(session.loader) for _ in range(self.cfg.grad_accum)]
        # Normalise by the targets of the whole step on all ranks: the mean per-token loss of the global
        # batch, whatever the padding or chat masks, so N processes do exactly the math of one.
        targets = ctx.sum([float(sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches))])[0]
        loss_sum = torch.zeros((), device=ctx.device)
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            with gradient_sync(session.train_model, ctx, last):
                loss_sum += self._micro_step(batch, ctx.world_size / max(targets, 1.0))
        session.scaler.unscale_(session.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        self.grad_norm = torch.nn.utils.clip_grad_norm_(session.model.parameters(), clip)
        session.scaler.step(session.optimizer)
        session.scaler.update()
        session.optimizer.zero_grad(set_to_none=True)
        tokens = sum(b.input_ids.numel() for b in batches) * ctx.world_size
        session.step += 1
        session.tokens_seen += tokens
        self.lr = lr
        self.window["loss"] += loss_sum  # stays on the device: no sync until the next log
        self.window["targets"] += targets
        self.window["tokens"] += tokens

    def _micro_step(self, batch, scale: float) -> torch.Tensor:
        session = self.session
        input_ids = batch.input_ids.to(session.ctx.device, non_blocking=True)
        labels = batch.labels.to(session.ctx.device, non_blocking=True)
        if batch.images is None:  # a picture's patches must stay in one window, so image batches are not cut
            input_ids, labels = cut_batch(input_ids, labels, self._window_length(session.step))
        self.step_width = input_ids.shape[1]  # the curriculum's cut, or the loader's to the longest sample
        images = session.images.batch(batch.images, train=True, device=session.ctx.device) if session.images else None
        # A looped model trains its earlier exits and its confidence head from the labels (model/looped.py).
        looped = {"labels": labels} if session.model.config.max_loops > 1 else {}
        with session.precision.autocast():
            out = session.train_model(input_ids, images=images, **looped)
        loss_sum = _loss_sum(out.logits, labels)
        loss = loss_sum * scale + out.aux_loss / self.cfg.grad_accum
        session.scaler.scale(loss).backward()
        return loss_sum.detach()

    def _window_length(self, step: int) -> int:
        """Tokens per training window at optimizer step `step` (0-based): data.seq_len unless a curriculum runs."""
        cfg, total = self.cfg, self.session.schedule.total_steps
        return length_at(step, total, self.run_config.data.seq_len, cfg.seq_len_start, cfg.seq_len_warmup)

    def _after_step(self) -> None:
        session, cfg, step = self.session, self.cfg, self.session.step
        final = step >= session.schedule.total_steps
        self._update_state()
        if step % cfg.log_every == 0 or final:
            self._log_train()
        saving = cfg.save_every > 0 and step % cfg.save_every == 0 and not final
        if not final and (saving or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            self._evaluate()
        if cfg.sample_every > 0 and step % cfg.sample_every == 0:
            self._sample()
        if saving:
            self._save()
        if self.replan_every and step % self.replan_every == 0 and step < 0.8 * self.session.schedule.total_steps:
            self._replan()
        self.sinks.on_step_end(self.state)

    def _update_state(self) -> None:
        state, session = self.state, self.session
        state.step, state.tokens_seen = session.step, session.tokens_seen
        state.total_steps = session.schedule.total_steps
        state.best_val_loss = session.best_val_loss
        state.elapsed_s = time.perf_counter() - self.started
        state.epoch = session.loader.epoch

    def _stop_requested(self) -> bool:
        local = self.state.stop_requested or (self.out / STOP_FILE).exists()
        return self.session.ctx.sum([float(local)])[0] > 0  # every rank must leave the loop at the same step

    # ---- reporting ------------------------------------------------------------------------------------
    def _log_train(self) -> None:
        session, window = self.session, self.window
        loss = session.ctx.sum([float(window["loss"])])[0] / max(window["targets"], 1.0)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the training loss became {loss} at step {session.step}; lower train.lr or use train.precision=fp32/bf16"
            )
        seconds = max(time.perf_counter() - window["time"], 1e-9)
        steps = session.step - window["step"]
        tok_s = window["tokens"] / seconds
        record = {
            "train/loss": loss,
            "lr": self.lr,
            "grad_norm": float(self.grad_norm),
            "throughput/tok_s": tok_s,
            "mfu": self.flops_per_token * tok_s / session.ctx.world_size / self.peak,
            "train/seq_len": self.step_width,  # the width of the latest step's (last) batch
            "progress/total_steps": session.schedule.total_steps,
            "progress/epoch": self.state.epoch,
            "progress/tokens": session.tokens_seen,
            "time/elapsed_s": self.state.elapsed_s,
            "time/eta_s": (session.schedule.total_steps - session.step) * seconds / max(steps, 1),
        }
        record.update({f"experts/{layer}": values for layer, values in session.model.expert_utilisation().items()})
        self.train_loss = loss
        self._emit(record)
        self.window = self._new_window()

    def _emit(self, record: dict) -> None:
        self.state.metrics = record
        self.sinks.log(record, self.session.step)

    @torch.no_grad()
    def _evaluate(self) -> float | None:
        session = self.session
        if len(session.val_data) == 0:
            return None
        if time.perf_counter() - self.peak_measured >= PEAK_REMEASURE_SECONDS:
            self.peak = peak_flops(session.ctx.device, session.precision.dtype, remeasure=True)
            self.peak_measured = time.perf_counter()
        session.model.eval()  # the plain module: no DDP collectives, so ranks may see different batch counts
        total = count = 0.0
        loader = session.val_loader()
        one_pass = math.ceil(len(session.val_data) / (loader.batch_size * session.ctx.world_size))
        device = session.ctx.device
        for _ in range(min(self.cfg.eval_batches, one_pass)):
            batch = next(loader)
            labels = batch.labels.to(device)
            images = session.images.batch(batch.images, train=False, device=device) if session.images else None
            with session.precision.autocast():
                logits = session.model(batch.input_ids.to(device), images=images).logits
            total += float(_loss_sum(logits, labels))
            count += int((labels != IGNORE_INDEX).sum())
        session.model.train()
        total, count = session.ctx.sum([total, count])
        self.val_loss, self.val_step = total / max(count, 1.0), session.step
        if session.best_val_loss is None or self.val_loss < session.best_val_loss:
            session.best_val_loss = self.val_loss
        self.state.best_val_loss = session.best_val_loss
        self._emit({"val/loss": self.val_loss})
        self.sinks.on_eval_end(self.state)
        return self.val_loss

    def _sample(self) -> None:
        session = self.session
        if not (session.ctx.is_main or session.ctx.sharded):  # FSDP: every rank helps gather the weights
            return
        tok = session.tokenizer
        config = GenerationConfig(max_new_tokens=self.cfg.sample_tokens, seed=self.cfg.seed, stop_ids=[tok.eot_id])
        with unsharded(session.model):
            for prompt in self.cfg.sample_prompts:
                ids = tok.encode(prompt) or [tok.eot_id]
                with session.precision.autocast():
                    text = tok.decode(list(generate(session.model, ids, config)))
                self._emit({"sample/prompt": prompt, "sample/text": text})

    # ---- saving, stopping, finishing ------------------------------------------------------------------
    def _save(self) -> None:
        session = self.session
        resume_state = capture_state(session)
        shards = write_shards(session, self.out)  # FSDP: each rank writes its part; None otherwise
        model = full_model(session.model, session.ctx)  # FSDP: gathered on rank 0
        if session.ctx.is_main:
            meta = {
                "total_steps": session.schedule.total_steps,
                "tokens_seen": session.tokens_seen,
                "train_loss": self.train_loss,
                "val_loss": self.val_loss if self.val_step == session.step else None,
            }
            path = save_checkpoint(self.out, session.step, model, session.tokenizer, resume_state, meta, shards)
            if meta["val_loss"] is not None:
                mark_best_if_better(self.out, session.step, meta["val_loss"])
            prune_checkpoints(self.out, self.cfg.keep_last)
            self.state.checkpoint_dir = str(path)
            self.sinks.on_save(self.state)
        session.ctx.barrier()

    def _stop(self) -> None:
        if not checkpoint_dir(self.out, self.session.step).exists():
            self._save()
        if self.session.ctx.is_main:
            (self.out / STOP_FILE).unlink(missing_ok=True)  # honoured: a later resume must not stop at once

    def _finish(self) -> str:
        session = self.session
        meta = checkpoint_dir(self.out, session.step) / "meta.json"
        if session.step == session.start_step and meta.is_file():
            # Resumed from the last step's checkpoint (killed while writing the bundle): that step was evaluated
            # and recorded before the checkpoint; evaluating again would record val/loss twice.
            saved = json.loads(meta.read_text(encoding="utf-8"))
            self.train_loss, self.val_loss = saved.get("train_loss"), saved.get("val_loss")
        else:
            self._evaluate()
        if not checkpoint_dir(self.out, session.step).exists():  # "train N more" continues from this checkpoint
            self._save()
        bundle = self.out / FINAL_DIR
        model = full_model(session.model, session.ctx)  # FSDP: gathered on rank 0
        if session.ctx.is_main:
            card = {
                "steps": session.step,
                "tokens seen": session.tokens_seen,
                "final train loss": self.train_loss,
                "final val loss": self.val_loss,
                "best val loss": session.best_val_loss,
                "data": session.data_summary,
            }
            card = {k: v for k, v in card.items() if v is not None}
            merge = self.run_config.finetune.merge_on_export  # a LoRA run: also the plain model, adapters folded in
            save_bundle(bundle, model, session.tokenizer, card, title=self.run_config.name or None, merge=merge)
        session.ctx.barrier()
        return str(bundle)

    def _replan(self) -> None:
        """Re-fit the total steps into the remaining budget at the measured pace (rank 0's, for all)."""
        session = self.session
        now = time.perf_counter()
        mark_time, mark_step = self.pace_mark
        pace = (now - mark_time) / max(session.step - mark_step, 1)
        self.pace_mark = (now, session.step)
        left = self.cfg.max_minutes * 60 - (now - self.started)
        total = session.step + budget_steps(self.cfg, pace, left) if left > 0 else session.step
        session.schedule = session.schedule.with_total(int(session.ctx.broadcast(max(total, session.step))))
        self.state.total_steps = session.schedule.total_steps
