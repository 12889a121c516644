"""How a run builds its model config and image cache from its data: shared by the trainer's session and
the step measurement, so a measured step is the step the trainer will run."""

from __future__ import annotations

from ..model.config import ModelConfig
from ..tokenizer import Tokenizer


def fresh_model_config(model: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    return model.replace(vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_id).validated()


def image_cache(model_config: ModelConfig, augment: bool):
    if model_config.image_encoder == "none":
        return None
    from ..vision import Augment, ImageCache  # torchvision loads only for image models

    return ImageCache(model_config.image_patch_size, model_config.image_max_patches, Augment() if augment else None)
