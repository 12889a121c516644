"""`python -m benchmarks.profile_step`: one training step of the `apertis bench train` recipes, profiled.

Builds the apertis and transformer recipes of `benchmarks/train.py` (128 wide, 4 layers, vocab 262,
batch 32 x 128 by default), times forward + backward + AdamW steps of both side by side (interleaved,
median), then runs torch.profiler over a few steps of each and prints the op-call count per step and the
ops that take the most time. benchmarks/README.md reports its step-time ratio beside the model benchmark.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import format_seconds, format_table, time_interleaved
from benchmarks.train import RECIPES

VOCAB = 262  # the byte-level tokenizer of `apertis bench train`


def build(recipe: str, seq_len: int, overrides: list[str]):
    from apertis_core import ApertisModel, ModelConfig

    spec = dict(RECIPES[recipe])
    cfg = ModelConfig.from_preset(spec.pop("preset"), **spec, vocab_size=VOCAB, max_seq_len=seq_len)
    if overrides:
        cfg = cfg.override([o for o in overrides if o.split("=")[0] in cfg.to_dict()])
    torch.manual_seed(0)
    model = ApertisModel(cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3)


def train_step(model, optimizer, ids):
    def run():
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def profile(run, steps: int, rows: int, sort: str) -> tuple[int, str]:
    """Op calls per step (top-level aten ops and their children alike, as the profiler counts) and the table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    events = prof.key_averages()
    calls = sum(e.count for e in events if e.key.startswith("aten::")) // steps
    return calls, events.table(sort_by=sort, row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler (0 = no profile)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--sort", default="self_cpu_time_total")
    parser.add_argument("--recipes", default="apertis,transformer")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="model override, e.g. sla_chunk_size=32"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq_len + 1))
    cases, sizes = {}, {}
    for name in args.recipes.split(","):
        model, optimizer = build(name, args.seq_len, args.overrides)
        cases[name] = train_step(model, optimizer, ids)
        sizes[name] = model.num_parameters()
    timings = time_interleaved(cases, args.repeats, warmup=2)
    first = next(iter(timings))
    rows = [
        [name, f"{sizes[name] / 1e6:.2f} M", format_seconds(t.median), f"{t.median / timings[first].median:.2f}x"]
        for name, t in timings.items()
    ]
    title = f"Training step, batch {args.batch} x {args.seq_len}, {torch.get_num_threads()} threads"
    print(format_table(title, ["recipe", "parameters", "step (median)", f"vs {first}"], rows), flush=True)
    if args.profile_steps:
        for name, run in cases.items():
            calls, table = profile(run, args.profile_steps, args.rows, args.sort)
            print(f"\n### {name}: {calls} aten op calls per step\n\n{table}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
