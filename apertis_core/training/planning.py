"""Before a run: parameters, tokens per step, steps, memory and ETA, from the config and a measured warm-up.

The studio shows `plan_run(...).to_text()` before the user presses Start; the trainer uses the same
measurement to turn a time budget (`max_minutes`) into a number of steps, so the schedule ends on time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import ApertisModel, ModelConfig
from ..tokenizer import SPECIAL_TOKENS, Tokenizer
from .config import RunConfig, TrainConfig
from .hardware import pick_device
from .optim import build_optimizer
from .precision import Precision, resolve_precision


@dataclass
class TrainPlan:
    parameters: int  # all parameters
    active_parameters: int  # parameters one token passes through (routed experts: only the top-k)
    tokens_per_step: int  # tokens per optimizer step, all processes together
    total_steps: int  # optimizer steps the run will take
    est_memory_bytes: int  # rough peak memory of one training process
    eta_seconds: float  # estimated training time (measured step time x steps, plus evaluations)
    flops_per_token: float  # training FLOPs per token (forward + backward)
    device: str  # where it trains
    precision: str  # fp32, bf16 or fp16
    step_seconds: float  # measured seconds per optimizer step (0 when not measured)
    world_size: int = 1  # data-parallel processes

    def to_text(self) -> str:
        active = (
            f" ({self.active_parameters / 1e6:.2f}M active per token)"
            if self.active_parameters != self.parameters
            else ""
        )
        lines = [
            f"parameters      {self.parameters / 1e6:.2f}M{active}",
            f"tokens per step {self.tokens_per_step:,}"
            + (f" over {self.world_size} processes" if self.world_size > 1 else ""),
            f"total steps     {self.total_steps:,} ({self.total_steps * self.tokens_per_step / 1e6:.1f}M tokens)",
            f"memory          ~{self.est_memory_bytes / 2**30:.2f} GiB (estimate)",
            f"device          {self.device}, {self.precision}",
        ]
        if self.step_seconds > 0:
            tok_s = self.tokens_per_step / self.step_seconds
            lines.append(f"speed           {self.step_seconds:.3f} s/step, {tok_s:,.0f} tokens/s (measured)")
            lines.append(f"ETA             {format_duration(self.eta_seconds)}")
        return "\n".join(lines)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def plan_run(run_config: RunConfig, measure: bool = True, world_size: int = 1) -> TrainPlan:
    """What `train(run_config)` will do; `measure` times a few warm-up steps for the ETA and time budget.

    Without `measure` there is no ETA, and a time-budgeted run shows max_steps (its real count needs a speed).
    """
    cfg = run_config.train
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model_config = run_config.model.replace(vocab_size=planned_vocab_size(run_config))
    seq_len = run_config.data.seq_len
    with torch.device("meta"):  # counts and FLOPs need shapes only, not memory
        model = ApertisModel(model_config)
    step_s = measure_step_seconds(model_config, cfg, seq_len, device, precision) if measure else 0.0
    total = budget_steps(cfg, step_s) if cfg.max_minutes > 0 and step_s > 0 else cfg.max_steps
    return TrainPlan(
        parameters=model.num_parameters(),
        active_parameters=model.num_parameters(active_only=True),
        tokens_per_step=cfg.tokens_per_step(seq_len, world_size),
        total_steps=total,
        est_memory_bytes=estimate_memory(model, cfg.batch_size, seq_len, precision),
        eta_seconds=total * seconds_per_step_with_eval(cfg, step_s),
        flops_per_token=model.flops_per_token(seq_len),
        device=str(device),
        precision=precision.name,
        step_seconds=step_s,
        world_size=world_size,
    )


def planned_vocab_size(run_config: RunConfig) -> int:
    """The vocabulary the run will have: a given tokenizer's, else the size it will be trained to."""
    if run_config.data.tokenizer:
        return Tokenizer.load(run_config.data.tokenizer).vocab_size
    return max(run_config.data.vocab_size, 256 + len(SPECIAL_TOKENS))  # below that it is byte-level


def estimate_memory(model: ApertisModel, batch_size: int, seq_len: int, precision: Precision) -> int:
    """Weights, gradients and AdamW moments (fp32: 16 bytes per parameter) plus activations.

    Activations use the per-layer figure for a transformer block without stored attention scores
    (~34 bytes per token per width unit at 16-bit, Korthikanti et al. 2022), scaled to the compute
    width, plus the logits in fp32 with their gradient. An estimate, good to a factor of ~1.5.
    """
    cfg = model.config
    element = precision.dtype.itemsize
    tokens = batch_size * seq_len
    activations = 34 * tokens * cfg.d_model * cfg.n_layers * element // 2
    logits = tokens * cfg.vocab_size * (element + 4 + 4)
    return 16 * model.num_parameters() + activations + logits


def measure_step_seconds(
    model_config: ModelConfig,
    cfg: TrainConfig,
    seq_len: int,
    device: torch.device,
    precision: Precision,
    steps: int = 3,
) -> float:
    """Seconds per optimizer step, timed on a throwaway copy of the model with random tokens.

    The global RNG is forked so a run that measures first trains exactly like one that does not.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model = ApertisModel(model_config).to(device)
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, device)
        ids = torch.randint(0, model_config.vocab_size, (cfg.batch_size, seq_len + 1), device=device)
        micro, update = [], []
        for index in range(steps + 1):  # the first round pays for allocation and kernel selection
            start = _now(device)
            with precision.autocast():
                out = model(ids[:, :-1])
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
            loss.backward()
            middle = _now(device)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if index:
                micro.append(middle - start)
                update.append(_now(device) - middle)
    return cfg.grad_accum * min(micro) + min(update)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def seconds_per_step_with_eval(cfg: TrainConfig, step_s: float) -> float:
    """Step time plus the evaluations' share (a forward pass costs about a third of a training step)."""
    if cfg.eval_every <= 0:
        return step_s
    eval_s = cfg.eval_batches * step_s / (3 * cfg.grad_accum)
    return step_s + eval_s / cfg.eval_every


def budget_steps(cfg: TrainConfig, step_s: float, seconds_left: float | None = None) -> int:
    """Steps that fit in the time budget (or `seconds_left` of it) at `step_s` per step; at least 1."""
    seconds = cfg.max_minutes * 60 if seconds_left is None else seconds_left
    return max(1, int(seconds / seconds_per_step_with_eval(cfg, step_s)))
