"""`apertis bench vqa`: Sort-of-CLEVR-style visual Q&A learned from scratch within a time budget, beside the
classic baselines.

Generates the built-in shapes set (deterministic by seed), trains each chosen model on its train.jsonl for
`--minutes` (the Apertis recipe below, and the CNN+MLP and Relation Network baselines of Santoro et al. 2017
from benchmarks/vqa_baselines.py on the same questions), then scores answers on the held-out scenes of
test.jsonl: greedy exact match for the model, the top class for the baselines. Scores are given separately
for non-relational and relational questions and per question type, beside chance and the most common answer.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

# Published anchors for Sort-of-CLEVR (Santoro et al. 2017): Relation Networks 99% / 89%, CNN+MLP ~66%.
TARGETS = {"nonrel": 0.95, "rel": 0.75}  # the 30-minute CPU targets
MODELS = ("apertis", "cnn_mlp", "rn")

# The CPU recipe: an SLA language model that re-reads the picture through gated cross-attention in every block
# (docs/MULTIMODAL.md), over a ViT with a conv stem at 8 px patches (an 8 x 8 grid for a 64 px scene; each
# token sees a little past its patch, so an object cut by a patch border is still whole). The encoder is
# trained from scratch (no downloaded weights) but held frozen for the first steps: trained from the start,
# it collapsed to features that say which shapes a scene holds but not where; random conv features keep
# colour and shape apart until the language side has learned to look the named object up.
RECIPE = {
    "model": {
        "preset": "apertis-nano",
        "d_model": 128,
        "n_heads": 16,  # 8 wide: narrow heads find the named object among 64 patches (docs/MULTIMODAL.md)
        "n_layers": 4,
        "n_experts": 0,
        "image_encoder": "vit",
        "image_stem": "conv",
        "image_patch_size": 8,
        "image_max_patches": 64,
        "image_encoder_layers": 1,
        "cross_attn_every": 1,
        "cross_attn_pos": True,  # patch places in the cross-attention, held at zero until the lookup has formed
        "max_seq_len": 512,
    },
    "data": {"seq_len": 512, "vocab_size": 1024, "val_fraction": 0.01, "image_augment": False},
    "train": {
        "batch_size": 8,  # chats: 8 scenes' captions and 160 questions a step
        "lr": 2e-3,
        "encoder_frozen_steps": 600,
        "encoder_lr_scale": 0.1,
        "places_frozen_steps": 1000,
        "warmup_steps": 50,
        "schedule": "wsd",
        "decay_fraction": 0.3,
        "eval_every": 0,
        "eval_batches": 8,
        "log_every": 25,
        "save_every": 0,
        "precision": "auto",
    },
}


def prepare_data(folder: Path, scenes: int, seed: int, curriculum: bool = False, ask: tuple[str, ...] = ()) -> Path:
    """The shapes set in `folder` (reused when an earlier run wrote the same one); `ask`: generate_shapes'."""
    from apertis_core.data.shapes import generate_shapes

    summary = folder / "summary.json"
    if summary.is_file():
        known = json.loads(summary.read_text())
        same = known.get("seed") == seed and sum(known["scenes"].values()) == scenes and known.get("caption_turns")
        # A set made by hand with other scenes (generate_shapes' n_objects, image_size) is not this benchmark's.
        same = same and known.get("n_objects", 6) == 6 and known.get("image_size", 64) == 64
        if same and known.get("curriculum", False) == curriculum and known.get("ask", []) == list(ask):
            return folder
    # conversations: one image encoding for a caption and 20 questions; curriculum: easy questions listed first
    generate_shapes(folder, n=scenes, seed=seed, conversations=True, curriculum=curriculum, ask=ask)
    return folder


def held_out_rows(test_file: Path) -> list[dict]:
    return [json.loads(line) for line in test_file.read_text().splitlines() if line.strip()]


def score(bundle: Path, test_file: Path) -> dict:
    """Exact-match accuracy on test_file, overall and by kind / question type."""
    from apertis_core import load_bundle
    from apertis_core.data import load_dataset
    from apertis_core.evaluation import exact_match
    from apertis_core.training.hardware import pick_device

    rows = held_out_rows(test_file)
    records, report = load_dataset(test_file)
    if len(records) != len(rows):
        raise RuntimeError(f"{test_file}: {len(rows) - len(records)} records were skipped:\n{report.to_text()}")
    if any(r.messages[-1]["content"] != row["messages"][-1]["content"] for r, row in zip(records, rows, strict=True)):
        raise RuntimeError(f"{test_file}: the records were read in another order than the file lists them")
    model, tokenizer = load_bundle(bundle, device=str(pick_device("auto")))
    return by_group(rows, exact_match(model, tokenizer, records))


def by_group(rows: list[dict], correct: list[bool]) -> dict:
    """{group: (accuracy, count)} for each kind ("nonrel", "rel") and kind/question type."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for row, ok in zip(rows, correct, strict=True):
        groups[row["kind"]].append(ok)
        groups[f"{row['kind']}/{row['qtype']}"].append(ok)
    return {name: (sum(oks) / len(oks), len(oks)) for name, oks in sorted(groups.items())}


def reference_levels(rows: list[dict]) -> dict:
    """Per group, "chance" (a uniform guess among the question type's answers) and "common" (always the
    type's most common answer): what a model that ignores the picture reaches."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        answers[row["qtype"]][row["messages"][-1]["content"]] += 1
    chance = by_group(rows, [1 / len(answers[row["qtype"]]) for row in rows])
    common = by_group(rows, [answers[r["qtype"]].most_common(1)[0][0] == r["messages"][-1]["content"] for r in rows])
    return {"chance": chance, "common": common}


def train_apertis(args: argparse.Namespace, data: Path, workdir: Path) -> dict:
    from apertis_core.training import RunConfig, train

    run_config = RunConfig.from_dict(
        {
            "model": RECIPE["model"],
            "data": {**RECIPE["data"], "path": str(data / "train.jsonl"), "curriculum_epochs": args.curriculum},
            "train": {**RECIPE["train"], "max_minutes": args.minutes},  # 0: train.max_steps decides
            "out_dir": str(workdir / "run"),
        }
    ).override(args.overrides)
    started = time.perf_counter()
    result = train(run_config)
    minutes = (time.perf_counter() - started) / 60
    return {"steps": result.steps, "minutes": minutes, "accuracy": score(Path(result.bundle_dir), data / "test.jsonl")}


def run(args: argparse.Namespace, workdir: Path) -> dict:
    from benchmarks.vqa_baselines import train_baseline

    data = prepare_data(
        args.data or workdir / "shapes", args.scenes, args.seed, curriculum=args.curriculum > 0, ask=args.ask
    )
    results = {}
    for name in args.models:
        if name == "apertis":
            results[name] = train_apertis(args, data, workdir)
        else:
            results[name] = train_baseline(name, data, args.minutes, args.baseline_steps, seed=args.seed)
    return {"models": results, **reference_levels(held_out_rows(data / "test.jsonl"))}


def format_report(result: dict, command: str) -> str:
    models = result["models"]
    names = list(models)
    lines = [
        "| questions | held-out | chance | most common | " + " | ".join(names) + " | target |",
        "|---" * (len(names) + 5) + "|",
    ]
    for group, (chance, count) in result["chance"].items():
        label = {"nonrel": "**non-relational**", "rel": "**relational**"}.get(group, group)
        target = TARGETS.get(group)
        scores = [f"{models[n]['accuracy'][group][0]:.1%}" for n in names]
        lines.append(
            f"| {label} | {count} | {chance:.1%} | {result['common'][group][0]:.1%} | {' | '.join(scores)} | "
            f"{'' if target is None else f'>= {target:.0%}'} |"
        )
    lines.append("")
    for name in names:
        model = models[name]
        lines.append(
            f"{name}: {model['steps']} steps in {model['minutes']:.1f} min (wall clock, incl. data preparation)."
        )
    lines.append(f"Command: {command}")
    lines.append("Anchors (Sort-of-CLEVR): Relation Networks 99% non-relational / 89% relational; CNN+MLP ~66%.")
    return "\n".join(lines)


def model_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model {', '.join(unknown) or '(none)'}; choose from {', '.join(MODELS)}"
        )
    return names


def question_list(text: str) -> tuple[str, ...]:
    from apertis_core.data.shapes import question_types

    try:
        return question_types(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apertis bench vqa", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget of each model (default 30)")
    parser.add_argument(
        "--models", type=model_list, default=list(MODELS),
        help=f"comma-separated models to train and score (default all: {','.join(MODELS)}); e.g. cnn_mlp,rn",
    )  # fmt: skip
    parser.add_argument("--baseline-steps", type=int, default=0, help="stop the baselines after this many steps")
    parser.add_argument(
        "--curriculum", type=float, default=0.0,
        help="epochs of easy-first sampling for the model: non-relational questions first (data.curriculum_epochs)",
    )  # fmt: skip
    parser.add_argument(
        "--ask", type=question_list, default=(), metavar="TYPES",
        help="train on only these question types (and 'caption'), e.g. shape,closest_colour,farthest_colour: a "
        "focused phase, usually with --set init_from=BUNDLE; the held-out questions stay all of them",
    )  # fmt: skip
    parser.add_argument("--scenes", type=int, default=10_000, help="scenes to generate, 10%% held out (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated set")
    parser.add_argument("--data", type=Path, help="keep the generated set here (reused when seed and size match)")
    parser.add_argument("--workdir", type=Path, help="keep the run here (default: a temporary folder)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="run-config override, e.g. train.lr=1e-3"
    )
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.minutes <= 0 and args.baseline_steps <= 0 and set(args.models) - {"apertis"}:
        parser.error("the baselines need a budget: --minutes above 0, or --baseline-steps")
    command = "apertis bench vqa " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.workdir:
        result = run(args, args.workdir)
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="apertis-bench-vqa-") as tmp:
            result = run(args, Path(tmp))
    print(format_report(result, command))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
