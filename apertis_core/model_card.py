"""Model cards: the README.md of a bundle, titled with the run's name, with the model's facts and the run's,
and never a folder path of the machine it was made on."""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

from .filenames import FINAL_DIR
from .model import ApertisModel

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
