"""Image-token arithmetic in plain integers: the patch grid an image gets and how many `<image>` positions
it fills in the token sequence.

A leaf (it imports nothing of apertis_core), so the model, the datasets and vision all use it and none
has to import another for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def image_layout(width: int, height: int, patch_size: int, max_patches: int) -> tuple[int, int, int, int]:
    """(rows, cols, new_width, new_height): the largest aspect-preserving scale whose padded grid fits.

    As in Pix2Struct, small images are scaled up and large ones down so the patch budget is used; unlike
    Pix2Struct the aspect ratio is kept exactly and the remainder of the last row/column is padding.
    The best scale makes one side a whole number of patches, so only those scales are tried (exactly,
    with fractions, because the patch count grows in steps).
    """
    if min(width, height) <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if patch_size <= 0 or max_patches <= 0:
        raise ValueError(f"patch_size and max_patches must be positive, got {patch_size} and {max_patches}")
    best = Fraction(0)
    for side in (height, width):
        for k in range(1, max_patches + 1):
            scale = Fraction(k, side)  # patches per source pixel: this side spans exactly k patches
            if _ceil(height * scale) * _ceil(width * scale) > max_patches:
                break  # the count only grows with the scale
            best = max(best, scale)
    rows, cols = _ceil(height * best), _ceil(width * best)
    new_width = max(1, round(width * best * patch_size))
    new_height = max(1, round(height * best * patch_size))
    return rows, cols, new_width, new_height


def _ceil(value: Fraction) -> int:
    return -(-value.numerator // value.denominator)


def image_grid(width: int, height: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """(rows, cols) of the patch grid an image of this size gets: aspect kept, rows * cols <= max_patches."""
    rows, cols, _, _ = image_layout(width, height, patch_size, max_patches)
    return rows, cols


def patch_grid(tensor_or_size: torch.Tensor | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """(rows, cols) of a preprocessed image tensor (..., H, W) or an (H, W) size; sides must be whole patches."""
    height, width = getattr(tensor_or_size, "shape", tensor_or_size)[-2:]  # read the shape: no torch needed
    if height % patch_size or width % patch_size or height <= 0 or width <= 0:
        raise ValueError(
            f"an image of {height}x{width} pixels is not a whole number of {patch_size}-pixel patches; "
            "pass it through preprocess_image with the model's image_patch_size"
        )
    return height // patch_size, width // patch_size


def num_image_tokens(tensor_or_size: torch.Tensor | tuple[int, int], patch_size: int) -> int:
    """How many <image> positions a preprocessed image fills in the token sequence (rows * cols)."""
    rows, cols = patch_grid(tensor_or_size, patch_size)
    return rows * cols


def image_token_repeats(ids: Sequence[int], image_id: int, counts: Sequence[int]) -> list[int]:
    """How many positions each token becomes: an `<image>` id its image's patch count, any other 1."""
    slots = sum(token == image_id for token in ids)
    if slots != len(counts):
        raise ValueError(f"the text has {slots} <image> markers but {len(counts)} images were given")
    counts_left = iter(counts)
    return [next(counts_left) if token == image_id else 1 for token in ids]


def expand_image_tokens(ids: Sequence[int], image_id: int, counts: Sequence[int]) -> list[int]:
    """Each `<image>` id -> as many positions as its image has patches (the model fills them in order).

    `counts` are patch counts: num_image_tokens(tensor) for preprocessed images, file_image_tokens for files.
    """
    repeats = image_token_repeats(ids, image_id, counts)
    return [token for token, repeat in zip(ids, repeats, strict=True) for _ in range(repeat)]
