"""Image file checks and loading: every failure becomes a one-line reason instead of a PIL traceback."""

from __future__ import annotations

import contextlib
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
# 40 MP is well above any photo the encoder needs (it downsizes to a few hundred patches) and well below
# what a decompression bomb claims; PIL's own limit (89 MP warning) is too generous for a training loop.
MAX_IMAGE_PIXELS = 40_000_000
# Only the decoders for the accepted suffixes: PIL would otherwise identify a file by its content, and some of
# its other plugins hand the data to external programs (EPS to Ghostscript). JPEG covers cameras' MPO files.
DECODED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


def check_image(path: str | Path) -> str | None:
    """Why `path` is not a usable image (missing, empty, not an image, truncated, too large), or None.

    Decodes the whole file, since a truncated JPEG only fails when its pixels are read.
    """
    try:
        with _decoded(Path(path)):
            return None
    except ImageError as exc:
        return str(exc)


def open_image(path: str | Path, max_pixels: int | None = None):
    """The image as an RGB PIL image, upright per its EXIF orientation, transparency on white;
    ImageError (naming the file) if unusable. The header size is checked before any pixel is decoded."""
    from PIL import ImageOps

    path = Path(path)
    try:
        with _decoded(path, max_pixels) as image:
            return to_rgb(ImageOps.exif_transpose(image))
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from exc


def to_rgb(image):
    """RGB, with any transparency composited onto white (plain convert() would turn it black)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@contextlib.contextmanager
def _decoded(path: Path, max_pixels: int | None = None) -> Iterator:
    """Yield the fully decoded image; any failure (also inside the with-body) becomes ImageError."""
    from PIL import Image, UnidentifiedImageError

    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise ImageError(f"cannot read the file ({getattr(exc, 'strerror', None) or exc})") from None
    if not stat.S_ISREG(info.st_mode):  # opening a FIFO would wait for a writer forever
        raise ImageError("not a regular file (a folder, pipe or device)")
    if info.st_size == 0:
        raise ImageError("empty file (0 bytes)")
    bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=DECODED_FORMATS) as image:
                width, height = image.size
                limit = max_pixels or MAX_IMAGE_PIXELS
                if width * height > limit:
                    raise ImageError(_bomb_message(f"{width}x{height} = {width * height:,} pixels", limit))
                image.load()
                yield image
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(
                "not an image file (format not recognised: not PNG, JPEG, WebP, BMP or GIF); convert it to PNG or JPEG"
            ) from None
        except bomb as exc:
            raise ImageError(_bomb_message(str(exc), max_pixels or MAX_IMAGE_PIXELS)) from None
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for damaged data
            raise ImageError(
                f"damaged or truncated image ({type(exc).__name__}: {exc}); re-export or remove the file"
            ) from None


def _bomb_message(detail: str, limit: int) -> str:
    return f"image too large ({detail}; limit {limit:,} pixels), possibly a decompression bomb; resize the image"
