"""`apertis bench NAME [ARGS...]`: the benchmarks in the repository's benchmarks/ folder.

Arguments after the benchmark name go to it unchanged (`apertis bench train --help` shows its own help).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = {
    "model": "speed and memory of the model presets (benchmarks/model.py)",
    "train": "validation loss reached in a fixed time on tinyshakespeare (benchmarks/train.py)",
    "vqa": "visual Q&A accuracy on generated shapes scenes after a timed run (benchmarks/vqa.py)",
    "generate": "batched generation and int8 weights against one prompt at a time in fp32 (benchmarks/generate.py)",
    "looped": "looped depth: 1, 2, 4 loops at equal steps and equal wall clock (benchmarks/looped.py)",
    "bitnet": "BitNet b1.58 layers against full precision: loss, size, speed (benchmarks/bitnet.py)",
    "curriculum": "a context-length curriculum against full length throughout (benchmarks/curriculum.py)",
    "lora": "LoRA against full fine-tuning: trainable parameters, sizes, step time (benchmarks/lora.py)",
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="run the benchmarks (see benchmarks/)",
        description="Run a benchmark; everything after its name is passed to it (try `apertis bench train --help`).",
    )
    bench_sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, text in BENCHMARKS.items():
        # add_help=False: --help after the name belongs to the benchmark's own parser
        bench_sub.add_parser(name, help=text, add_help=False).set_defaults(run=run, passthrough=True)


def run(args: argparse.Namespace) -> int:
    module = _import_benchmark(args.benchmark)
    try:
        result = module.main(list(args.extra))
    except SystemExit as exit_:  # a benchmark's argparse --help or usage error
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    return result if isinstance(result, int) else 0


def _import_benchmark(name: str):
    """benchmarks.<name>, from the import path or from the source checkout this package lives in."""
    module_name = f"benchmarks.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name not in ("benchmarks", module_name):
            raise  # the benchmark itself lacks a dependency: show that error, not ours
    repo = Path(__file__).resolve().parents[2]
    if (repo / "benchmarks" / f"{name}.py").is_file():
        sys.path.insert(0, str(repo))
        return importlib.import_module(module_name)
    if (repo / "benchmarks").is_dir():
        raise ValueError(f"{repo / 'benchmarks'} has no {name}.py: this checkout lacks the '{name}' benchmark")
    raise ValueError(
        f"the benchmarks are not installed: `apertis bench {name}` needs the benchmarks/ folder of the "
        "Apertis source repository; run it from a checkout (git clone, then `apertis bench` in it)"
    )
