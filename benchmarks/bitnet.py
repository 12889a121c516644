"""`python -m benchmarks.bitnet`: BitNet b1.58 block linears (model.bitnet) against the full-precision model.

Character-level tinyshakespeare (byte-level tokenizer, 90/10 split, loss in nats per character), the
apertis-nano preset at seq 128. The two models start from the same weights and train in turns in one
process on the same batches (AdamW, linear warm-up then a constant rate), each timing only its own steps,
so machine load hits both alike. Then:

1. validation loss at equal steps (every --eval-every steps) and the training time per step;
2. bundle size: model.safetensors of the fp32 bundle, of the BitNet bundle (fp32 latent weights, what
   training checkpoints hold) and of `apertis export --format bitnet` (ternary weights 2 bits each);
3. CPU decode: tokens/s of `model.step` after a prompt, batch 1, the fp32 bundle against the packed one as
   `load_bundle` gives it, timed side by side (benchmarks.common.time_interleaved), and the weight bytes each
   holds in memory while it decodes.

`--quick` runs toy sizes in seconds (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    add_race_arguments,
    describe_machine,
    format_bytes,
    format_table,
    lm_train_step,
    parse_race_arguments,
    report_machine,
    tensor_bytes,
    time_interleaved,
)

QUICK_MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 2, "sla_chunk_size": 8}


@dataclass
class Trainee:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr: float
    steps: int = 0
    step_seconds: list[float] = field(default_factory=list)  # its own training steps only
    val: dict[int, float] = field(default_factory=dict)  # step -> validation loss


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bitnet", description=__doc__.splitlines()[0])
    add_race_arguments(parser, warmup=30, val_windows=32)
    parser.add_argument("--preset", default="apertis-nano")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each model")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--bitnet-lr", type=float, help="peak rate of the BitNet model (default --lr)")
    parser.add_argument("--prompt", type=int, default=64, help="decode: prompt tokens before the timed steps")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode: steps per timed round")
    parser.add_argument("--repeats", type=int, default=7, help="decode: timed rounds per model")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_race_arguments(parser, argv)
    if args.quick:
        args.steps, args.eval_every, args.batch, args.seq_len, args.warmup = 4, 2, 2, 32, 1
        args.val_windows, args.prompt, args.decode_tokens, args.repeats = 2, 8, 4, 2
    return args


def build(name: str, bitnet: bool, lr: float, args, vocab_size: int) -> Trainee:
    from apertis_core import ApertisModel, ModelConfig

    size = QUICK_MODEL if args.quick else {}
    cfg = ModelConfig.from_preset(args.preset, **size, vocab_size=vocab_size, max_seq_len=args.seq_len, bitnet=bitnet)
    torch.manual_seed(args.seed)  # the same initial weights for both: BitNet keeps the parameter names
    model = ApertisModel(cfg)
    return Trainee(name, model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1), lr)


def train_step(trainee: Trainee, ids: torch.Tensor, args) -> None:
    lr = trainee.lr * min(1.0, (trainee.steps + 1) / args.warmup)
    trainee.step_seconds.append(lm_train_step(trainee.model, trainee.optimizer, ids, lr))
    trainee.steps += 1


def batch_at(train_ids: torch.Tensor, step: int, args) -> torch.Tensor:
    """The step's batch of seq_len + 1 windows: the same for both models."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=generator)
    return torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def val_loss(model, windows: torch.Tensor) -> float:
    model.eval()
    losses = [
        F.cross_entropy(model(w[:, :-1]).logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        for w in windows.split(8)
    ]
    return float(sum(losses) / windows[:, 1:].numel())


def train_side_by_side(trainees: list[Trainee], train_ids, val, args) -> None:
    for step in range(args.steps):
        order = trainees if step % 2 == 0 else trainees[::-1]  # neither always runs first
        for trainee in order:
            train_step(trainee, batch_at(train_ids, step, args), args)
            if trainee.steps % args.eval_every == 0 or trainee.steps == args.steps:
                trainee.val[trainee.steps] = val_loss(trainee.model, val)


def weight_bytes_in_memory(model) -> int:
    """Parameters and buffers, plus the ternary codes a BitNet model keeps beside its weights for decoding."""
    from apertis_core.model.bitnet import BitLinear

    caches = [m.__dict__.get("_ternary_cache", {}) for m in model.modules() if isinstance(m, BitLinear)]
    caches += [
        m.quantise_weight.cache for m in model.modules() if hasattr(getattr(m, "quantise_weight", None), "cache")
    ]
    kept = sum(tensor_bytes(value) for cache in caches for _, value in cache.values())
    return tensor_bytes([*model.parameters(), *model.buffers()]) + kept


def decode_cases(models: dict, prompt: torch.Tensor, tokens: int) -> dict:
    """Per model, a function that decodes `tokens` greedy steps on from its state after the prompt."""
    cases = {}
    for name, model in models.items():
        with torch.no_grad():
            out = model(prompt, state=model.init_state(1))
        holder = {"state": out.state, "token": out.logits[:, -1].argmax(-1)}

        def run(model=model, holder=holder):
            with torch.no_grad():
                for _ in range(tokens):
                    logits, holder["state"] = model.step(holder["token"], holder["state"])
                    holder["token"] = logits.argmax(-1)

        cases[name] = run
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from apertis_core.bundle import load_bundle, save_bundle
    from apertis_core.tokenizer import Tokenizer

    machine_start = describe_machine("cpu")
    tokenizer = Tokenizer.byte_level()
    text = args.corpus.read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    train_ids = torch.tensor(tokenizer.encode(text[:split]))
    held_out = torch.tensor(tokenizer.encode(text[split:]))
    val = held_out[: args.val_windows * (args.seq_len + 1)].view(args.val_windows, args.seq_len + 1)
    fp = build("fp32", False, args.lr, args, tokenizer.vocab_size)
    bit = build("bitnet", True, args.bitnet_lr or args.lr, args, tokenizer.vocab_size)
    train_side_by_side([fp, bit], train_ids, val, args)
    result: dict = {"argv": argv if argv is not None else sys.argv[1:]}
    rows = [
        [step, f"{fp.val[step]:.4f}", f"{bit.val[step]:.4f}", f"{bit.val[step] - fp.val[step]:+.4f}"] for step in fp.val
    ]
    fp_step, bit_step = statistics.median(fp.step_seconds), statistics.median(bit.step_seconds)
    rows.append(["median s/step", f"{fp_step:.3f}", f"{bit_step:.3f}", f"x{bit_step / fp_step:.2f}"])
    result["val_loss"] = {"fp32": fp.val, "bitnet": bit.val}
    result["train_step_seconds"] = {"fp32": fp_step, "bitnet": bit_step}
    title = (
        f"1. Validation loss at equal steps ({args.preset}, seq {args.seq_len}, batch {args.batch}, "
        f"lr {fp.lr} / bitnet {bit.lr})"
    )
    print(format_table(title, ["step", "fp32", "bitnet", "bitnet - fp32"], rows), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            "fp32": Path(tmp) / "fp32",
            "bitnet (latent fp32)": Path(tmp) / "bit",
            "bitnet packed": Path(tmp) / "pk",
        }
        save_bundle(folders["fp32"], fp.model, tokenizer)
        save_bundle(folders["bitnet (latent fp32)"], bit.model, tokenizer)
        save_bundle(folders["bitnet packed"], bit.model, tokenizer, pack_ternary=True)
        sizes = {name: (folder / "model.safetensors").stat().st_size for name, folder in folders.items()}
        result["bundle_bytes"] = sizes
        rows = [[name, f"{size:,}", format_bytes(size), f"{sizes['fp32'] / size:.2f}x"] for name, size in sizes.items()]
        print("\n" + format_table("2. model.safetensors size", ["bundle", "bytes", "size", "fp32 / this"], rows))

        models = {"fp32": load_bundle(folders["fp32"])[0], "bitnet packed": load_bundle(folders["bitnet packed"])[0]}
    prompt = val[:1, : args.prompt]
    with torch.no_grad():
        drift = (models["bitnet packed"](prompt).logits - bit.model.eval()(prompt).logits).abs().max().item()
    timings = time_interleaved(decode_cases(models, prompt, args.decode_tokens), args.repeats)
    rows = []
    for name, timing in timings.items():
        per_token = timing.median / args.decode_tokens
        result.setdefault("decode", {})[name] = {"seconds_per_token": per_token, "rounds": timing.seconds}
        rows.append(
            [name, f"{1 / per_token:.1f}", f"{timing.spread:.0%}", format_bytes(weight_bytes_in_memory(models[name]))]
        )
    ratio = timings["fp32"].median / timings["bitnet packed"].median
    rows.append(["packed / fp32", f"x{ratio:.2f}", "", ""])
    result["decode_ratio"], result["packed_logit_drift"] = ratio, drift
    print("\n" + format_table(
        f"3. CPU decode, batch 1, after a {args.prompt}-token prompt ({args.threads} thread(s))",
        ["model", "tokens/s", "spread", "weights in memory while decoding"], rows,
    ))  # fmt: skip
    packed_val = result["packed_val_loss"] = val_loss(models["bitnet packed"], val)
    print(
        f"\nthe packed bundle as loaded: val loss {packed_val:.4f} (trained BitNet model {bit.val[args.steps]:.4f}), "
        f"logits on the prompt within {drift:.2e} of the trained model's"
    )
    print(f"\nmachine at start: load average {machine_start.get('load average (1/5/15 min)', '?')}")
    report_machine(describe_machine("cpu"), result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
