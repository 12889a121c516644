"""Timing and reporting helpers shared by the benchmarks.

Timings on a shared machine are noisy, so every comparison is measured side by side in one process:
each case is warmed up, then the cases run in turns (the order rotates every round, so none always
follows the same neighbour) and each reports the median of its rounds. Ratios of such medians are the
numbers to read; absolute times move with the machine's load, which `describe_machine` records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)  # one per round

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the rounds disagreed."""
        return (max(self.seconds) - min(self.seconds)) / self.median if self.seconds else 0.0


def time_interleaved(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    calls_per_round: int = 1,
) -> dict[str, Timing]:
    """Seconds per call of each case: `warmup` untimed calls each, then `repeats` rounds that run every
    case once (`calls_per_round` calls, timed together and divided), in an order that rotates."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    sync()
    timings = {name: Timing() for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            for _ in range(calls_per_round):
                cases[name]()
            sync()
            timings[name].seconds.append((time.perf_counter() - start) / calls_per_round)
    return timings


SHAKESPEARE = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"  # shipped: public domain


def add_race_arguments(parser: argparse.ArgumentParser, warmup: int, val_windows: int) -> None:
    """The options every side-by-side character-level race on tinyshakespeare takes (BitNet, looped depth)."""
    parser.add_argument("--corpus", type=Path, default=SHAKESPEARE, help="tinyshakespeare.txt")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=warmup, help="linear warm-up steps, then a constant rate")
    parser.add_argument("--val-windows", type=int, default=val_windows, help="validation windows of seq-len characters")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the benchmark runs")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")


def parse_race_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        parser.error(f"{args.corpus} not found; pass --corpus PATH to tinyshakespeare.txt")
    return args


def lm_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, windows: torch.Tensor, lr: float) -> float:
    """One next-token step on (B, T + 1) token windows at `lr`, gradients clipped at 1; returns its seconds.

    The labels go to the model too, so a looped model adds its exit and confidence losses (out.aux_loss).
    """
    from apertis_core.training.optim import set_learning_rate

    start = time.perf_counter()
    model.train()
    set_learning_rate(optimizer, lr)
    inputs, labels = windows[:, :-1], windows[:, 1:]
    out = model(inputs, labels=labels)
    loss = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten()) + out.aux_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def cpu_model() -> str:
    """The processor's marketing name, as the OS reports it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device | str) -> dict[str, str]:
    """What the numbers were measured on: CPU, cores, threads, torch, accelerator, load."""
    device = torch.device(device)
    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    if hasattr(os, "getloadavg"):
        info["load average (1/5/15 min)"] = " / ".join(f"{load:.2f}" for load in os.getloadavg())
    return info


def tensor_bytes(obj) -> int:
    """Total bytes of every tensor inside nested lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def format_table(title: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into a README) under a `### title` line."""
    cells = [[str(cell) for cell in header]] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([f"### {title}", "", line(cells[0]), rule, *(line(row) for row in cells[1:])])


def format_seconds(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def report_machine(machine: dict[str, str], result: dict, json_path: Path | None) -> None:
    """Print the machine the figures were measured on; with `json_path`, write them and it there as JSON."""
    print("\n" + "\n".join(f"- {key}: {value}" for key, value in machine.items()))
    if json_path:
        json_path.write_text(json.dumps({"machine": machine, **result}, indent=2))
