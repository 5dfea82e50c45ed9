"""Image files in and out of inference: tensors <-> uint8 arrays, reading, writing, listing image folders.

``dlas-test``, ``codes/process_video.py``, the inference tasks and the evaluators share these, so a model's
output is quantised and saved the same way everywhere.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch

from dlas.errors import DataError
from dlas.metrics.convention import tensor_to_uint8

__all__ = ["list_images", "load_image", "prepare_output_folder", "save_image", "tensor_to_uint8"]


def load_image(path: Union[str, Path]) -> torch.Tensor:
    """Read an image file as a CHW float32 RGB tensor in [0, 1]; an unreadable file is a :class:`DataError`."""
    from dlas.data.image_file import UnreadableImage, read_image

    try:
        array = read_image(str(path))
    except UnreadableImage as exc:
        raise DataError(f"unreadable image: {exc}", str(path)) from exc
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def save_image(path: Union[str, Path], image: Union[torch.Tensor, np.ndarray]) -> None:
    """Write a CHW [0, 1] tensor or an HWC uint8 RGB array as an 8-bit image (format from the extension)."""
    from dlas.data.image_file import write_image

    array = tensor_to_uint8(image) if isinstance(image, torch.Tensor) else image
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_image(str(path), array)
    except OSError as exc:  # a file where a folder should be, a read-only disk, a full disk
        raise DataError(f"cannot write the image: {exc.strerror or exc}; choose another output folder",
                        str(path)) from exc


def prepare_output_folder(path: Union[str, Path]) -> Path:
    """Create the output folder ``path`` (a :class:`DataError` if that is impossible) and return it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the output folder: {exc.strerror or exc}", str(path)) from exc
    return path


def list_images(path: Union[str, Path]) -> list[Path]:
    """The image files of a folder (sorted, not recursive; hidden files such as macOS ``._x.png`` stubs
    skipped, as the datasets do), or ``[path]`` for a single file."""
    from dlas.data.image_file import is_image_file

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError("no such file or folder", str(path))
    files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p.name) and not p.name.startswith("."))
    if not files:
        raise DataError("folder holds no image files (.png, .jpg, ...)", str(path))
    return files


