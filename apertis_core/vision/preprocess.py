"""Image preprocessing for the UME: safe loading, aspect-preserving adaptive resolution, patch grids, augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from PIL import Image

from ..data.images import open_image as load_image
from ..data.images import to_rgb

# ImageNet statistics: what torchvision's pretrained backbones expect, and harmless for a ViT from scratch.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclass
class Augment:
    """Training-time augmentation. Only photometric by default: flips or crops would change the answers
    to "left or right" / "top or bottom" questions, and hue shifts would change colour answers."""

    brightness: float = 0.1  # max relative brightness change
    contrast: float = 0.1  # max relative contrast change
    saturation: float = 0.1  # max relative saturation change
    hue: float = 0.0  # max hue shift in [0, 0.5]; 0 keeps colour names true
    hflip: bool = False  # random horizontal flip; only for data whose text does not mention left/right


def _layout(width: int, height: int, patch_size: int, max_patches: int) -> tuple[int, int, int, int]:
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
    rows, cols, _, _ = _layout(width, height, patch_size, max_patches)
    return rows, cols


def patch_grid(tensor_or_size: torch.Tensor | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """(rows, cols) of a preprocessed image tensor (..., H, W) or an (H, W) size; sides must be whole patches."""
    height, width = tensor_or_size.shape[-2:] if isinstance(tensor_or_size, torch.Tensor) else tensor_or_size
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


def preprocess_image(
    img: Image.Image | str | Path,
    patch_size: int,
    max_patches: int,
    train: bool = False,
    augment: Augment | None = None,
) -> torch.Tensor:
    """A file or PIL image -> normalised float tensor (3, rows * patch_size, cols * patch_size).

    The image is resized with its aspect ratio kept, augmented when `train` (photometric only unless
    `augment` says otherwise), normalised, and zero-padded (the mean colour) on the right and bottom.
    """
    return finish_image(resize_image(img, patch_size, max_patches), patch_size, train, augment)


@dataclass(frozen=True)
class ResizedImage:
    """The expensive half of preprocessing (decode + resize), worth keeping between training steps."""

    pixels: torch.Tensor  # (3, h, w) uint8, aspect kept, not yet padded
    rows: int  # patch grid the padded image will have
    cols: int


def resize_image(img: Image.Image | str | Path, patch_size: int, max_patches: int) -> ResizedImage:
    from torchvision.transforms import v2  # torchvision is slow to import; text-only use never needs it

    img = load_image(img) if isinstance(img, (str, Path)) else to_rgb(img)
    rows, cols, new_width, new_height = _layout(img.width, img.height, patch_size, max_patches)
    pixels = v2.Compose([v2.Resize((new_height, new_width), antialias=True), v2.ToImage()])(img)
    return ResizedImage(pixels.as_subclass(torch.Tensor), rows, cols)


def finish_image(
    image: ResizedImage, patch_size: int, train: bool = False, augment: Augment | None = None
) -> torch.Tensor:
    """Augment (when training), normalise and pad a resized image; cheap enough to do at every step."""
    from torchvision.transforms import v2

    steps = [v2.ToDtype(torch.float32, scale=True)]
    if train:
        augment = augment or Augment()
        steps.append(v2.ColorJitter(augment.brightness, augment.contrast, augment.saturation, augment.hue))
        if augment.hflip:
            steps.append(v2.RandomHorizontalFlip())
    height, width = image.pixels.shape[-2:]
    steps += [
        v2.Normalize(IMAGE_MEAN, IMAGE_STD),
        v2.Pad([0, 0, image.cols * patch_size - width, image.rows * patch_size - height], fill=0),
    ]
    return v2.Compose(steps)(image.pixels)


def file_image_tokens(path: str | Path, patch_size: int, max_patches: int) -> int:
    """How many <image> positions the image file will fill, from its header alone (no pixels decoded)."""
    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # load_image turns these upright: sides swap
            width, height = height, width
    rows, cols = image_grid(width, height, patch_size, max_patches)
    return rows * cols


_EXIF_ORIENTATION = 0x0112


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
