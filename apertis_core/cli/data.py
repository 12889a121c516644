"""`apertis data`: check a dataset before training (`validate`), and make demo datasets (`demo ...`)."""

from __future__ import annotations

import argparse

# Exit codes of `data validate`: every record usable / some skipped / nothing usable (or bad input).
EXIT_CLEAN, EXIT_SKIPPED, EXIT_UNUSABLE = 0, 1, 2


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="check datasets and make demo datasets", description="Dataset tools.")
    data_sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    validate = data_sub.add_parser(
        "validate",
        help="check a dataset and report every problem with its file and line",
        description=(
            "Parse a dataset (file, folder or .zip) as training would and report each problem with its file, "
            f"line and field. Exit code {EXIT_CLEAN}: no problems; {EXIT_SKIPPED}: some records would be skipped; "
            f"{EXIT_UNUSABLE}: nothing usable."
        ),
    )
    validate.add_argument("path", metavar="PATH", help="a .txt/.md/.jsonl/.csv file, a folder or a .zip")
    validate.add_argument(
        "--tokenizer", metavar="FILE", help="a tokenizer.json (or bundle folder) to count tokens with"
    )
    validate.add_argument(
        "--max-problems", type=int, default=50, metavar="N", help="list at most N problems, 0 = all (default 50)"
    )
    validate.set_defaults(run=run_validate)

    demo = data_sub.add_parser("demo", help="generate demo datasets", description="Generate demo datasets.")
    demo_sub = demo.add_subparsers(dest="demo_command", metavar="DATASET", required=True)
    shapes = demo_sub.add_parser(
        "shapes",
        help="synthetic images of shapes with captions and questions (a visual Q&A demo)",
        description="Write images/, train.jsonl, test.jsonl and summary.json: coloured shapes with captions and questions.",
    )
    shapes.add_argument("--out", required=True, metavar="DIR", help="the folder to write into")
    shapes.add_argument("--n", type=int, default=2000, metavar="N", help="number of scenes (default 2000)")
    shapes.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    shapes.add_argument(
        "--conversations",
        action="store_true",
        help="ask each training scene's caption and questions in one multi-turn chat (several times cheaper to train on)",
    )
    shapes.add_argument(
        "--ask",
        default="",
        metavar="TYPES",
        help="training chats ask only these question types (and 'caption'), e.g. shape,closest_colour,farthest_colour: "
        "a focused set with the same scenes and held-out questions",
    )
    shapes.set_defaults(run=run_shapes)
    text = demo_sub.add_parser(
        "text",
        help="a small English-like text corpus from templates (a text-only demo)",
        description="Write one template sentence a line: deterministic, license-free, quick to learn.",
    )
    text.add_argument("--out", required=True, metavar="FILE", help="the text file to write")
    text.add_argument("--lines", type=int, default=3000, metavar="N", help="number of sentences (default 3000)")
    text.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    text.set_defaults(run=run_text)


def run_validate(args: argparse.Namespace) -> int:
    from ..data import validate_dataset

    tokenizer = None
    if args.tokenizer:
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.load(args.tokenizer)
    if args.max_problems < 0:
        raise ValueError(f"--max-problems must be >= 0, got {args.max_problems}")
    report = validate_dataset(args.path, tokenizer=tokenizer)
    print(report.to_text(max_problems=args.max_problems))
    if report.records == 0:
        return EXIT_UNUSABLE
    return EXIT_SKIPPED if report.skipped else EXIT_CLEAN


def run_shapes(args: argparse.Namespace) -> int:
    from ..data.shapes import generate_shapes

    summary = generate_shapes(args.out, n=args.n, seed=args.seed, conversations=args.conversations, ask=args.ask)
    scenes, records = summary["scenes"], summary["records"]
    out = summary["out_dir"]
    print(
        f"wrote {scenes['train']} training and {scenes['test']} held-out scenes "
        f"({records['train']} train / {records['test']} test records) to {out}\n"
        f"train on {out}/train.jsonl (set data.path to it); test.jsonl holds the held-out questions, "
        "summary.json describes the set"
    )
    return 0


def run_text(args: argparse.Namespace) -> int:
    from ..data.demo_text import write_demo_text

    if args.lines < 1:
        raise ValueError(f"--lines must be >= 1, got {args.lines}")
    path = write_demo_text(args.out, lines=args.lines, seed=args.seed)
    print(f"wrote {args.lines} sentences to {path}; train on it (set data.path to it)")
    return 0
