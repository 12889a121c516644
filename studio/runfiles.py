"""The files a run folder holds that the studio and its worker share: the config, the log, the stop request.

Kept apart from worker.py so the UI side can read them without importing the trainer.
"""

from __future__ import annotations

from pathlib import Path

from apertis_core.filenames import FINAL_DIR, STOP_FILE

CONFIG_NAME = "config.yaml"  # the config as submitted; `apertis train <run>/config.yaml` repeats the run
LOG_NAME = "worker.log"  # the worker's stdout and stderr
STOP_NAME = STOP_FILE  # the trainer's cooperative stop request: it saves a checkpoint and returns
FINAL_NAME = FINAL_DIR  # the trainer's final bundle folder inside the run directory


def log_tail(out_dir: str | Path, lines: int = 40) -> str:
    """The last lines of a run's worker log ("" if there is none yet)."""
    path = Path(out_dir) / LOG_NAME
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64_000))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def request_stop(out_dir: str | Path) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / STOP_NAME).write_text("stop requested by the studio\n", encoding="utf-8")


def clear_stop(out_dir: str | Path) -> bool:
    """Remove a stop request; True if there was one."""
    path = Path(out_dir) / STOP_NAME
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed
