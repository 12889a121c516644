"""`apertis export`: a self-contained model folder from a checkpoint, a run or a bundle."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="write a self-contained model bundle",
        description=(
            "Export a model. PATH may be a checkpoint folder, a run folder (its newest checkpoint or final "
            "bundle is used) or a bundle. --format hf-llama writes a Hugging Face LlamaForCausalLM folder "
            "(transformer-* presets only)."
        ),
    )
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint, run or bundle folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (replaced if it exists)")
    parser.add_argument(
        "--format", default="apertis", choices=("apertis", "hf-llama"), help="bundle format (default apertis)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export_model, find_model_dir

    source = find_model_dir(args.checkpoint)
    out = export_model(source, args.out, args.format)
    print(f"exported {source} -> {out} ({args.format} format)")
    return 0
