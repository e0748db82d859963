"""Image and mask reading with clear errors (one file, one message, one fix).

Policy for unusual but valid inputs (documented in the README):
* greyscale (L, LA, P), CMYK, YCbCr → RGB (as the official ``convert('RGB')``); RGBA drops alpha;
* 16-bit greyscale (``I;16*``) and 32-bit integer (``I``) are scaled to 8 bit by their full range
  (PIL's own conversion would clip every value above 255 to white);
* masks: any mode, multi-channel masks take the channel max, values > half of the mask's dtype
  range (> 127 for 8 bit; > 0.5 for masks saved as 0/1) count as anomalous.
* images are turned upright by their EXIF orientation (a phone JPEG with Orientation=6 is scored as
  it is shown, and its maps and overlays are in that frame); masks are read as stored.
Corrupt, truncated and empty files, and images over PIL's decompression-bomb limit, raise
:class:`ImageReadError` naming the file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "decode_rgb",
    "image_mode",
    "is_image_file",
    "read_mask",
    "read_rgb",
    "upright",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An image or mask file cannot be used; the message names the file and the fix."""


def is_image_file(path: str | os.PathLike) -> bool:
    """True for file names with a supported image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        msg = f"{path}: file not found."
        raise ImageReadError(msg)
    if path.stat().st_size == 0:
        msg = f"{path}: empty file (0 bytes). Re-copy or remove it."
        raise ImageReadError(msg)
    try:
        img = Image.open(path)
        img.load()
    except Image.DecompressionBombError as err:
        msg = (
            f"{path}: too many pixels ({err}). This is PIL's guard against decompression bombs: "
            "downscale a genuine image before use, or remove the file."
        )
        raise ImageReadError(msg) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        msg = f"{path}: cannot decode image ({err}). The file is corrupt or truncated: re-export or remove it."
        raise ImageReadError(msg) from err
    return img


def image_mode(path: str | os.PathLike) -> str:
    """The PIL mode of an image file (header only), with :func:`read_rgb`'s errors."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            return img.mode
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return _open(path).mode  # raises the named error


def _to_uint8_grey(img: Image.Image, path: Path) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype in (np.uint16, np.int32, np.uint32, np.int64) or img.mode.startswith("I"):
        top = 65535.0 if (img.mode.startswith("I;16") or arr.max(initial=0) <= 65535) else float(arr.max())
        return np.clip(arr.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if arr.dtype in (np.float32, np.float64):
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    msg = f"{path}: unsupported pixel format {img.mode} ({arr.dtype}). Convert it to 8-bit RGB PNG/JPEG."
    raise ImageReadError(msg)


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Read any supported image as an 8-bit RGB PIL image (see module policy)."""
    path = Path(path)
    return _as_rgb(upright(_open(path)), path)


EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 = stored upright


def upright(img: Image.Image) -> Image.Image:
    """``img`` as it is displayed: rotated/flipped by its EXIF orientation (unchanged without one)."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError):  # unreadable EXIF: the pixels as stored
        return img
    if orientation in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def decode_rgb(data: bytes, name: str = "image") -> Image.Image:
    """An encoded image file held in memory (an upload, a base64 field) as 8-bit RGB, with
    :func:`read_rgb`'s policy; errors are :class:`ImageReadError` naming ``name``."""
    if not data:
        msg = f"{name}: empty file (0 bytes)."
        raise ImageReadError(msg)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError as err:
        msg = f"{name}: too many pixels ({err}): downscale the image first."
        raise ImageReadError(msg) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        msg = f"{name}: not a readable image file (PNG, JPEG, BMP, TIFF, WebP): {type(err).__name__}."
        raise ImageReadError(msg) from err
    return _as_rgb(upright(img), Path(name))


def _as_rgb(img: Image.Image, path: Path) -> Image.Image:
    if img.mode in ("RGB",):
        return img
    if img.mode in ("L", "P", "LA", "RGBA", "CMYK", "YCbCr", "PA", "1", "RGBX", "HSV", "LAB"):
        return img.convert("RGB")
    grey = _to_uint8_grey(img, path)
    if grey.ndim == 3:
        grey = grey[..., :3] if grey.shape[-1] >= 3 else np.repeat(grey[..., :1], 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(grey), "RGB")
    return Image.fromarray(grey, "L").convert("RGB")


def read_mask(path: str | os.PathLike, expected_size: tuple[int, int] | None = None) -> Image.Image:
    """Read a mask as a binary 8-bit 'L' image (0 or 255).

    Args:
        expected_size: (width, height) of the image it belongs to; a mismatch raises.
    """
    path = Path(path)
    img = _open(path)
    if expected_size is not None and img.size != tuple(expected_size):
        msg = (
            f"{path}: mask is {img.size[0]}×{img.size[1]} but its image is "
            f"{expected_size[0]}×{expected_size[1]}. Masks must have the image's size."
        )
        raise ImageReadError(msg)
    if img.mode in ("RGB", "RGBA", "CMYK", "P", "LA", "YCbCr"):
        arr = np.asarray(img.convert("RGB")).max(axis=-1)
    elif img.mode == "1":
        arr = np.asarray(img).astype(np.uint8) * 255
    else:
        arr = np.asarray(img)
        if arr.ndim == 3:
            arr = arr.max(axis=-1)
    top = float(arr.max(initial=0))
    if arr.dtype == np.uint8:
        thresh = 0.5 if top <= 1 else 127
    elif arr.dtype == np.uint16 or img.mode.startswith("I;16"):
        thresh = 0.5 if top <= 1 else 32767
    else:
        thresh = 0.5 if top <= 1 else top / 2
    binary = (arr > thresh).astype(np.uint8) * 255
    return Image.fromarray(binary, "L")
