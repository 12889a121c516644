"""`python -m benchmarks.generate`: batched generation and int8 weights, measured side by side.

1. Batched generation: total tokens/s for 1, 4 and 16 prompts continued together (`generate_many`, one
   batched `model.step` per token) against the same prompts one after another (`generate`), greedy, every
   prompt running its full --new-tokens (no stop id).
2. Weights: decode tokens/s of one prompt with fp32, int8 (apertis_core.quantize: PyTorch's dynamic int8
   kernels), torchao's int8 weight-only (when torchao is installed) and bf16 weights, and the validation loss
   of each on held-out text, so the accuracy cost sits beside the speed.

The model is a bundle (--model), or by default apertis-nano (256 wide) trained here for --train-minutes on
tinyshakespeare with `apertis bench train`'s recipe; the loss is on the last 10% of the corpus, which that
training never saw. A larger untrained preset (--speed-preset) adds speed rows: int8 pays more as the
matrices grow.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import describe_machine, format_table, report_machine, time_interleaved
from benchmarks.train import DEFAULT_CORPUS, run_recipe


def trained_model(corpus: Path, minutes: float, workdir: Path) -> Path:
    """apertis-nano at its preset width, trained for `minutes` with the `apertis bench train` recipe."""
    run_recipe("apertis", corpus, minutes, 128, workdir, ["model.d_model=256"])
    return workdir / "apertis" / "final"


def variants(model) -> dict:
    """The model with each kind of weights, keyed by a row label."""
    from apertis_core.quantize import prepare_for_inference

    made = {"fp32": model, "int8 (apertis)": prepare_for_inference(copy.deepcopy(model), "int8")}
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        torchao_model = copy.deepcopy(model)
        quantize_(torchao_model, Int8WeightOnlyConfig())
        made["int8 weight-only (torchao)"] = torchao_model
    except ImportError:
        pass
    made["bf16"] = prepare_for_inference(copy.deepcopy(model), dtype="bf16")
    return made


@torch.inference_mode()
def val_loss(model, ids: torch.Tensor, seq_len: int, windows: int) -> float:
    """Mean next-token cross-entropy over `windows` consecutive windows of `ids` (nats per token)."""
    losses = []
    for start in range(0, min(windows, (len(ids) - 1) // seq_len) * seq_len, seq_len):
        chunk = ids[start : start + seq_len + 1]
        logits = model(chunk[None, :-1]).logits[0].float()
        losses.append(F.cross_entropy(logits, chunk[1:]))
    return float(torch.stack(losses).mean())


def decode_rows(models: dict, prompt: list[int], new_tokens: int, repeats: int) -> list[list[str]]:
    from apertis_core.generation import GenerationConfig, generate

    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0)
    cases = {name: (lambda m=m: list(generate(m, prompt, config))) for name, m in models.items()}
    timings = time_interleaved(cases, repeats)
    base = timings["fp32"].median
    return [[name, f"{new_tokens / t.median:.0f}", f"{base / t.median:.2f}x"] for name, t in timings.items()]


def batch_rows(model, prompt_pool: list[list[int]], new_tokens: int, repeats: int) -> list[list[str]]:
    from apertis_core.generation import GenerationConfig, generate, generate_many

    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0)
    rows = []
    for count in (1, 4, 16):
        prompts = prompt_pool[:count]
        timings = time_interleaved(
            {
                "batched": lambda p=prompts: list(generate_many(model, p, config)),
                "one at a time": lambda p=prompts: [list(generate(model, q, config)) for q in p],
            },
            repeats,
        )
        tokens = count * new_tokens
        batched, single = timings["batched"].median, timings["one at a time"].median
        rows.append([count, f"{tokens / batched:.0f}", f"{tokens / single:.0f}", f"{single / batched:.2f}x"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a bundle to measure (default: train apertis-nano here)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="text for training and the val loss")
    parser.add_argument("--train-minutes", type=float, default=3.0)
    parser.add_argument(
        "--speed-preset", default="apertis-small", help="an untrained preset for speed rows ('' = none)"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the reliable comparison here)")
    parser.add_argument("--val-windows", type=int, default=48, help="128-token windows of held-out text")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from apertis_core import ApertisModel, ModelConfig
    from apertis_core.bundle import load_bundle

    machine = describe_machine("cpu")
    with tempfile.TemporaryDirectory(prefix="apertis-bench-generate-") as tmp:
        folder = args.model or trained_model(args.corpus, args.train_minutes, Path(tmp))
        model, tokenizer = load_bundle(folder)
    text = args.corpus.read_text(encoding="utf-8")
    held_out = torch.tensor(tokenizer.encode(text[int(len(text) * 0.9) :]))
    lines = text[: len(text) // 2].splitlines()
    pool = [tokenizer.encode(line) for line in lines if len(line) > 20][::37][:16]  # prompts of varied lengths
    print(
        f"Model: {folder} ({model.config.preset}, {model.num_parameters():,} parameters, d_model {model.config.d_model})"
    )
    print(format_table(
        f"Batched generation: total tokens/s, {args.new_tokens} new tokens per prompt, fp32",
        ["prompts", "batched tok/s", "one at a time tok/s", "speed-up"],
        batch_rows(model, pool, args.new_tokens, args.repeats),
    ))  # fmt: skip
    models = variants(model)
    losses = {name: val_loss(m, held_out, 128, args.val_windows) for name, m in models.items()}
    rows = decode_rows(models, pool[0], args.new_tokens, args.repeats)
    for row in rows:
        row += [f"{losses[row[0]]:.4f}", f"{losses[row[0]] - losses['fp32']:+.4f}"]
    print(format_table(
        "Weights: one prompt, decode tokens/s, and val loss (nats/token) on held-out text",
        ["weights", "tok/s", "vs fp32", "val loss", "change"],
        rows,
    ))  # fmt: skip
    if args.speed_preset:
        vocab = model.config.vocab_size
        big = ApertisModel(ModelConfig.from_preset(args.speed_preset, vocab_size=vocab)).eval()
        print(format_table(
            f"Weights: {args.speed_preset} (untrained, {big.num_parameters():,} parameters), decode tokens/s",
            ["weights", "tok/s", "vs fp32"],
            decode_rows(variants(big), pool[0], args.new_tokens, args.repeats),
        ))  # fmt: skip
    report_machine({**machine, "load at end": describe_machine("cpu").get("load average (1/5/15 min)", "")}, {}, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
