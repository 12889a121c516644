"""`apertis import`: a Hugging Face Llama-format folder (config.json, *.safetensors, tokenizer.json) as an
Apertis bundle."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "import",
        help="turn a Hugging Face Llama folder into a model bundle",
        description=(
            "Import a local Hugging Face Llama-format folder (config.json with model_type llama, "
            "model.safetensors or sharded *.safetensors with model.safetensors.index.json, and a byte-level "
            "BPE tokenizer.json) as an Apertis bundle for `apertis generate`, `apertis chat` and the studio. "
            "A .zip of such a folder works too. Apertis' special tokens are added to the tokenizer if it lacks "
            "them; the model chats in the Apertis format. Nothing is downloaded and transformers is not needed."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="the Llama-format folder (or a .zip of it)")
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="the bundle folder to write (replaced if it exists)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..llama_import import import_llama, import_llama_zip

    source = Path(args.path)
    if source.is_file() and source.suffix.lower() == ".zip":
        out = Path(args.out)
        if out.exists():
            raise FileExistsError(17, "the folder to import into already exists", str(out))
        left_out = import_llama_zip(source, out)
        note = f" (left out {len(left_out)} files a bundle does not need)" if left_out else ""
        print(f"imported {source} -> {out}{note}")
        return 0
    out = import_llama(source, args.out)
    print(f"imported {source} -> {out}")
    return 0
