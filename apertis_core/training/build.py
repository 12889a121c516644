"""How a run builds its model config, starting model and image cache: shared by the trainer's session, the
step measurement and the plan, so what is measured and planned is what the trainer will run."""

from __future__ import annotations

from pathlib import Path

from ..model.config import ModelConfig
from ..tokenizer import Tokenizer
from .config import RunConfig, planned_vocab_size


def planned_model_config(run: RunConfig) -> ModelConfig:
    """The architecture the run will train: its `init_from` bundle's, else `run.model` at the planned vocabulary."""
    if run.init_from:
        from ..bundle import read_model_config

        return read_model_config(Path(run.init_from) / "config.json")
    return run.model.replace(vocab_size=planned_vocab_size(run))


def start_model(run: RunConfig):
    """(model, tokenizer) of the `init_from` bundle, checked and sized as any bundle is; None without one."""
    if not run.init_from:
        return None
    from ..bundle import load_bundle

    return load_bundle(run.init_from)


def fresh_model_config(model: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    return model.replace(vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_id).validated()


def image_cache(model_config: ModelConfig, augment: bool):
    if model_config.image_encoder == "none":
        return None
    from ..vision import Augment, ImageCache  # torchvision loads only for image models

    return ImageCache(model_config.image_patch_size, model_config.image_max_patches, Augment() if augment else None)
