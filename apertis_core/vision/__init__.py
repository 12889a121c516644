"""Vision for Apertis: image loading and preprocessing, and the Unified Multimodal Encoder (UME)."""

from ..data.images import MAX_IMAGE_PIXELS, ImageError, open_image
from ..image_tokens import expand_image_tokens, image_grid, image_token_repeats, num_image_tokens, patch_grid
from .cache import ImageCache
from .encoder import UnifiedMultimodalEncoder
from .preprocess import Augment, file_image_tokens, preprocess_image

__all__ = [
    "MAX_IMAGE_PIXELS",
    "Augment",
    "ImageCache",
    "ImageError",
    "expand_image_tokens",
    "file_image_tokens",
    "image_grid",
    "image_token_repeats",
    "open_image",
    "num_image_tokens",
    "patch_grid",
    "preprocess_image",
    "UnifiedMultimodalEncoder",
]
