"""ImageCache: the images of a training set, decoded and resized once, augmented afresh at every step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .preprocess import Augment, ResizedImage, file_image_tokens, finish_image, resize_image


class ImageCache:
    """Turns a batch's image paths into model-ready tensors.

    Decoding and resizing dominate the cost of an image and give the same result every time, so their
    output (uint8, a few KB for a small image) is kept up to `max_bytes`; augmentation stays random.
    """

    def __init__(self, patch_size: int, max_patches: int, augment: Augment | None = None, max_bytes: int = 2 << 30):
        self.patch_size, self.max_patches = patch_size, max_patches
        self.augment = augment  # None: no augmentation even when training
        self.max_bytes = max_bytes
        self._resized: dict[Path, ResizedImage] = {}
        self._bytes = 0

    def file_tokens(self, path: Path) -> int:
        """The positions this image will fill in the token sequence (read from its header)."""
        return file_image_tokens(path, self.patch_size, self.max_patches)

    def image(self, path: Path, train: bool) -> torch.Tensor:
        resized = self._resized.get(path)
        if resized is None:
            resized = resize_image(path, self.patch_size, self.max_patches)
            if self._bytes + resized.pixels.numel() <= self.max_bytes:  # past the cap: decode again next time
                self._resized[path] = resized
                self._bytes += resized.pixels.numel()
        augmenting = train and self.augment is not None
        return finish_image(resized, self.patch_size, augmenting, self.augment)

    def batch(
        self, per_sample: Sequence[Sequence[Path]] | None, train: bool, device: torch.device | str = "cpu"
    ) -> list[torch.Tensor] | None:
        """All images of a batch in model order (sample by sample, each in <image> order), or None."""
        if not per_sample:
            return None
        images = [self.image(path, train).to(device, non_blocking=True) for paths in per_sample for path in paths]
        return images or None
