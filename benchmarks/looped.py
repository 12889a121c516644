"""`python -m benchmarks.looped`: looped depth (model/looped.py) at 1, 2 and 4 passes, side by side.

Character-level tinyshakespeare (byte-level tokenizer, nanoGPT's 90/10 split, loss in nats per character),
the apertis-nano recipe narrowed to 128 wide as in benchmarks/train.py, blocks 1-2 looped. Every model has
the same weights but the confidence head's. They train in turns in one process on the same batches, one
step each per round in a rotating order, each timing only its own steps, so machine load hits all alike:

1. equal steps: validation loss after --steps steps each;
2. equal wall clock: each cheaper model goes on to the steps that the slowest one's --steps take, by the
   ratio of their median step times measured side by side in part 1 (a ratio, so a change of machine load
   between the parts does not favour anyone; the learning rate is constant after warm-up, so going on is
   plain more training).

Validation loss is measured with the learned halting (loop_halt_threshold 0.5) and with every pass
(threshold 0), with the mean passes per token; then the passes per token on easy text (one letter repeated,
one line repeated) and hard text (held-out Shakespeare). `--quick` runs toy sizes in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmarks.common import (
    add_race_arguments,
    describe_machine,
    format_table,
    lm_train_step,
    parse_race_arguments,
)

MODEL = {"d_model": 128, "n_heads": 4, "n_layers": 4}  # benchmarks/train.py's CPU size of apertis-nano
QUICK_MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 3, "sla_chunk_size": 8}
EASY_LINE = "To be, or not to be, that is the question.\n"


@dataclass
class Trainee:
    loops: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    steps: int = 0
    seconds: list[float] = field(default_factory=list)  # each of its own steps

    def step_s(self, steps: int) -> float:
        """The median time of its first `steps` steps (the ones all models took side by side)."""
        return statistics.median(self.seconds[:steps])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.looped", description=__doc__.splitlines()[0])
    add_race_arguments(parser, warmup=20, val_windows=16)
    parser.add_argument("--loops", default="1,2,4", help="comma-separated max_loops values to compare")
    parser.add_argument("--loop-blocks", default="1-2", help="model.loop_blocks of the looped models")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps of the equal-steps comparison")
    args = parse_race_arguments(parser, argv)
    if args.quick:
        args.steps, args.batch, args.seq_len, args.warmup, args.val_windows = 3, 2, 32, 1, 2
    return args


def build(loops: int, args, vocab_size: int) -> Trainee:
    from apertis_core import ModelConfig
    from apertis_core.model import ApertisModel

    size = QUICK_MODEL if args.quick else MODEL
    cfg = ModelConfig.from_preset(
        "apertis-nano", **size, vocab_size=vocab_size, max_seq_len=args.seq_len, max_loops=loops
    )
    if loops > 1:
        cfg = cfg.replace(loop_blocks=args.loop_blocks).validated()
    torch.manual_seed(0)  # the head is built last: every model starts from the same shared weights
    model = ApertisModel(cfg)
    return Trainee(loops, model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1))


def train_step(trainee: Trainee, ids: torch.Tensor, args) -> None:
    lr = args.lr * min(1.0, (trainee.steps + 1) / args.warmup)
    trainee.seconds.append(lm_train_step(trainee.model, trainee.optimizer, ids, lr))
    trainee.steps += 1


def batch_at(train_ids: torch.Tensor, step: int, args) -> torch.Tensor:
    """The step's batch of seq_len + 1 windows: the same for every model."""
    generator = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=generator)
    return torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, threshold: float | None = None) -> tuple[float, float]:
    """(loss in nats per token, mean passes per token) over windows ids (N, T + 1)."""
    model.eval()
    loop = model.loop
    saved = loop.threshold if loop is not None else None
    if loop is not None and threshold is not None:
        loop.threshold = threshold
    losses, passes = [], []
    for window in ids.split(8):
        logits = model(window[:, :-1]).logits
        losses.append(F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(), reduction="none"))
        passes.append(loop.last_passes.flatten().float() if loop is not None else torch.ones(losses[-1].shape))
    if loop is not None:
        loop.threshold = saved
    return float(torch.cat(losses).mean()), float(torch.cat(passes).mean())


def run_until(trainees: list[Trainee], train_ids, args, done) -> None:
    """Rounds of one step per unfinished model, in a rotating order, until `done(trainee)` holds for all."""
    round_ = 0
    while True:
        pending = [t for t in trainees if not done(t)]
        if not pending:
            return
        shift = round_ % len(pending)
        for trainee in pending[shift:] + pending[:shift]:
            train_step(trainee, batch_at(train_ids, trainee.steps, args), args)
        round_ += 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from apertis_core.tokenizer import Tokenizer

    tokenizer = Tokenizer.byte_level()
    text = args.corpus.read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    train_ids = torch.tensor(tokenizer.encode(text[:split]))
    held_out = torch.tensor(tokenizer.encode(text[split:]))
    val = held_out[: args.val_windows * (args.seq_len + 1)].view(args.val_windows, args.seq_len + 1)
    length = args.seq_len + 1
    texts = {
        "one letter repeated (never seen in training)": torch.tensor(tokenizer.encode("a" * length))[None],
        "easy: one line repeated": torch.tensor(tokenizer.encode(EASY_LINE * (length // len(EASY_LINE) + 1)))[
            None, :length
        ],
        "hard: held-out Shakespeare": val,
    }
    trainees = [build(int(k), args, tokenizer.vocab_size) for k in args.loops.split(",")]
    results: dict = {"machine": describe_machine("cpu"), "argv": argv if argv is not None else sys.argv[1:]}

    def measure(phase: str) -> list[list]:
        rows = []
        for t in trainees:
            halting, passes = evaluate(t.model, val)
            every, _ = evaluate(t.model, val, threshold=0.0)
            row = [
                t.loops,
                t.steps,
                f"{t.step_s(args.steps) / trainees[0].step_s(args.steps):.2f}",
                f"{halting:.3f}",
                f"{every:.3f}",
            ]
            row.append(f"{passes:.2f}")
            results.setdefault(phase, []).append(
                dict(
                    loops=t.loops,
                    steps=t.steps,
                    step_s=t.step_s(args.steps),
                    val_halting=halting,
                    val_every=every,
                    passes=passes,
                )
            )
            rows.append(row)
        return rows

    step_time = f"step time / max_loops {trainees[0].loops}'s"
    header = ["max_loops", "steps", step_time, "val loss (halting)", "val loss (every pass)", "passes/token"]
    run_until(trainees, train_ids, args, lambda t: t.steps >= args.steps)
    print(format_table(f"1. Equal steps ({args.steps})", header, measure("equal_steps")), flush=True)
    slowest = max(t.step_s(args.steps) for t in trainees)
    targets = {t.loops: round(args.steps * slowest / t.step_s(args.steps)) for t in trainees}
    run_until(trainees, train_ids, args, lambda t: t.steps >= targets[t.loops])
    title = f"2. Equal wall clock ({args.steps} steps of the slowest)"
    print("\n" + format_table(title, header, measure("equal_time")), flush=True)
    rows = []
    for name, ids in texts.items():
        row = [name]
        for t in trainees:
            loss, passes = evaluate(t.model, ids)
            row.append(f"{passes:.2f} ({loss:.2f})")
            results.setdefault("passes", {}).setdefault(name, {})[t.loops] = {"passes": passes, "loss": loss}
        rows.append(row)
    header = ["text", *(f"max_loops {t.loops}: passes (loss)" for t in trainees)]
    print("\n" + format_table("3. Passes per token, easy vs hard text", header, rows))
    print("\n" + "\n".join(f"- {key}: {value}" for key, value in results["machine"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
