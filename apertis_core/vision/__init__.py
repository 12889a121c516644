"""Vision for Apertis: image loading and preprocessing, and the Unified Multimodal Encoder (UME)."""

from ..data.images import MAX_IMAGE_PIXELS as MAX_PIXELS
from ..data.images import ImageError
from ..data.images import open_image as load_image
from .cache import ImageCache
from .encoder import UnifiedMultimodalEncoder
from .preprocess import (
    Augment,
    expand_image_tokens,
    file_image_tokens,
    image_grid,
    image_token_repeats,
    num_image_tokens,
    patch_grid,
    preprocess_image,
)

__all__ = [
    "MAX_PIXELS",
    "Augment",
    "ImageCache",
    "ImageError",
    "expand_image_tokens",
    "file_image_tokens",
    "image_grid",
    "image_token_repeats",
    "load_image",
    "num_image_tokens",
    "patch_grid",
    "preprocess_image",
    "UnifiedMultimodalEncoder",
]
