"""`apertis` entry point: one subcommand per module, user errors as one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys

from . import bench, chat, data, export, generate, import_cmd, train

COMMANDS = (train, generate, chat, export, import_cmd, data, bench)

# Exit codes: 0 success, 1 failed run or problems found (data validate), 2 bad input, 130 interrupted.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apertis",
        description="Train, run and export small Apertis language models.",
        epilog="Run `apertis COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full Python traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `apertis` command; returns the process exit code."""
    _tolerant_stdout()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    debug = args.debug or os.environ.get("APERTIS_DEBUG") == "1"
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as error:  # ConfigError, BundleError, ImageError are ValueErrors
        if debug:
            raise
        print(f"error: {describe(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (FloatingPointError, MemoryError, RuntimeError) as error:
        hint = _failure_hint(error)  # a run that diverged or ran out of memory; other errors are bugs
        if debug or hint is None:
            raise
        print(f"error: {describe(error)}{hint}", file=sys.stderr)
        return EXIT_FAILED


def _failure_hint(error: BaseException) -> str | None:
    if isinstance(error, FloatingPointError):
        return ""  # the trainer's message already says what to change
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return "; out of memory: lower train.batch_size or data.seq_len, or pick a smaller preset"
    return None


def describe(error: BaseException) -> str:
    """One line for the user: the message itself, with the file name for OS errors."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    text = str(error) or type(error).__name__
    return " ".join(text.split())


def _tolerant_stdout() -> None:
    """Generated text may hold characters the console cannot show (Windows code pages): replace them."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="replace")
            except (ValueError, OSError):  # a stream that cannot be reconfigured keeps its setting
                pass
