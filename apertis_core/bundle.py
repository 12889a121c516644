"""Model bundles: a folder with model.safetensors, config.json, tokenizer.json and a README.md model card.

Saving takes the plain module (no DDP or torch.compile wrappers), stores tied weights once and writes the
whole folder atomically. Loading never unpickles anything, checks every tensor name and shape against the
config, and checks that the tokenizer and the config agree.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .configio import ConfigError
from .fileio import atomic_write_bytes, atomic_write_text
from .model import ApertisModel, ModelConfig
from .tokenizer import Tokenizer

FORMAT_VERSION = 1  # bumped when the folder layout or the weight names change incompatibly
BUNDLE_FILES = ("model.safetensors", "config.json", "tokenizer.json")


class BundleError(ValueError):
    """A bundle or checkpoint folder is missing, damaged or does not fit its config."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it takes the place of `path`.

    A failure in the body leaves any previous folder at `path` untouched. Replacing an existing folder
    takes two renames; a crash between them leaves the old folder as `.NAME.old-*` beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- weights ----------------------------------------------------------------------------------------
def _storage_key(tensor: torch.Tensor) -> tuple:
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
    )


def _canonical_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each state-dict name -> the first name sharing its tensor (tied weights are stored once)."""
    first: dict[tuple, str] = {}
    return {name: first.setdefault(_storage_key(tensor), name) for name, tensor in state.items()}


def save_weights(path: str | Path, model: nn.Module) -> None:
    """Write the module's state as safetensors, atomically, each shared tensor once."""
    state = unwrap_model(model).state_dict()
    canonical = _canonical_names(state)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items() if canonical[name] == name}
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt", "apertis_format_version": str(FORMAT_VERSION)}))


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Strictly load safetensors weights into `model`, with an error that says what does not fit."""
    path = Path(path)
    try:
        saved = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{path} is damaged or not a safetensors file ({exc}); re-export the model") from exc
    module = unwrap_model(model)
    expected = module.state_dict()
    groups: dict[str, list[str]] = {}  # tied tensors: any one of their names may be the stored one
    for name, first in _canonical_names(expected).items():
        groups.setdefault(first, []).append(name)
    source = {first: next((n for n in names if n in saved), None) for first, names in groups.items()}
    problems = [f"missing {first}" for first, found in source.items() if found is None]
    problems += [f"unexpected {name}" for name in sorted(saved.keys() - expected.keys())]
    problems += [
        f"{found}: saved {tuple(saved[found].shape)}, config needs {tuple(expected[found].shape)}"
        for found in source.values()
        if found is not None and saved[found].shape != expected[found].shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise BundleError(f"{path} was saved by a different config than the one beside it ({shown}); re-export it")
    module.load_state_dict(
        {name: saved[source[first]] for first, names in groups.items() for name in names}, strict=True
    )


# ---- bundles ----------------------------------------------------------------------------------------
def save_bundle(
    directory: str | Path,
    model: nn.Module,
    tokenizer: Tokenizer,
    card: dict[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """Write a self-contained model folder; `card` adds run facts (steps, train_loss, val_loss, data...).

    The card is titled `title`, by default the folder's name (see card_title)."""
    module = unwrap_model(model)
    config: ModelConfig = module.config
    if tokenizer.vocab_size != config.vocab_size:
        raise BundleError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model config says {config.vocab_size}"
        )
    with atomic_directory(directory) as tmp:
        write_model_files(tmp, module, tokenizer)
        atomic_write_text(tmp / "README.md", model_card(module, title or card_title(directory), card or {}))
    return Path(directory)


def write_model_files(directory: Path, model: nn.Module, tokenizer: Tokenizer) -> None:
    """The three files every bundle and checkpoint has, into an existing folder."""
    module = unwrap_model(model)
    save_weights(directory / "model.safetensors", module)
    config = {"format_version": FORMAT_VERSION, **module.config.to_dict()}
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")
    tokenizer.save(directory / "tokenizer.json")


def read_model_config(path: str | Path) -> ModelConfig:
    """ModelConfig from a bundle's or checkpoint's config.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} cannot be read as JSON ({exc}); re-export the model") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object of model settings")
    version = data.pop("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {version!r}; this Apertis reads up to {FORMAT_VERSION}, update it"
        )
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as exc:
        raise BundleError(f"{path}: {exc}") from exc


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> tuple[ApertisModel, Tokenizer]:
    """(model in eval mode on `device`, tokenizer) from a bundle or checkpoint folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"{directory}: no such model folder")
    for name in BUNDLE_FILES:
        if not (directory / name).is_file():
            raise BundleError(f"{directory} has no {name}; a model folder needs {', '.join(BUNDLE_FILES)}")
    config = read_model_config(directory / "config.json")
    try:
        tokenizer = Tokenizer.load(directory / "tokenizer.json")
    except ConfigError as exc:
        raise BundleError(str(exc)) from exc
    if tokenizer.vocab_size != config.vocab_size:
        raise BundleError(
            f"{directory}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json says vocab_size "
            f"{config.vocab_size}; the files come from different models, re-export it"
        )
    model = ApertisModel(config)
    load_weights(directory / "model.safetensors", model)
    return model.to(device).eval(), tokenizer


# ---- model cards ------------------------------------------------------------------------------------
FINAL_DIR = "final"  # the trainer's finished bundle inside a run folder
_ABSOLUTE_PATH = re.compile(r"^(/|~[\\/]|\\\\|[A-Za-z]:[\\/])")  # POSIX, home, Windows share or drive


def card_title(directory: str | Path) -> str:
    """What a bundle's card is titled: the folder's name, or for a run's final/ bundle the run folder's
    (a card called "final" says nothing about which model it is)."""
    path = Path(directory)
    if path.name == FINAL_DIR:
        path = path.absolute().parent
    return path.name


def path_name(path: str | Path) -> str:
    """The last part of a path, as a card names a dataset: a card travels with the model, and the folders
    it was made in (a user name, a home folder) are nobody else's business."""
    parts = [part for part in re.split(r"[\\/]", str(path)) if part]
    return parts[-1] if parts else str(path)


def model_card(model: ApertisModel, name: str, card: dict[str, Any]) -> str:
    """README.md text: what the model is, how big, what it was trained on and how far."""
    cfg = model.config
    total, active = model.num_parameters(), model.num_parameters(active_only=True)
    facts = {
        "preset": cfg.preset,
        "parameters": f"{total:,}" + (f" ({active:,} active per token)" if active != total else ""),
        "layers x width": f"{cfg.n_layers} x {cfg.d_model} (pattern {cfg.layer_pattern}, {cfg.n_experts} routed experts)",
        "vocabulary": f"{cfg.vocab_size} tokens",
        "images": cfg.image_encoder,
        **_card_rows(card),
        "date": datetime.date.today().isoformat(),
    }
    rows = "\n".join(f"| {key} | {value} |" for key, value in facts.items())
    return (
        f"# {_format(name)}\n\nA small language model built and trained with Apertis Studio.\n\n"
        f"| | |\n|---|---|\n{rows}\n\n"
        "Files: `model.safetensors` (weights), `config.json` (architecture), `tokenizer.json` (HF tokenizers).\n"
        "Load with `apertis_core.load_bundle(folder)`, or chat with `apertis chat --model FOLDER`.\n"
    )


def _card_rows(card: dict[str, Any]) -> dict[str, str]:
    """The run facts as table rows; the data summary's path becomes a "dataset" row with its name only."""
    rows = {}
    for key, value in card.items():
        if isinstance(value, dict) and "path" in value:
            rows["dataset"] = _format(path_name(value["path"]))
            value = {k: v for k, v in value.items() if k != "path"}
        rows[key.replace("_", " ")] = _format(value)
    return rows


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_format(v)}" for k, v in value.items())
    text = str(value)
    if _ABSOLUTE_PATH.match(text):  # whatever put it there, a card never shows where files were on disk
        text = path_name(text)
    return text.replace("|", "/").replace("\n", " ")
