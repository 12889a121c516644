"""Context-length curriculum: validation loss at the full length, with and without the curriculum, at equal
wall clock, on tinyshakespeare (the `apertis bench train` recipes and data).

Equal wall clock without trusting a shared machine's clock over minutes: one process first times a
training step at every stage length side by side (interleaved rounds, medians), turns the budget into a
step count for each schedule, then trains both schedules for those step counts. Both runs use the same
data, seed, learning rate schedule and tokens per step; validation is always at the full length.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import describe_machine, format_table, time_interleaved
from benchmarks.train import COMMON_TRAIN, DEFAULT_CORPUS, RECIPES

VOCAB = 262  # the byte-level tokenizer's size: the corpus is ASCII, one token per character


def step_seconds(recipe: str, seq_len: int, lengths: list[int], batch_size: int, repeats: int) -> dict[int, float]:
    """Median seconds of one optimizer step (same tokens) at each window length, timed in turns."""
    from apertis_core.model import ApertisModel, ModelConfig
    from apertis_core.training.optim import build_optimizer

    config = ModelConfig.from_dict({**RECIPES[recipe], "vocab_size": VOCAB, "max_seq_len": seq_len})
    model = ApertisModel(config)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    ids = torch.randint(0, VOCAB, (batch_size, seq_len + 1))

    def step_at(length: int):
        inputs, targets = ids[:, :-1].reshape(-1, length), ids[:, 1:].reshape(-1, length)

        def step() -> None:
            out = model(inputs)
            loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten()) + out.aux_loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    timings = time_interleaved({str(length): step_at(length) for length in lengths}, repeats=repeats)
    return {int(name): timing.median for name, timing in timings.items()}


def planned_steps(budget_s: float, seconds: dict[int, float], seq_len: int, start_len: int, warmup: float) -> int:
    """Steps a schedule fits in the budget: the short stages share `warmup` of the steps equally."""
    from apertis_core.training.curriculum import stage_lengths

    short = stage_lengths(seq_len, start_len)[:-1]
    if not short:
        return max(1, int(budget_s / seconds[seq_len]))
    mean = warmup * sum(seconds[length] for length in short) / len(short) + (1 - warmup) * seconds[seq_len]
    return max(1, int(budget_s / mean))


def train_for(recipe: str, corpus: Path, seq_len: int, steps: int, train_extra: dict, out_dir: Path) -> float:
    from apertis_core.training import RunConfig, train

    run = RunConfig.from_dict(
        {
            "model": {**RECIPES[recipe], "max_seq_len": seq_len},
            "data": {
                "path": str(corpus),
                "seq_len": seq_len,
                "val_fraction": 0.1,
                "split": "tail",
                "vocab_size": VOCAB,
            },
            "train": {**COMMON_TRAIN, "max_steps": steps, "device": "cpu", **train_extra},
            "out_dir": str(out_dir),
        }
    )
    return train(run).final_val_loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.curriculum", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget per schedule")
    parser.add_argument("--seq-len", type=int, default=256, help="the full (final) window length")
    parser.add_argument("--start", type=int, default=32, help="train.seq_len_start of the curriculum")
    parser.add_argument("--warmup", type=float, default=0.3, help="train.seq_len_warmup of the curriculum")
    parser.add_argument("--recipes", default="apertis,transformer")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per length")
    args = parser.parse_args(argv)
    from apertis_core.training.curriculum import stage_lengths

    torch.manual_seed(0)
    print(describe_machine("cpu"))
    batch = COMMON_TRAIN["batch_size"] * 128 // args.seq_len  # the bench's tokens per step at any length
    rows = []
    with tempfile.TemporaryDirectory(prefix="apertis-bench-curriculum-") as tmp:
        for recipe in args.recipes.split(","):
            lengths = stage_lengths(args.seq_len, args.start)
            seconds = step_seconds(recipe, args.seq_len, lengths, batch, args.repeats)
            budget = args.minutes * 60
            plain_steps = planned_steps(budget, seconds, args.seq_len, 0, args.warmup)
            curriculum_steps = planned_steps(budget, seconds, args.seq_len, args.start, args.warmup)
            common = {"batch_size": batch}
            plain = train_for(recipe, args.corpus, args.seq_len, plain_steps, common, Path(tmp) / f"{recipe}-plain")
            curriculum = train_for(
                recipe,
                args.corpus,
                args.seq_len,
                curriculum_steps,
                {**common, "seq_len_start": args.start, "seq_len_warmup": args.warmup},
                Path(tmp) / f"{recipe}-curriculum",
            )
            step_times = ", ".join(f"{length}: {seconds[length] * 1e3:.0f} ms" for length in lengths)
            rows.append([recipe, f"{args.seq_len} throughout", plain_steps, f"{plain:.3f}", step_times])
            rows.append([recipe, f"{args.start} -> {args.seq_len}", curriculum_steps, f"{curriculum:.3f}", ""])
    header = ["recipe", "window lengths", "steps in budget", "val loss at full length", "step time per length"]
    print(format_table(f"Context-length curriculum, {args.minutes:g} minutes each", header, rows))
    print(describe_machine("cpu").get("load average (1/5/15 min)", ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
