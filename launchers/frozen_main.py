"""Entry script of the PyInstaller app (build.spec): one executable is the studio, its worker and the CLI.

    ApertisStudio [--port P --workspace DIR --no-browser ...]   the studio (python -m studio)
    ApertisStudio worker --workspace W --run-id ID              a training worker (python -m studio.worker)
    ApertisStudio train|generate|chat|export|data|bench ...     the `apertis` command line

The studio's job manager re-enters this executable with `worker` (studio.jobs.worker_command), so training
runs inside the bundle with no Python installed. Model code stays out of this file: each branch imports
its package only once chosen, which keeps `--help` and the worker's start-up free of gradio.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable

CLI_COMMANDS = frozenset({"train", "generate", "chat", "export", "data", "bench"})
WORKER_COMMAND = "worker"


def choose(argv: list[str]) -> str:
    """Which part of the app `argv` (without the program name) asks for: 'worker', 'cli' or 'studio'."""
    first = argv[0] if argv else ""
    if first == WORKER_COMMAND:
        return "worker"
    if first in CLI_COMMANDS:
        return "cli"
    return "studio"  # no arguments, studio flags, or a typo that the studio's own parser reports


def ensure_streams() -> None:
    """A windowed build (no console) starts with sys.stdout/stderr set to None, and the first print
    would raise; send them to the null device instead."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # kept open for the whole process


def restore_library_path(environ: dict[str, str] | os._Environ) -> None:
    """The frozen Linux app runs with LD_LIBRARY_PATH pointing into the bundle (the bootloader saves the
    user's value in LD_LIBRARY_PATH_ORIG). A browser started from here with the bundle's libraries would
    load our copies of libstdc++ etc. and may crash, so children get the user's own path back. This process
    is unaffected (the loader read the variable at start), and workers are this executable again, whose
    bootloader sets the bundle path up anew."""
    original = environ.get("LD_LIBRARY_PATH_ORIG")
    if original is not None:
        environ["LD_LIBRARY_PATH"] = original
    else:
        environ.pop("LD_LIBRARY_PATH", None)


def set_gradio_temp(argv: list[str], environ: dict[str, str] | os._Environ) -> None:
    """Gradio fixes its upload folder when it is imported: put it inside the workspace (the only folder
    the app serves) before anything can import gradio. studio.__main__ does the same; doing it here too
    keeps the guarantee if the studio's start-up order ever changes."""
    from pathlib import Path

    from studio.__main__ import parse_args  # argparse only; studio.__main__ imports gradio inside main()

    workspace = Path(parse_args(argv).workspace).expanduser().resolve()
    temp = workspace / "tmp" / "gradio"
    temp.mkdir(parents=True, exist_ok=True)
    environ["GRADIO_TEMP_DIR"] = str(temp)


def _studio(argv: list[str]) -> int:
    if getattr(sys, "frozen", False) and sys.platform.startswith("linux"):
        restore_library_path(os.environ)
    set_gradio_temp(argv, os.environ)
    from studio.__main__ import main

    return main(argv)


def _worker(argv: list[str]) -> int:
    from studio.worker import main

    return main(argv[1:])


def _cli(argv: list[str]) -> int:
    from apertis_core.cli.main import main

    return main(argv)


HANDLERS: dict[str, Callable[[list[str]], int]] = {"studio": _studio, "worker": _worker, "cli": _cli}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ensure_streams()
    return int(HANDLERS[choose(argv)](argv) or 0)


if __name__ == "__main__":
    # First of all: in a frozen app a multiprocessing child re-runs this script, and freeze_support turns
    # it into the child (e.g. a DataLoader worker) instead of a second studio.
    multiprocessing.freeze_support()
    sys.exit(main())
