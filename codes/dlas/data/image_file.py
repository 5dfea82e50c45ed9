"""Decoding one image file into the float RGB array every dataset works on.

Whatever is on disk (8- or 16-bit, grayscale, palette, with or without alpha, CMYK) comes out as a float32
``H x W x 3`` RGB array in [0, 1]. Transparent pixels are composited onto **white** (the usual look of a
transparent PNG in a viewer; dropping alpha instead would expose whatever colour the encoder left under
fully transparent pixels, often black garbage). A file that cannot be decoded completely raises
:class:`UnreadableImage` so the dataset can skip it.
"""
from __future__ import annotations

import io
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
    return to_rgb_float(decode_image(path))


def decode_image(path: str) -> np.ndarray:
    """Decode ``path`` without converting it: HWC with 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)
    channels, dtype uint8, uint16, int32 or float32 as stored.

    Datasets crop this array and convert only the crop with :func:`to_rgb_float`, which for a 2K photo and a
    128-pixel crop saves most of the conversion time. Raises :class:`UnreadableImage`.
    """
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise UnreadableImage(f"cannot open: {exc.strerror or exc}") from exc
    if size == 0:
        raise UnreadableImage("file is empty (0 bytes)")
    return _decode(path)


def decode_image_bytes(data: bytes) -> np.ndarray:
    """:func:`decode_image` of an encoded image held in memory (an LMDB value, a tar member)."""
    if not data:
        raise UnreadableImage("image is empty (0 bytes)")
    return _decode(io.BytesIO(data))


def _decode(source: str | io.BytesIO) -> np.ndarray:
    try:
        with Image.open(source) as image:
            image.load()  # decodes everything: a truncated file raises here, not later in a training step
            ImageOps.exif_transpose(image, in_place=True)  # phone photos store their rotation in EXIF
            array = _native_array(image)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise UnreadableImage(f"cannot decode: {exc}") from exc
    if _is_16bit_color_png(source):
        # Pillow reduces 16-bit colour PNGs to 8 bits; OpenCV keeps all 16.
        array = _read_16bit_color_png(source, array)
    return array


def _native_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("PA", "RGBa"):
        image = image.convert("RGBA")
    elif mode == "La":
        image = image.convert("LA")
    elif mode == "1":
        image = image.convert("L")
    elif mode not in ("L", "LA", "RGB", "RGBA", "I", "F") and not mode.startswith("I;16"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    array = np.asarray(image)
    if array.dtype.byteorder == ">":  # big-endian 16-bit (I;16B)
        array = array.astype(array.dtype.newbyteorder("="))
    return array[:, :, None] if array.ndim == 2 else array


def to_rgb_float(array: np.ndarray) -> np.ndarray:
    """A :func:`decode_image` array (or a crop of it) as float32 RGB in [0, 1]; alpha composited on white."""
    if array.dtype == np.uint8:
        result = array.astype(np.float32) * (1.0 / 255.0)
    elif array.dtype == np.uint16 or array.dtype == np.int32:  # int32: Pillow's "I" mode, 16-bit data
        result = np.clip(array.astype(np.float32) * (1.0 / 65535.0), 0.0, 1.0)
    else:
        result = np.clip(array.astype(np.float32), 0.0, 1.0)
    if result.shape[2] in (2, 4):
        alpha = result[:, :, -1:]
        result = result[:, :, :-1] * alpha + (1.0 - alpha)
    if result.shape[2] == 1:
        result = np.repeat(result, 3, axis=2)
    return np.ascontiguousarray(result)


def _is_16bit_color_png(source: str | io.BytesIO) -> bool:
    if isinstance(source, io.BytesIO):
        header = source.getvalue()[:26]
    else:
        with open(source, "rb") as file:
            header = file.read(26)
    # IHDR: bytes 24 and 25 are bit depth and colour type (2 = RGB, 6 = RGBA).
    return len(header) == 26 and header[:8] == _PNG_SIGNATURE and header[24] == 16 and header[25] in (2, 6)


def _read_16bit_color_png(source: str | io.BytesIO, fallback: np.ndarray) -> np.ndarray:
    if isinstance(source, io.BytesIO):
        data = cv2.imdecode(np.frombuffer(source.getbuffer(), np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        data = cv2.imread(source, cv2.IMREAD_UNCHANGED)
    if data is None or data.dtype != np.uint16 or data.ndim != 3:
        return fallback
    code = cv2.COLOR_BGRA2RGBA if data.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(data, code)


def write_image(path: str, image: np.ndarray) -> None:
    """Write a float RGB array in [0, 1] (or uint8 RGB) as an 8-bit file; the extension picks the format.

    Raises :class:`OSError` whose message says why (without the path) when the file cannot be written.
    """
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    try:
        written = cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    except cv2.error as exc:  # e.g. an extension OpenCV has no writer for
        raise OSError(f"OpenCV cannot write it: {str(exc).strip().splitlines()[-1]}") from exc
    if not written:  # OpenCV says no more: usually a folder of that name, a read-only or a full disk
        raise OSError("OpenCV could not write the file (a folder of that name? a read-only or full disk?)")
