"""Checkpoints: `checkpoints/step_NNNNNNN/` folders written atomically, the best marked, old ones pruned.

A checkpoint is a model folder (model.safetensors, config.json, tokenizer.json, so it loads like a bundle)
plus `trainer_state.pt` (optimizer, schedule, RNG and data position: what an exact resume needs) and
`meta.json` (step and losses, for people and the studio); an FSDP run's also keeps its weights and optimizer
state split per rank in `shards/` (fsdp.py), which is what it resumes from. trainer_state.pt holds only
tensors and plain Python values, and is read with `torch.load(weights_only=True)`, which refuses arbitrary
pickles.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..bundle import BundleError, atomic_directory, write_model_files
from ..fileio import atomic_write_text
from ..tokenizer import Tokenizer

STATE_FILE = "trainer_state.pt"
SHARDS_DIR = "shards"  # FSDP runs: each rank's part of the weights and optimizer state (fsdp.py)
BEST_MARKER = "best.json"  # {"step", "val_loss", "checkpoint"}: names the best folder instead of copying it


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    tokenizer: Tokenizer,
    state: dict[str, Any],
    meta: dict[str, Any],
    shards: Path | None = None,
) -> Path:
    """Write checkpoints/step_NNNNNNN/ in one rename: a crash mid-write leaves earlier checkpoints intact.
    `shards` is a folder the ranks of an FSDP run wrote (fsdp.write_shards); it becomes shards/."""
    target = checkpoint_dir(run_dir, step)
    with atomic_directory(target) as tmp:
        write_model_files(tmp, model, tokenizer)
        torch.save(state, tmp / STATE_FILE)  # inside the temporary folder, so the folder rename covers it
        if shards is not None:
            os.replace(shards, tmp / SHARDS_DIR)
        atomic_write_text(tmp / "meta.json", json.dumps({"step": step, **meta}, indent=2) + "\n")
    return target


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise BundleError(f"{checkpoint} has no {STATE_FILE}: it is a model bundle, not a training checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise BundleError(
            f"{path} is damaged or not a trainer state ({exc}); resume from an earlier checkpoint"
        ) from exc


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders of unfinished writes are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    marker = Path(run_dir) / "checkpoints" / BEST_MARKER
    if not marker.is_file():
        return None
    path = marker.parent / json.loads(marker.read_text(encoding="utf-8"))["checkpoint"]
    return path if path.is_dir() else None


def mark_best_if_better(run_dir: str | Path, step: int, val_loss: float) -> bool:
    """Point best.json at this step's checkpoint if its validation loss beats the marked one."""
    marker = Path(run_dir) / "checkpoints" / BEST_MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8"))["val_loss"] <= val_loss:
        return False
    record = {"step": step, "val_loss": val_loss, "checkpoint": checkpoint_dir(run_dir, step).name}
    atomic_write_text(marker, json.dumps(record, indent=2) + "\n")
    return True


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and the best one; return what was deleted."""
    found = list_checkpoints(run_dir)
    keep = set(found[-keep_last:])
    best = best_checkpoint(run_dir)
    if best is not None:
        keep.add(best)
    removed = [p for p in found if p not in keep]
    for path in removed:
        shutil.rmtree(path)
    root = Path(run_dir) / "checkpoints"
    for leftover in root.glob(".step_*"):  # temporary folders of a write that crashed
        shutil.rmtree(leftover, ignore_errors=True)
    return removed


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (then its latest checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise BundleError(f"{path} is neither a checkpoint (no {STATE_FILE}) nor a run folder with checkpoints/step_*")
    return latest


def remove_unfinished_writes(run_dir: str | Path) -> list[Path]:
    """Delete what a process killed in the middle of an atomic write left in a run folder: `.NAME.XXXX.tmp`
    files (fileio.atomic_open) and `.NAME.tmp-XXXX` folders (bundle.atomic_directory), in the run folder and
    checkpoints/. A `.NAME.old-XXXX` folder (killed between atomic_directory's two renames) is put back
    when NAME is missing. Only the process that owns the run folder may call this (the trainer at start)."""
    removed = []
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            name = entry.name
            if not name.startswith("."):
                continue
            if entry.is_dir() and ".old-" in name:
                original = folder / name[1:].rsplit(".old-", 1)[0]
                if not original.exists() and (entry / original.name).is_dir():
                    os.replace(entry / original.name, original)
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and ".tmp-" in name:
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_file() and name.endswith(".tmp"):
                entry.unlink(missing_ok=True)
            else:
                continue
            removed.append(entry)
    return removed
