"""Before a run: parameters, tokens per step, steps, memory and ETA, from the config and measured steps.

The studio shows `plan_run(...).to_text()` before the user presses Start; the trainer uses the same step
measurement to turn a time budget (`max_minutes`) into a number of steps, so the schedule ends on time.
The measuring itself (what is timed, and in which process) is in measure.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..model import ApertisModel
from .build import planned_model_config
from .config import RunConfig, TrainConfig
from .hardware import pick_device
from .measure import Measurement, measure_run
from .precision import Precision, resolve_precision


@dataclass
class TrainPlan:
    parameters: int  # all parameters
    active_parameters: int  # parameters one token passes through (routed experts: only the top-k)
    tokens_per_step: int  # tokens per optimizer step, all processes together
    total_steps: int  # optimizer steps the run will take
    est_memory_bytes: int  # rough peak memory of one training process
    eta_seconds: float  # estimated wall time: start-up + steps + evaluations + samples
    flops_per_token: float  # training FLOPs per token (forward + backward)
    device: str  # where it trains
    precision: str  # fp32, bf16 or fp16
    step_seconds: float  # measured seconds per optimizer step (0 when not measured)
    world_size: int = 1  # data-parallel processes
    threads: int = 0  # torch threads the steps were measured with (0 when not measured)
    start_seconds: float = 0.0  # of eta_seconds: starting the process, reading the data, the slow first step
    sample_seconds: float = 0.0  # of eta_seconds: the sample generations
    measured_in: str = ""  # where the steps were timed, for the reader

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
            where = f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
            where += f", {self.measured_in}" if self.measured_in else ""
            lines.append(f"speed           {self.step_seconds:.3f} s/step, {tok_s:,.0f} tokens/s (measured{where})")
            lines.append(f"ETA             {format_duration(self.eta_seconds)}{self._eta_parts()}")
        return "\n".join(lines)

    def _eta_parts(self) -> str:
        steps = self.eta_seconds - self.start_seconds - self.sample_seconds
        parts = [f"{format_duration(steps)} of steps and evaluations"]
        if self.sample_seconds >= 1:
            parts.append(f"{format_duration(self.sample_seconds)} of sample text")
        if self.start_seconds >= 1:
            parts.append(f"{format_duration(self.start_seconds)} to start")
        return f" ({', '.join(parts)})" if len(parts) > 1 else ""


def format_duration(seconds: float) -> str:
    """'4m 05s', '3h 07m', '12 days 4h', '31.7 years': the largest units that still say something."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days >= 365:
        return f"{seconds / (365.25 * 86400):,.1f} years"
    if days >= 2:
        return f"{days} days {hours}h"
    if days or hours:
        return f"{days * 24 + hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def plan_run(
    run_config: RunConfig, measure: bool = True, world_size: int = 1, measurement: Measurement | None = None
) -> TrainPlan:
    """What `train(run_config)` will do. `measure` times the run's first steps here (`measure_run`) unless a
    `measurement` is given (say, from `measure_in_fresh_process`).

    Without a measurement there is no ETA, and a time-budgeted run shows max_steps (its real count needs a speed).
    """
    cfg = run_config.train
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model_config = planned_model_config(run_config)
    seq_len = run_config.data.seq_len
    with torch.device("meta"):  # counts and FLOPs need shapes only, not memory
        model = ApertisModel(model_config)
    if measurement is None and measure:
        measurement = measure_run(run_config)
    m = measurement or Measurement(0.0, 0.0, 0.0, threads=0, where="")
    if m.val_batches is not None:  # an evaluation stops after one pass over a small validation set
        cfg = dataclasses.replace(cfg, eval_batches=min(cfg.eval_batches, m.val_batches))
    start_s = m.startup_s + m.setup_s + max(m.first_step_s - m.step_s, 0.0) + final_eval_seconds(cfg, m.step_s)
    if cfg.max_minutes > 0 and m.step_s > 0:  # the trainer fits the steps into what its start leaves
        total = budget_steps(cfg, m.step_s, cfg.max_minutes * 60 - (start_s - m.startup_s))
    else:
        total = cfg.max_steps
    sample_s = sample_seconds(cfg, total, m.sample_token_s)
    step_part = total * seconds_per_step_with_eval(cfg, m.step_s)
    return TrainPlan(
        parameters=model.num_parameters(),
        active_parameters=model.num_parameters(active_only=True),
        tokens_per_step=cfg.tokens_per_step(seq_len, world_size),
        total_steps=total,
        est_memory_bytes=estimate_memory(model, cfg.batch_size, seq_len, precision),
        eta_seconds=step_part + sample_s + start_s if m.step_s > 0 else 0.0,
        flops_per_token=model.flops_per_token(seq_len),
        device=str(device),
        precision=precision.name,
        step_seconds=m.step_s,
        world_size=world_size,
        threads=m.threads,
        start_seconds=start_s if m.step_s > 0 else 0.0,
        sample_seconds=sample_s,
        measured_in=m.where,
    )


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


def seconds_per_step_with_eval(cfg: TrainConfig, step_s: float) -> float:
    """Step time plus the evaluations' share (a forward pass costs about a third of a training step)."""
    if cfg.eval_every <= 0:
        return step_s
    return step_s + eval_seconds(cfg, step_s) / cfg.eval_every


def eval_seconds(cfg: TrainConfig, step_s: float) -> float:
    """One validation pass: eval_batches forward passes of one micro-batch each."""
    return cfg.eval_batches * step_s / (3 * cfg.grad_accum)


def final_eval_seconds(cfg: TrainConfig, step_s: float) -> float:
    """The trainer evaluates once more at the end, whatever eval_every says (when there is a validation set)."""
    return eval_seconds(cfg, step_s)


def sample_seconds(cfg: TrainConfig, total_steps: int, token_s: float) -> float:
    """All sample generations of a run: every sample_every steps, each prompt gets sample_tokens tokens."""
    if cfg.sample_every <= 0 or not cfg.sample_prompts:
        return 0.0
    return (total_steps // cfg.sample_every) * len(cfg.sample_prompts) * cfg.sample_tokens * token_s


def budget_steps(cfg: TrainConfig, step_s: float, seconds_left: float | None = None) -> int:
    """Steps that fit in the time budget (or `seconds_left` of it) at `step_s` per step; at least 1."""
    seconds = cfg.max_minutes * 60 if seconds_left is None else seconds_left
    return max(1, int(seconds / seconds_per_step_with_eval(cfg, step_s)))
