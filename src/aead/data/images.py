"""Reading image files strictly, with numpy and Pillow only (no torch), so that the torch-free runtime
(:mod:`aead.deploy.runtime`) reads images exactly as the pipeline does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from aead.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image fully into (H, W, 3) uint8 RGB.

    Grayscale becomes 3 equal channels, 16-bit is scaled to 8 bit, palette images are expanded, the alpha
    channel of RGBA/LA is dropped. Empty, truncated or non-image files raise :class:`DataError`.
    """
    path = Path(path)
    img = open_image(path)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode != "I" or arr.max() > 255 else 255.0
        gray = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise DataError(f"{path}: floating-point images are not supported (expected 8- or 16-bit)")
    if mode in ("L", "1", "LA"):
        gray = np.asarray(img.convert("L"), dtype=np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def open_header(path: Path) -> Image.Image:
    """The opened (not yet decoded) image; missing, empty and non-image files raise :class:`DataError`."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes), expected an image")
    try:
        img = Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot decode image ({err}); the file is damaged or not an image") from err
    if img.width < 1 or img.height < 1:
        raise DataError(f"{path}: image has no pixels")
    return img


def open_image(path: Path) -> Image.Image:
    """The fully decoded image (see :func:`open_header` for the errors)."""
    img = open_header(path)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot decode image ({err}); the file is damaged or not an image") from err
    return img
