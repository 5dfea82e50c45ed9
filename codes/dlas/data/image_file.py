"""Decoding one image file into the float RGB array every dataset works on.

Whatever is on disk (8- or 16-bit, grayscale, palette, with or without alpha, CMYK) comes out as a float32
``H x W x 3`` RGB array in [0, 1]. Transparent pixels are composited onto **white** (the usual look of a
transparent PNG in a viewer; dropping alpha instead would expose whatever colour the encoder left under
fully transparent pixels, often black garbage). A file that cannot be decoded completely raises
:class:`UnreadableImage` so the dataset can skip it.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class UnreadableImage(Exception):
    """A file that is not a decodable image (zero bytes, truncated, wrong format). ``str()`` says why."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def read_image(path: str) -> np.ndarray:
    """Decode ``path`` into a float32 RGB array of shape (H, W, 3) with values in [0, 1].

    Raises :class:`UnreadableImage` for empty, truncated or undecodable files.
    """
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise UnreadableImage(f"cannot open: {exc.strerror or exc}") from exc
    if size == 0:
        raise UnreadableImage("file is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()  # decodes everything: a truncated file raises here, not later in a training step
            image = ImageOps.exif_transpose(image)
            array = _to_rgb_float(image)
    except UnreadableImage:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise UnreadableImage(f"cannot decode: {exc}") from exc
    if _is_16bit_color_png(path):
        # Pillow reduces 16-bit colour PNGs to 8 bits; OpenCV keeps all 16.
        array = _read_16bit_color_png(path, array)
    return array


def _to_rgb_float(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        gray = np.asarray(image).astype(np.float32) / 65535.0
        return np.repeat(np.clip(gray, 0.0, 1.0)[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    elif mode != "RGBA" and mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.shape[2] == 4:
        array = _composite_on_white(array)
    return np.ascontiguousarray(array)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[:, :, 3:4]
    return rgba[:, :, :3] * alpha + (1.0 - alpha)


def _is_16bit_color_png(path: str) -> bool:
    with open(path, "rb") as file:
        header = file.read(26)
    # IHDR: bytes 24 and 25 are bit depth and colour type (2 = RGB, 6 = RGBA).
    return len(header) == 26 and header[:8] == _PNG_SIGNATURE and header[24] == 16 and header[25] in (2, 6)


def _read_16bit_color_png(path: str, fallback: np.ndarray) -> np.ndarray:
    data = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if data is None or data.dtype != np.uint16 or data.ndim != 3:
        return fallback
    array = data.astype(np.float32) / 65535.0
    if array.shape[2] == 4:
        array = _composite_on_white(cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA))
    else:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(array)


def write_image(path: str, image: np.ndarray) -> None:
    """Write a float RGB array in [0, 1] (or uint8 RGB) as an 8-bit file; the extension picks the format."""
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
