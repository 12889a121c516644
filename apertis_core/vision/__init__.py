"""Vision for Apertis: image loading and preprocessing, and the Unified Multimodal Encoder (UME)."""

from ..data.images import MAX_IMAGE_PIXELS as MAX_PIXELS
from ..data.images import ImageError
from ..data.images import open_image as load_image
from .encoder import UnifiedMultimodalEncoder
from .preprocess import (
    Augment,
    image_grid,
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
