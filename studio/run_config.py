"""The Train form's values -> the RunConfig mapping a run trains from, and the flattening that shows a
config (or a metrics record) one setting per key.

The mapping is what `apertis train config.yaml` reads, so what the studio trains is exactly the YAML it shows.
"""

from __future__ import annotations

from typing import Any

PROBE_PROMPTS = ["The", "Once upon a time", "What shape is the red object?"]
DATA_KEYS = {"seq_len", "vocab_size"}
FINETUNE_KEYS = {"start_from", "finetune_method", "lora_rank"}  # the form's fields of the finetune section


def run_mapping(services, dataset_id: str | None, preset: str, values: dict[str, Any]) -> dict[str, Any]:
    """The RunConfig mapping for the form, validated by apertis_core (ConfigError says what is wrong)."""
    from apertis_core.training import RunConfig

    row = services.store.get_dataset(dataset_id) if dataset_id else None
    if row is None:
        raise ValueError("pick a dataset (add one in the Dataset tab first)")
    summary = row.get("summary") or {}
    model: dict[str, Any] = {"preset": preset}
    if summary.get("images"):
        model["image_encoder"] = "vit"  # the data has images: the model needs an encoder to see them
    data = {
        "path": row["path"],
        "seq_len": int(values["seq_len"]),
        "vocab_size": int(values["vocab_size"]),
        "tokenizer": summary.get("tokenizer", ""),
    }
    train = {k: v for k, v in values.items() if k not in DATA_KEYS | FINETUNE_KEYS and k != "extra"}
    train["max_minutes"] = float(train["max_minutes"] or 0)
    if train["sample_every"]:
        train["sample_prompts"] = PROBE_PROMPTS
    mapping = {"model": model, "data": data, "train": train}
    if values.get("start_from"):
        mapping.update(finetune_sections(services, values, data))
    config = RunConfig.from_dict(mapping)
    extra = [line.strip() for line in str(values.get("extra") or "").splitlines() if line.strip()]
    if extra:
        config = config.override(extra)
    mapping = config.to_dict()
    mapping.pop("out_dir", None)  # the job manager gives every run its own folder
    return mapping


def finetune_sections(services, values: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """`finetune`, `model` and `data` for a run that starts from a listed model: the model section and the
    tokenizer become the base's, so what Start sizes and the YAML shows is the model that trains."""
    from pathlib import Path

    from apertis_core.bundle import read_model_config
    from apertis_core.training.config import model_mapping

    row = services.store.get_model(values["start_from"])
    if row is None:
        raise ValueError("the model picked in 'Start from model' is no longer listed; pick another one")
    base = Path(row["path"])
    finetune = {"base": str(base), "method": values.get("finetune_method") or "lora"}
    if values.get("lora_rank"):
        finetune["rank"] = int(values["lora_rank"])
    return {
        "finetune": finetune,
        "model": model_mapping(read_model_config(base / "config.json")),
        "data": {**data, "tokenizer": str(base / "tokenizer.json")},
    }


def flatten(mapping: dict[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a<sep>b": 1}; a flat mapping passes unchanged."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, sep, name + sep))
        else:
            flat[name] = value
    return flat
