"""Vision for Apertis: image loading and preprocessing, and the Unified Multimodal Encoder (UME)."""

from .encoder import UnifiedMultimodalEncoder
from .preprocess import (
    MAX_PIXELS,
    Augment,
    ImageError,
    image_grid,
    load_image,
    num_image_tokens,
    patch_grid,
    preprocess_image,
)

__all__ = [
    "MAX_PIXELS",
    "Augment",
    "ImageError",
    "image_grid",
    "load_image",
    "num_image_tokens",
    "patch_grid",
    "preprocess_image",
    "UnifiedMultimodalEncoder",
]
