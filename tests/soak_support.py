"""Helpers of the kill -9 soak tests (tests/test_soak.py): freeze a process to look at its files, kill it
at that exact moment, and check a run folder for left-over temporary or torn files.

Every kill goes through `freeze` first (SIGSTOP, then wait until the kernel reports it stopped): what the
run folder holds while the process is frozen is exactly what a kill -9 at that moment leaves behind, so a
kill "inside a checkpoint write" is verified, not hoped for.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import psutil

from conftest import HANG_GUARD_S

# Temporary names the app's atomic writes use (apertis_core/fileio.py atomic_open: `.NAME.XXXX.tmp`;
# apertis_core/bundle.py atomic_directory: `.NAME.tmp-XXXX` and `.NAME.old-XXXX`). A run folder holds no
# other hidden entry, so any name starting with "." counts as left over.
CHECKPOINT_TMP = re.compile(r"^\.step_\d+\.tmp-")
FINAL_TMP = re.compile(r"^\.final\.tmp-")
BEST_TMP = re.compile(r"^\.best\.json\..*\.tmp$")
STARTUP_TMP = re.compile(r"^\.(run\.yaml|tokenizer\.json|metrics\.jsonl)\..*\.tmp$")


def freeze(pid: int) -> bool:
    """SIGSTOP `pid` and wait until it is stopped; False if it ended first."""
    try:
        os.kill(pid, signal.SIGSTOP)
        proc = psutil.Process(pid)
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            status = proc.status()
            if status == psutil.STATUS_STOPPED or status == getattr(psutil, "STATUS_TRACING_STOP", None):
                return True
            if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return False
            if time.monotonic() > deadline:
                raise AssertionError(f"process {pid} did not stop after SIGSTOP")
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False


def thaw(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def kill9(proc) -> None:
    """SIGKILL a Popen and reap it."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(HANG_GUARD_S)


def names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def temp_entries(run_dir: Path) -> list[str]:
    """Every hidden (temporary) file or folder under `run_dir`, with a folder's content, relative paths."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        rel = Path(root).relative_to(run_dir)
        inside_tmp = any(part.startswith(".") for part in rel.parts)
        for name in sorted(dirs) + sorted(files):
            if inside_tmp or name.startswith("."):
                found.append(str(rel / name))
    return sorted(found)


def step_dirs(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoint folders (checkpoints/step_NNNNNNN)."""
    return sorted(int(n[5:]) for n in names(run_dir / "checkpoints") if n.startswith("step_") and n[5:].isdigit())


def last_logged_step(metrics: Path) -> int:
    """The step of the last complete line of metrics.jsonl (0 when there is none)."""
    try:
        with metrics.open("rb") as handle:
            handle.seek(max(0, metrics.stat().st_size - 4096))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return 0
    for line in reversed(tail.split("\n")[:-1]):  # the part after the last newline may be torn
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def metric_lines(metrics: Path) -> list[dict]:
    """All records of metrics.jsonl; every line must be whole JSON (a torn line fails here)."""
    records = []
    for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise AssertionError(f"{metrics}:{number}: torn or invalid line {line[:80]!r} ({exc})") from exc
    return records


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


def check_run_folder(run_dir: Path) -> list[str]:
    """Problems of a finished run folder: left-over temporary files, a STOP request, a checkpoint or bundle
    that does not load, a best.json pointing nowhere. Empty when all is well."""
    from apertis_core.bundle import load_bundle
    from apertis_core.training.checkpoint import list_checkpoints, load_trainer_state

    problems = [f"left over: {entry}" for entry in temp_entries(run_dir)]
    if (run_dir / "STOP").exists():
        problems.append("left over: STOP")
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        problems.append("no checkpoint in checkpoints/")
    for folder in [*checkpoints, run_dir / "final"]:
        try:
            load_bundle(folder)
            if folder.name != "final":
                state = load_trainer_state(folder)
                meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
                assert state["step"] == meta["step"] == int(folder.name[5:]), (state["step"], meta["step"])
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{folder.relative_to(run_dir)} does not load: {type(exc).__name__}: {exc}")
    best = run_dir / "checkpoints" / "best.json"
    if best.exists():
        try:
            target = json.loads(best.read_text(encoding="utf-8"))["checkpoint"]
            if not (run_dir / "checkpoints" / target).is_dir():
                problems.append(f"best.json names {target}, which is not there")
        except (ValueError, KeyError) as exc:
            problems.append(f"best.json is torn: {exc}")
    return problems


def weights_difference(ours: Path, theirs: Path) -> str | None:
    """None when two model.safetensors hold bit-identical weights: the same tensors (names, dtypes, shapes,
    offsets) and byte-identical tensor data. The `__metadata__` pairs are compared as a mapping: safetensors
    writes them in a per-process random order, so two identical runs need not give identical file bytes."""
    blobs = [ours.read_bytes(), theirs.read_bytes()]
    headers, data = [], []
    for blob in blobs:
        size = int.from_bytes(blob[:8], "little")
        headers.append(json.loads(blob[8 : 8 + size]))
        data.append(blob[8 + size :])
    if headers[0] != headers[1]:
        changed = sorted(k for k in set(headers[0]) | set(headers[1]) if headers[0].get(k) != headers[1].get(k))
        return f"the safetensors headers differ at {changed[:10]}"
    if data[0] != data[1]:
        at = next(i for i, (x, y) in enumerate(zip(data[0], data[1], strict=False)) if x != y)
        tensor = next(
            (
                k
                for k, v in headers[0].items()
                if k != "__metadata__" and v["data_offsets"][0] <= at < v["data_offsets"][1]
            ),
            "?",
        )
        return f"the tensor data differ from byte {at} on (in {tensor})"
    return None
