"""`apertis bench model` (or `python -m benchmarks.model`): the Apertis parts against their Transformer
counterparts, measured side by side in one run on the current machine.

Four tables, each with its targets (for a 2-core CPU) next to the measured values:

1. SLA core (`chunked_linear_attention`, per-head log decay) vs `F.scaled_dot_product_attention`
   (causal), forward + backward, B 8, 4 heads, head dim 64, T = 256, 1024, 4096.
2. Whole-model training tokens/s (forward + backward + AdamW step) of an apertis preset vs the transformer
   preset with the same width and as many layers as match its total parameter count.
3. Decode time per token (`model.step` after a prompt run through the parallel form; the step updates
   the apertis state in place, so the rounds step on from it) and state/cache bytes at context 128, 1024,
   8192.
4. The AES (MoE) layer, forward + backward, vs a dense SwiGLU FFN whose hidden width is the active
   experts' summed width (shared + top-k), i.e. the same active FLOPs.

`--quick` runs every table at toy sizes in a few seconds (the smoke test uses it); the numbers are then
meaningless. Results and the exact command are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    describe_machine,
    format_bytes,
    format_seconds,
    format_table,
    synchronizer,
    tensor_bytes,
    time_interleaved,
)

SECTIONS = ("attention", "train", "decode", "moe")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Targets, set for a 2-core CPU: SLA vs SDPA, decode growth and MoE cost; training tokens/s and decode time
# against the matched transformer.
SLA_TARGETS = {256: 1.0, 1024: 2.5, 4096: 5.0}  # minimum SDPA time / SLA time
DECODE_TARGET = 1.1  # maximum apertis per-token time at the longest context / at the shortest
MOE_TARGET = 1.2  # maximum AES time / dense FFN time
TRAIN_TARGETS = {256: 1.0, 1024: 1.5, 4096: 3.0}  # minimum apertis tokens/s / transformer tokens/s
DECODE_VS_TRANSFORMER = {128: 1.0, 8192: 0.3}  # maximum apertis time per token / transformer's


@dataclass
class Sizes:
    """Everything the run measures; `--quick` swaps in toy sizes."""

    attn_lengths: tuple[int, ...] = (256, 1024, 4096)
    attn_batch: int = 8
    attn_heads: int = 4
    attn_head_dim: int = 64
    train_lengths: tuple[int, ...] = (256, 1024, 4096)
    train_tokens: int = 8192  # tokens per optimizer step; batch = train_tokens // T
    decode_contexts: tuple[int, ...] = (128, 1024, 8192)
    decode_steps: int = 16  # steps timed together per round (from the same prompt state)
    moe_presets: tuple[str, ...] = ("apertis-nano", "apertis-small")
    moe_batch: int = 8
    moe_length: int = 512
    model_overrides: dict = field(default_factory=dict)  # applied to both presets before matching


QUICK = Sizes(
    attn_lengths=(16, 48),
    attn_batch=1,
    attn_heads=2,
    attn_head_dim=8,
    train_lengths=(16, 32),
    train_tokens=64,
    decode_contexts=(8, 32),
    decode_steps=2,
    moe_presets=("apertis-nano",),
    moe_batch=2,
    moe_length=16,
    model_overrides={"d_model": 32, "n_heads": 2, "n_layers": 2, "vocab_size": 64, "sla_chunk_size": 16},
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="apertis bench model",
        description="Speed and memory of the Apertis parts vs their Transformer counterparts, side by side.",
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes, one round: checks the benchmark runs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="fp32, or bf16/fp16: inputs of table 1 in that dtype, autocast for tables 2-4",
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument(
        "--repeats", type=int, default=0, help="timed rounds per case (default 7, training half that; 1 with --quick)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--chunk", type=int, default=0, help="SLA chunk size (default: the presets' sla_chunk_size)")
    parser.add_argument("--apertis", default="apertis-nano", help="apertis preset for tables 2 and 3")
    parser.add_argument(
        "--transformer",
        default="transformer-nano",
        help="transformer preset for tables 2 and 3; its n_layers is set to match parameters",
    )
    parser.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return args


def verdict(device, ok: bool, measured: str, target: str, shortfall: float) -> str:
    """The status cell; the targets are for a 2-core CPU, so other devices are not judged."""
    if torch.device(device).type != "cpu":
        return "(CPU target)"
    return f"met ({measured} vs {target})" if ok else f"MISSED ({measured} vs {target}, off by {shortfall:.0%})"


# ---- 1. SLA core vs SDPA ---------------------------------------------------------------------------------
def _attention_cases(shape, device, dtype, chunk: int) -> dict:
    """Forward + backward of SLA and of causal SDPA on the same random q, k, v of `shape` (B, H, T, D)."""
    from apertis_core.model.sla import chunked_linear_attention

    q, k, v = (torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    # A model-like decay: g = -exp(A) * softplus(.) with per-head A in [1, 16], softplus ~ U(0, 0.1)
    rates = torch.linspace(1.0, 16.0, shape[1], device=device)[:, None]
    log_decay = (-rates * 0.1 * torch.rand(shape[:3], device=device)).requires_grad_()
    grad = torch.randn(shape, device=device, dtype=dtype)

    def sla():
        out, _ = chunked_linear_attention(q, k, v, log_decay, chunk)
        out.backward(grad)

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    return {"sla": sla, "sdpa": sdpa}


def bench_attention(sizes: Sizes, device, dtype, repeats: int, chunk: int, results: dict) -> str:
    sync = synchronizer(device)
    rows = []
    for length in sizes.attn_lengths:
        shape = (sizes.attn_batch, sizes.attn_heads, length, sizes.attn_head_dim)
        cases = _attention_cases(shape, device, dtype, chunk)
        timings = time_interleaved(cases, repeats, sync=sync)
        ratio = timings["sdpa"].median / timings["sla"].median
        target = SLA_TARGETS.get(length)
        status = (
            "—"
            if target is None
            else verdict(device, ratio >= target, f"{ratio:.2f}x", f">= {target:g}x", 1 - ratio / target)
        )
        rows.append(
            [
                length,
                format_seconds(timings["sla"].median),
                format_seconds(timings["sdpa"].median),
                f"{ratio:.2f}x",
                f">= {target:g}x" if target else "—",
                status,
            ]
        )
        results.setdefault("attention", []).append(
            {"T": length, "sla_s": timings["sla"].seconds, "sdpa_s": timings["sdpa"].seconds, "ratio": ratio}
        )
    title = (
        f"1. SLA core vs causal SDPA, forward + backward (B {sizes.attn_batch}, {sizes.attn_heads} heads, "
        f"head dim {sizes.attn_head_dim}, SLA chunk {chunk}, {_dtype_name(dtype)})"
    )
    return format_table(title, ["T", "SLA", "SDPA", "SDPA / SLA", "target", "status"], rows)


# ---- 2-3. whole models ------------------------------------------------------------------------------------
def matched_configs(sizes: Sizes, apertis: str, transformer: str, chunk: int, max_len: int):
    """The apertis config and the transformer config of the same width whose depth best matches its
    total parameter count."""
    from apertis_core import ApertisModel, ModelConfig

    overrides = dict(sizes.model_overrides, max_seq_len=max_len)
    if chunk:
        overrides["sla_chunk_size"] = chunk
    a_cfg = ModelConfig.from_preset(apertis, **overrides)
    with torch.device("meta"):
        target = ApertisModel(a_cfg).num_parameters()
    t_overrides = {key: value for key, value in overrides.items() if key != "sla_chunk_size"}
    t_overrides.update(d_model=a_cfg.d_model, n_heads=a_cfg.n_heads)
    base = ModelConfig.from_preset(transformer, **t_overrides)

    def count(layers: int) -> int:
        with torch.device("meta"):  # shapes only: no memory, no init
            return ApertisModel(base.replace(n_layers=layers, nope_layers=[])).num_parameters()

    best = min(range(1, 4 * a_cfg.n_layers + 1), key=lambda layers: abs(count(layers) - target))
    return a_cfg, ModelConfig.from_preset(transformer, **{**t_overrides, "n_layers": best})


def describe_pair(models: dict) -> str:
    lines = []
    for name, model in models.items():
        cfg = model.config
        lines.append(
            f"- {name}: {cfg.preset} (d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads), "
            f"{model.num_parameters() / 1e6:.2f} M parameters, {model.num_parameters(active_only=True) / 1e6:.2f} M active"
        )
    counts = [model.num_parameters() for model in models.values()]
    lines.append(f"- parameter counts differ by {abs(counts[0] - counts[1]) / max(counts):.1%}")
    return "\n".join(lines)


def _autocast(device, dtype):
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def _train_step(model, optimizer, ids, device, dtype):
    """One optimizer step on next-token prediction of ids (B, T + 1)."""

    def run():
        with _autocast(device, dtype):
            out = model(ids[:, :-1])
            loss = F.cross_entropy(out.logits.flatten(0, 1).float(), ids[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def bench_train(sizes: Sizes, device, dtype, repeats: int, configs, results: dict) -> str:
    from apertis_core import ApertisModel

    sync = synchronizer(device)
    torch.manual_seed(0)
    models = {"apertis": ApertisModel(configs[0]).to(device), "transformer": ApertisModel(configs[1]).to(device)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    vocab = configs[0].vocab_size
    rows = []
    for length in sizes.train_lengths:
        batch = max(1, sizes.train_tokens // length)
        ids = torch.randint(0, vocab, (batch, length + 1), device=device)
        cases = {name: _train_step(models[name], optimizers[name], ids, device, dtype) for name in models}
        timings = time_interleaved(cases, repeats, sync=sync)
        speed = {name: batch * length / timing.median for name, timing in timings.items()}
        ratio = speed["apertis"] / speed["transformer"]
        target = TRAIN_TARGETS.get(length)
        status = (
            "—"
            if target is None
            else verdict(device, ratio >= target, f"{ratio:.2f}x", f">= {target:g}x", 1 - ratio / target)
        )
        rows.append(
            [
                length,
                batch,
                f"{speed['apertis']:,.0f}",
                f"{speed['transformer']:,.0f}",
                f"{ratio:.2f}x",
                status,
            ]
        )
        results.setdefault("train", []).append(
            {"T": length, "batch": batch, **{f"{k}_s": t.seconds for k, t in timings.items()}}
        )
    title = f"2. Training tokens/s, forward + backward + AdamW step ({_dtype_name(dtype)}, {sizes.train_tokens} tokens per step)"
    table = format_table(
        title, ["T", "batch", "apertis tok/s", "transformer tok/s", "apertis / transformer", "target"], rows
    )
    return table + "\n\n" + describe_pair(models)


def bench_decode(sizes: Sizes, device, dtype, repeats: int, configs, results: dict) -> str:
    from apertis_core import ApertisModel

    sync = synchronizer(device)
    torch.manual_seed(0)
    models = {
        "apertis": ApertisModel(configs[0]).to(device).eval(),
        "transformer": ApertisModel(configs[1]).to(device).eval(),
    }
    vocab = configs[0].vocab_size
    cases, state_bytes = {}, {}
    with torch.inference_mode(), _autocast(device, dtype):
        for context in sizes.decode_contexts:
            prompt = torch.randint(0, vocab, (1, context), device=device)
            token = torch.randint(0, vocab, (1,), device=device)
            for name, model in models.items():
                state = model(prompt, state=model.init_state(1)).state  # the parallel form continues from a state
                state_bytes[name, context] = tensor_bytes(model.step(token, state)[1])

                def run(model=model, state=state, token=token):
                    model.step(token, state)

                cases[name, context] = run
        timings = time_interleaved(cases, repeats, sync=sync, calls_per_round=sizes.decode_steps)
    first = sizes.decode_contexts[0]
    rows = []
    for context in sizes.decode_contexts:
        a_ratio = timings["apertis", context].median / timings["apertis", first].median
        vs = timings["apertis", context].median / timings["transformer", context].median
        vs_target = DECODE_VS_TRANSFORMER.get(context)
        vs_status = (
            "—"
            if vs_target is None
            else verdict(device, vs <= vs_target, f"{vs:.2f}x", f"<= {vs_target:g}x", vs / vs_target - 1)
        )
        constant = state_bytes["apertis", context] == state_bytes["apertis", first]
        ok = a_ratio <= DECODE_TARGET and constant
        status = verdict(
            device,
            ok,
            f"{a_ratio:.2f}x, state {'constant' if constant else 'GROWS'}",
            f"<= {DECODE_TARGET}x, constant",
            max(a_ratio / DECODE_TARGET - 1, 0),
        )
        rows.append(
            [
                context,
                format_seconds(timings["apertis", context].median),
                format_seconds(timings["transformer", context].median),
                f"{vs:.2f}x",
                vs_status,
                f"{a_ratio:.2f}x",
                format_bytes(state_bytes["apertis", context]),
                format_bytes(state_bytes["transformer", context]),
                status if context != first else "(reference)",
            ]
        )
        results.setdefault("decode", []).append(
            {
                "context": context,
                **{f"{name}_s_per_token": timings[name, context].seconds for name in models},
                **{f"{name}_state_bytes": state_bytes[name, context] for name in models},
            }
        )
    title = f"3. Decode per token after a prompt of the given context, batch 1 ({_dtype_name(dtype)})"
    header = [
        "context",
        "apertis / token",
        "transformer / token",
        "apertis / transformer",
        "target",
        f"apertis vs context {first}",
        "apertis state",
        "transformer KV cache",
        f"target (apertis at each context vs {first})",
    ]
    return format_table(title, header, rows) + "\n\n" + describe_pair(models)


# ---- 4. AES vs dense FFN ---------------------------------------------------------------------------------
def _forward_backward(layer, x, device, dtype):
    """Forward + backward of a layer returning y or (y, aux_loss), with a fixed random output gradient."""
    grad = torch.randn_like(x)

    def run():
        with _autocast(device, dtype):
            out = layer(x)
        if isinstance(out, tuple):  # AES: (y, aux_loss)
            torch.autograd.backward([out[0], out[1]], [grad.to(out[0].dtype), torch.ones_like(out[1])])
        else:
            out.backward(grad.to(out.dtype))

    return run


def bench_moe(sizes: Sizes, device, dtype, repeats: int, results: dict) -> str:
    from apertis_core import ModelConfig
    from apertis_core.model.experts import AdaptiveExpertSystem
    from apertis_core.model.layers import GatedFFN

    sync = synchronizer(device)
    rows = []
    for preset in sizes.moe_presets:
        overrides = {k: v for k, v in sizes.model_overrides.items() if k in ("d_model", "n_heads", "vocab_size")}
        cfg = ModelConfig.from_preset(preset, **overrides)
        torch.manual_seed(0)
        layer = AdaptiveExpertSystem(cfg).to(device)
        layer.reset_parameters(cfg.init_std, cfg.init_std)
        width = cfg.expert_width()
        active = width * (cfg.n_shared_experts + cfg.moe_top_k)
        dense = GatedFFN(cfg.d_model, active, cfg.ffn_type).to(device)
        x = torch.randn(sizes.moe_batch, sizes.moe_length, cfg.d_model, device=device, requires_grad=True)
        cases = {"moe": _forward_backward(layer, x, device, dtype), "dense": _forward_backward(dense, x, device, dtype)}
        timings = time_interleaved(cases, repeats, sync=sync)
        ratio = timings["moe"].median / timings["dense"].median
        tokens = sizes.moe_batch * sizes.moe_length
        experts = f"{cfg.n_experts} x {width} (top-{cfg.moe_top_k}) + {cfg.n_shared_experts} shared"
        rows.append(
            [
                f"{preset} (d {cfg.d_model})",
                tokens,
                experts,
                active,
                format_seconds(timings["moe"].median),
                format_seconds(timings["dense"].median),
                f"{ratio:.2f}x",
                verdict(device, ratio <= MOE_TARGET, f"{ratio:.2f}x", f"<= {MOE_TARGET}x", ratio / MOE_TARGET - 1),
            ]
        )
        results.setdefault("moe", []).append(
            {
                "preset": preset,
                "tokens": tokens,
                "moe_s": timings["moe"].seconds,
                "dense_s": timings["dense"].seconds,
                "ratio": ratio,
            }
        )
    title = (
        f"4. AES (MoE) layer vs dense SwiGLU FFN of the same active FLOPs, forward + backward ({_dtype_name(dtype)})"
    )
    header = ["layer", "tokens", "experts", "dense hidden", "AES", "dense FFN", "AES / dense", "target"]
    return format_table(title, header, rows)


def _dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    repeats = args.repeats or (1 if args.quick else 7)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    sections = args.only.split(",")
    from apertis_core import ModelConfig

    chunk = args.chunk or sizes.model_overrides.get("sla_chunk_size") or ModelConfig().sla_chunk_size
    machine = describe_machine(device)
    print(format_table("Machine", ["", ""], machine.items()), flush=True)
    print(
        f"\ncommand: python -m benchmarks.model {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        flush=True,
    )
    results: dict = {"machine": machine, "argv": argv if argv is not None else sys.argv[1:]}

    def emit(text: str) -> None:
        print("\n" + text, flush=True)

    if "attention" in sections:
        emit(bench_attention(sizes, device, dtype, repeats, chunk, results))
    if "train" in sections or "decode" in sections:
        longest = max(sizes.train_lengths + sizes.decode_contexts) + 1
        configs = matched_configs(sizes, args.apertis, args.transformer, args.chunk, longest)
        if "train" in sections:
            emit(bench_train(sizes, device, dtype, max(1, (repeats + 1) // 2), configs, results))
        if "decode" in sections:
            emit(bench_decode(sizes, device, dtype, repeats, configs, results))
    if "moe" in sections:
        emit(bench_moe(sizes, device, dtype, repeats, results))
    if hasattr(os, "getloadavg"):  # other processes on the machine distort timings: say how busy it was
        results["load average at the end"] = " / ".join(f"{load:.2f}" for load in os.getloadavg())
        print(f"\nload average (1/5/15 min) at the end: {results['load average at the end']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
