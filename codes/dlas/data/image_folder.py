"""``image_folder``: HQ images from folders; LQ inputs made on the fly by a degradation chain."""
from __future__ import annotations

from typing import Any, Literal, Union

import numpy as np

from dlas.data.base import BadImage, SeededDataset
from dlas.data.degradations import DegradationPipeline
from dlas.data.file_index import IMAGE_CACHE_MB, resolve_image_paths
from dlas.data.image_file import UnreadableImage, to_rgb_float
from dlas.data.transforms import flip_rotate, random_crop, to_tensor
from dlas.errors import ConfigError
from dlas.registry import DATASETS


@DATASETS.register("image_folder")
class ImageFolderDataset(SeededDataset):
    """HQ images from folders, each item a random crop and its degraded LQ version.

    Per item: decode one HQ image, take a random ``target_size`` crop, apply the random flip/rotation, then
    make the LQ crop (``target_size / scale`` pixels square) with the ``degradations`` chain.
    Items: ``hq`` (3 x target_size x target_size), ``lq`` (3 x target_size/scale x target_size/scale), float
    in [0, 1], and ``path`` (the HQ file).

    paths: image folders (searched recursively), LMDB folders (BasicSR's layout), image files, ``.txt`` lists of
        files, or scikit-image samples such as ``skimage:color`` (nine RGB photographs) and ``skimage:coffee``
        (see docs/data.md).
    target_size: HQ crop side in pixels (default 128, ESRGAN's patch); must be divisible by ``scale``.
        Images smaller than this are skipped like unreadable ones.
    scale: the super-resolution factor; the LQ crop is ``target_size / scale`` (default 4).
    use_flip: random horizontal flips (default true).
    use_rot: random rotations by multiples of 90 degrees (default true).
    degradations: how LQ is made from HQ: a list of steps (blur, motion_blur, sinc, resize, noise, jpeg,
        color_jitter, resize_to_lq, chain, shuffle, one_of; each with a ``prob``) or a preset name, ``bicubic``
        (default, antialiased bicubic downscaling) or ``real_esrgan`` (the second-order chain).
    quantize_lq: round LQ to 8-bit levels like a saved image (default true).
    on_bad_image: ``skip`` (default) replaces unreadable, truncated or too-small images by another item and
        warns once per file (``dataset.bad_count`` counts them); ``error`` stops with the file's name.
    cache_index: cache folder listings, so restarting on 100k files is instant (default true).
    cache_mb: decoded images kept in memory per loader process, in MB (default 256): a dataset of a few photos
        is decoded once per worker instead of once per item; 0 turns it off.
    """

    keys = ("lq", "hq", "path")  # the state keys of every item (the trainer checks its graph against them)

    def __init__(self, paths: list[str], target_size: int = 128, scale: int = 4, use_flip: bool = True,
                 use_rot: bool = True, degradations: Union[None, str, list[dict]] = None,
                 quantize_lq: bool = True, on_bad_image: Literal["skip", "error"] = "skip",
                 cache_index: bool = True, cache_mb: int = IMAGE_CACHE_MB):
        super().__init__(on_bad_image)
        if scale < 1:
            raise ConfigError(f"must be a positive integer, got {scale}", "scale")
        if target_size < scale or target_size % scale:
            raise ConfigError(f"must be a positive multiple of scale ({scale}), got {target_size}", "target_size")
        self.files = resolve_image_paths(paths, "paths", cache_index)
        self.files.cache_decoded(cache_mb)
        self.target_size = target_size
        self.scale = scale
        self.use_flip = use_flip
        self.use_rot = use_rot
        self.degrade = DegradationPipeline(degradations, quantize=quantize_lq)

    def __len__(self) -> int:
        return len(self.files)

    def files_of(self, index: int) -> list[str]:
        return [self.files[index]]

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        path = self.files[index]
        try:
            image = self.files.decode(path)
        except UnreadableImage as exc:
            raise BadImage(path, str(exc)) from exc
        height, width = image.shape[:2]
        if height < self.target_size or width < self.target_size:
            raise BadImage(path, f"{width}x{height} is smaller than target_size {self.target_size}")
        # Crop before converting to float: converting a whole 2K photo costs more than decoding it.
        hq = random_crop(image, self.target_size, rng)
        (hq,) = flip_rotate([hq], rng, self.use_flip, self.use_rot)
        hq = to_rgb_float(hq)
        lq_side = self.target_size // self.scale
        lq = self.degrade(hq, (lq_side, lq_side), rng)
        return {"lq": to_tensor(lq), "hq": to_tensor(hq), "path": path}
