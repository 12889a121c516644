"""`apertis export`: a self-contained model folder from a checkpoint, a run or a bundle."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="write a self-contained model bundle",
        description=(
            "Export a model. PATH may be a checkpoint folder, a run folder (its newest checkpoint or final "
            "bundle is used) or a bundle. --format hf writes a Hugging Face transformers folder for any preset "
            "(AutoModelForCausalLM with trust_remote_code=True; needs apertis-studio and transformers where it is "
            "loaded). --format hf-llama writes a Hugging Face LlamaForCausalLM folder "
            "(transformer-* presets only). --format gguf writes one llama.cpp GGUF file (transformer-* presets "
            "only; needs `pip install gguf`), f16 or --gguf-type q8_0. --format bitnet writes an Apertis bundle "
            "with a BitNet model's (model.bitnet=true) ternary weights packed 2 bits each; it loads like any bundle."
        ),
    )
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint, run or bundle folder")
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the folder (a .gguf file for --format gguf) to write; replaced if it exists",
    )
    parser.add_argument(
        "--format",
        default="apertis",
        choices=("apertis", "hf", "hf-llama", "gguf", "bitnet"),
        help="bundle format (default apertis)",
    )
    parser.add_argument(
        "--gguf-type",
        default="f16",
        choices=("f16", "q8_0"),
        help="GGUF weight type (default f16; q8_0 is ~half the size)",
    )
    parser.add_argument(
        "--quantize",
        default="none",
        choices=("none", "int8"),
        help="int8 (--format apertis): linear weights stored as int8 with per-channel scales; the bundle runs with "
        "CPU int8 kernels (see docs/INFERENCE.md)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="fold a LoRA adapter (a LoRA run's checkpoint or unmerged final/) into a plain bundle with the same "
        "outputs; without it the apertis format exports the adapter as an adapter (other formats always merge)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export_model, find_model_dir

    source = find_model_dir(args.checkpoint)
    out = export_model(
        source, args.out, args.format, gguf_type=args.gguf_type, merge=args.merge, quantize=args.quantize
    )
    kind = f"gguf {args.gguf_type}" if args.format == "gguf" else args.format
    kind += f", {args.quantize} weights" if args.quantize != "none" else ""
    print(f"exported {source} -> {out} ({kind} format)")
    return 0
