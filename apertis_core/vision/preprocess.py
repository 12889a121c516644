"""Image preprocessing for the UME: safe loading, aspect-preserving adaptive resolution, augmentation.

The patch-grid and token-count arithmetic it follows lives in ..image_tokens (plain integers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..data.images import open_image, to_rgb
from ..image_tokens import image_grid, image_layout

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

    img = open_image(img) if isinstance(img, (str, Path)) else to_rgb(img)
    rows, cols, new_width, new_height = image_layout(img.width, img.height, patch_size, max_patches)
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
        if img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # open_image turns these upright: sides swap
            width, height = height, width
    rows, cols = image_grid(width, height, patch_size, max_patches)
    return rows * cols


_EXIF_ORIENTATION = 0x0112
