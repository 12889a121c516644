"""LoRA vs full fine-tuning of an apertis-nano bundle: trainable parameters, what a run writes (adapter,
merged bundle, checkpoints) and seconds per training step, the two measured side by side.

Step times come from `measure_run` (the trainer's own step: real batches, AdamW, clipping), in rounds that
alternate the two cases, so machine load hits both alike; read the ratio. Run from the repository root:
    python -m benchmarks.lora [--rounds 5] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import describe_machine, format_bytes, format_table

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "shakespeare-excerpt.txt"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and case")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="apertis-bench-lora-") as tmp:
        report(Path(tmp), args.rounds, args.steps)
    return 0


def report(root: Path, rounds: int, steps: int) -> None:
    from apertis_core import ApertisModel, ModelConfig, Tokenizer, load_bundle, save_bundle
    from apertis_core.finetune import adapter_parameters
    from apertis_core.training import RunConfig, train
    from apertis_core.training.build import start_model
    from apertis_core.training.measure import measure_run

    tokenizer = Tokenizer.byte_level()
    torch.manual_seed(0)
    save_bundle(
        root / "base", ApertisModel(ModelConfig.from_preset("apertis-nano", vocab_size=tokenizer.vocab_size)), tokenizer
    )
    corpus = CORPUS
    train_cfg = {"batch_size": 8, "max_steps": 2, "warmup_steps": 1, "eval_every": 0, "save_every": 0,
                 "sample_every": 0, "precision": "fp32", "device": "cpu"}  # fmt: skip
    runs = {
        method: RunConfig.from_dict(
            {
                "finetune": {"base": str(root / "base"), "method": method},
                "data": {"path": str(corpus), "seq_len": 128},
                "train": train_cfg,
                "out_dir": str(root / method),
            }
        )  # fmt: skip
        for method in ("lora", "full")
    }
    times: dict[str, list[float]] = {method: [] for method in runs}
    order = list(runs)
    for round_ in range(rounds):
        for method in order[round_ % 2 :] + order[: round_ % 2]:
            times[method].append(measure_run(runs[method], steps=steps).step_s)

    rows = []
    for method, run in runs.items():
        model, _ = start_model(run)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result = train(run)
        final, checkpoint = Path(result.bundle_dir), root / method / "checkpoints" / f"step_{result.steps:07d}"
        adapter = final / "adapter_model.safetensors"
        rows.append([
            method,
            f"{trainable:,} of {total - (adapter_parameters(model) if method == 'lora' else 0):,}",
            f"{statistics.median(times[method]):.3f} s",
            format_bytes(adapter.stat().st_size) if adapter.exists() else "-",
            format_bytes((final / "model.safetensors").stat().st_size),
            format_bytes(folder_bytes(checkpoint)),
            format_bytes((checkpoint / "trainer_state.pt").stat().st_size),
        ])  # fmt: skip
    ratio = statistics.median(times["lora"]) / statistics.median(times["full"])
    merged, _ = load_bundle(root / "lora" / "final")
    unmerged, _ = load_bundle(root / "lora" / "checkpoints" / "step_0000002", merge=False)
    ids = torch.tensor([tokenizer.encode("To be, or not to be, that is the question")])
    with torch.no_grad():
        gap = (merged(ids).logits - unmerged(ids).logits).abs().max().item()
    print(
        format_table(
            "LoRA (rank 8, alpha 16, mixer + FFN projections) vs full fine-tune, apertis-nano, batch 8 x 128",
            [
                "method",
                "trainable parameters",
                "s/step (median)",
                "adapter file",
                "model.safetensors",
                "checkpoint folder",
                "trainer_state.pt",
            ],
            rows,
        )  # fmt: skip
    )
    print(f"\nLoRA step time / full step time: {ratio:.2f} (medians of {rounds} interleaved rounds)")
    print(f"max |merged - unmerged| logit: {gap:.2e}")
    print("\n" + "\n".join(f"- {k}: {v}" for k, v in describe_machine("cpu").items()))


if __name__ == "__main__":
    raise SystemExit(main())
