"""``paired_folder``: LQ/HQ image pairs stored on disk, matched by file name."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np

from dlas.data.base import BadImage, SeededDataset
from dlas.data.file_index import IMAGE_CACHE_MB, ImageFiles, resolve_image_paths
from dlas.data.image_file import UnreadableImage, to_rgb_float
from dlas.data.transforms import flip_rotate, paired_random_crop, to_tensor
from dlas.errors import ConfigError, DataError
from dlas.registry import DATASETS


@DATASETS.register("paired_folder")
class PairedFolderDataset(SeededDataset):
    """Pre-made LQ/HQ pairs (e.g. DIV2K's ``DIV2K_train_LR_bicubic/X4`` with ``DIV2K_train_HR``).

    Pairs are matched by file stem: HQ ``0001.png`` pairs with LQ ``0001<lq_suffix>.*`` (any image extension).
    Each HQ image must be exactly ``scale`` times its LQ partner in both sides; otherwise loading it raises a
    DataError naming both files. Crops are aligned: a random ``target_size / scale`` LQ crop and the HQ area it
    covers, with the same flip/rotation on both.
    Items: ``lq``, ``hq`` (float CHW in [0, 1]), ``path`` (the HQ file), ``lq_path``.

    lq_path: LQ folder(s), LMDB folder(s) or files (same forms as ``image_folder``'s ``paths``).
    hq_path: HQ folder(s), LMDB folder(s) or files.
    scale: HQ size / LQ size (default 4).
    target_size: HQ crop side (default 128; a multiple of scale); ``null`` gives whole images (validation,
        batch size 1).
    use_flip: random horizontal flips (default true).
    use_rot: random rotations by multiples of 90 degrees (default true).
    lq_suffix: what LQ stems add to HQ stems, e.g. ``x4`` for DIV2K's ``0001x4.png`` (default none).
    on_bad_image: ``skip`` (default) or ``error`` for unreadable or too-small images (see ``image_folder``).
    cache_index: cache folder listings (default true).
    cache_mb: decoded images kept in memory per loader process, in MB (default 256): a dataset of a few photos
        is decoded once per worker instead of once per item; 0 turns it off. HQ and LQ share it.
    """

    keys = ("lq", "hq", "path", "lq_path")  # every item's state keys (the trainer checks its graph with them)

    def __init__(self, lq_path: Union[str, list[str]], hq_path: Union[str, list[str]], scale: int = 4,
                 target_size: Optional[int] = 128, use_flip: bool = True, use_rot: bool = True,
                 lq_suffix: str = "", on_bad_image: Literal["skip", "error"] = "skip", cache_index: bool = True,
                 cache_mb: int = IMAGE_CACHE_MB):
        super().__init__(on_bad_image)
        if scale < 1:
            raise ConfigError(f"must be a positive integer, got {scale}", "scale")
        if target_size is not None and (target_size < scale or target_size % scale):
            raise ConfigError(f"must be a positive multiple of scale ({scale}), got {target_size}", "target_size")
        hq_files = resolve_image_paths(hq_path, "hq_path", cache_index)
        lq_files = resolve_image_paths(lq_path, "lq_path", cache_index)
        hq_share = scale**2 / (scale**2 + 1)  # an HQ image is scale^2 times its LQ: both caches hold the same pairs
        hq_files.cache_decoded(cache_mb * hq_share)
        lq_files.cache_decoded(cache_mb * (1 - hq_share))
        self.pairs = _match_pairs(lq_files, hq_files, lq_suffix)
        self.lq_files, self.hq_files = lq_files, hq_files
        self.scale = scale
        self.target_size = target_size
        self.use_flip = use_flip
        self.use_rot = use_rot

    def __len__(self) -> int:
        return len(self.pairs)

    def files_of(self, index: int) -> list[str]:
        return list(self.pairs[index])

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        lq_file, hq_file = self.pairs[index]
        lq, hq = _read(self.lq_files, lq_file), _read(self.hq_files, hq_file)
        if hq.shape[0] != lq.shape[0] * self.scale or hq.shape[1] != lq.shape[1] * self.scale:
            raise DataError(f"HQ is {hq.shape[1]}x{hq.shape[0]} but LQ '{lq_file}' is {lq.shape[1]}x{lq.shape[0]}; "
                            f"with scale {self.scale} HQ must be exactly {lq.shape[1] * self.scale}x"
                            f"{lq.shape[0] * self.scale} (crop the HQ image or fix the scale)", hq_file)
        if self.target_size is not None:
            lq_side = self.target_size // self.scale
            if lq.shape[0] < lq_side or lq.shape[1] < lq_side:
                raise BadImage(lq_file, f"{lq.shape[1]}x{lq.shape[0]} is smaller than the LQ crop {lq_side}")
            lq, hq = paired_random_crop(lq, hq, lq_side, self.scale, rng)
            lq, hq = flip_rotate([lq, hq], rng, self.use_flip, self.use_rot)
        return {"lq": to_tensor(to_rgb_float(lq)), "hq": to_tensor(to_rgb_float(hq)), "path": hq_file,
                "lq_path": lq_file}


def _read(files: ImageFiles, path: str) -> np.ndarray:
    try:
        return files.decode(path)  # converted to float after cropping
    except UnreadableImage as exc:
        raise BadImage(path, str(exc)) from exc


def _match_pairs(lq_files: list[str], hq_files: list[str], lq_suffix: str) -> list[tuple[str, str]]:
    lq_by_stem: dict[str, str] = {}
    for file in lq_files:
        stem = Path(file).stem
        if lq_suffix and stem.endswith(lq_suffix):
            stem = stem[: -len(lq_suffix)]
        if stem in lq_by_stem:
            raise ConfigError(f"two LQ files share the stem '{stem}': '{lq_by_stem[stem]}' and '{file}'; "
                              f"pairs are matched by stem, so stems must be unique", "lq_path")
        lq_by_stem[stem] = file
    pairs, unmatched, hq_by_stem = [], [], {}
    for file in hq_files:
        stem = Path(file).stem
        if stem in hq_by_stem:  # both would pair with the one LQ file of that stem: one pair would be wrong
            raise ConfigError(f"two HQ files share the stem '{stem}': '{hq_by_stem[stem]}' and '{file}'; "
                              f"pairs are matched by stem, so stems must be unique", "hq_path")
        hq_by_stem[stem] = file
        lq = lq_by_stem.get(stem)
        if lq is None:
            unmatched.append(file)
        else:
            pairs.append((lq, file))
    if unmatched:
        hint = f"'{Path(unmatched[0]).stem}{lq_suffix}.*'"
        raise ConfigError(f"{len(unmatched)} of {len(hq_files)} HQ images have no LQ partner (first: "
                          f"'{unmatched[0]}', expected {hint} in lq_path); set lq_suffix if LQ names add one "
                          f"(e.g. lq_suffix: x4)", "hq_path")
    return pairs
