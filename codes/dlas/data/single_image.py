"""``single_image``: whole-image validation sets, LQ made from each HQ image."""
from __future__ import annotations

from typing import Any, Literal, Union

import numpy as np

from dlas.data.base import BadImage, SampleKey, SeededDataset, split_key
from dlas.data.degradations import DegradationPipeline
from dlas.data.file_index import resolve_image_paths
from dlas.data.image_file import UnreadableImage, to_rgb_float
from dlas.data.transforms import to_tensor
from dlas.errors import ConfigError, DataError
from dlas.registry import DATASETS


@DATASETS.register("single_image")
class SingleImageDataset(SeededDataset):
    """Whole HQ images and their LQ versions, for validation and testing (use batch size 1: sizes differ).

    The HQ image is cropped at its bottom/right edge to a multiple of ``force_multiple`` so that
    ``LQ size * scale == HQ size`` exactly (the ``GTmod12`` convention of Set5/Set14 uses 12). The LQ image is
    made by ``degradations`` (default: antialiased bicubic). Items are the same in every epoch, so
    validation numbers are comparable between evaluations. Items: ``lq``, ``hq``, ``path``.

    paths: image folders, LMDB folders, files, ``.txt`` lists or scikit-image samples (``skimage:coffee``,
        ``skimage:color``).
    scale: the super-resolution factor (default 4).
    force_multiple: ``true`` (default) crops HQ to a multiple of ``scale``; a number crops to a multiple of it
        (it must itself be a multiple of ``scale``); ``false`` requires every image to be a multiple already.
    degradations: a list of degradation steps or a preset (``bicubic``, ``real_esrgan``); default bicubic.
    quantize_lq: round LQ to 8-bit levels (default true).
    on_bad_image: ``skip`` (default) or ``error`` for unreadable images. Skipped images are replaced by
        another image of the set, so prefer cleaning a validation set over skipping.
    cache_index: cache folder listings (default true).
    """

    keys = ("lq", "hq", "path")  # the state keys of every item (the trainer checks its graph against them)

    def __init__(self, paths: list[str], scale: int = 4, force_multiple: Union[bool, int] = True,
                 degradations: Union[None, str, list[dict]] = None, quantize_lq: bool = True,
                 on_bad_image: Literal["skip", "error"] = "skip", cache_index: bool = True):
        super().__init__(on_bad_image)
        if scale < 1:
            raise ConfigError(f"must be a positive integer, got {scale}", "scale")
        if force_multiple is True:
            self.multiple = scale
        elif force_multiple is False:
            self.multiple = 0
        elif force_multiple < 1 or force_multiple % scale:
            raise ConfigError(f"must be true, false or a positive multiple of scale ({scale}), "
                              f"got {force_multiple}", "force_multiple")
        else:
            self.multiple = int(force_multiple)
        self.files = resolve_image_paths(paths, "paths", cache_index)
        self.scale = scale
        self.degrade = DegradationPipeline(degradations, quantize=quantize_lq)

    def __len__(self) -> int:
        return len(self.files)

    def files_of(self, index: int) -> list[str]:
        return [self.files[index]]

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        # Validation must not change between passes: every epoch sees epoch 0's degradations.
        return super().__getitem__((0, split_key(key)[1]))

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        path = self.files[index]
        try:
            hq = to_rgb_float(self.files.decode(path))
        except UnreadableImage as exc:
            raise BadImage(path, str(exc)) from exc
        height, width = hq.shape[:2]
        if self.multiple:
            height, width = height - height % self.multiple, width - width % self.multiple
            if height == 0 or width == 0:
                raise BadImage(path, f"{hq.shape[1]}x{hq.shape[0]} is smaller than force_multiple {self.multiple}")
            hq = np.ascontiguousarray(hq[:height, :width])
        elif height % self.scale or width % self.scale:
            raise DataError(f"{width}x{height} is not a multiple of scale {self.scale}; set force_multiple: true "
                            f"to crop it", path)
        lq = self.degrade(hq, (height // self.scale, width // self.scale), rng)
        return {"lq": to_tensor(lq), "hq": to_tensor(hq), "path": path}
