"""``tar_shards``: captioned images in webdataset's tar-shard format, read by index so resumes stay exact.

The format (webdataset's; ``scripts/make_shards.py`` writes it from a ``text_image`` folder, img2dataset and
webdataset's own writers do too): plain ``.tar`` files in which one sample is the members sharing a key, the
member name up to the first dot of its base name::

    000000.jpg  000000.txt  000001.png  000001.txt  000001.json ...

A sample's image is its first member with an image extension (``jpg png jpeg webp bmp tif ...``); its captions
are the lines of its ``.txt`` member (UTF-8, one caption per line, blank lines ignored); other members
(``.json`` metadata, ...) are ignored, as are samples without an image.

Random access: the first time a shard is read, its members are indexed in one pass over the tar headers (the
data is skipped) and the index is saved next to the shard as ``SHARD.tar.index.npz``, or in
``$DLAS_CACHE_DIR/index`` where the shard's folder is read-only; it is reused while the shard's size and
modification time stay the same. An item then costs two seeks and reads, so the framework's resumable sampler
can ask for any index in any order, with any number of workers, and a resumed run sees the same items as an
uninterrupted one. (Streaming readers cannot do that: they only go forward.)
"""
from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dlas.data.base import BadImage, SeededDataset
from dlas.data.file_index import cache_dir
from dlas.data.image_file import IMAGE_EXTENSIONS, UnreadableImage, decode_image_bytes, to_rgb_float
from dlas.data.text_image import center_crop, mirror_caption, shorter_side_to
from dlas.data.transforms import random_crop, to_tensor
from dlas.errors import ConfigError, DataError
from dlas.registry import DATASETS

logger = logging.getLogger("dlas")

INSTALL_HINT = 'pip install -e ".[shards]"'
INDEX_SUFFIX = ".index.npz"
_INDEX_VERSION = 1
_IMAGE_EXTENSIONS = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}


def import_webdataset(option: str = "shards") -> Any:
    """The ``webdataset`` package, or a ConfigError naming the extra that installs it."""
    try:
        import webdataset
    except ImportError as exc:
        raise ConfigError(f"tar shards need the 'webdataset' package: {INSTALL_HINT}", option) from exc
    return webdataset


def expand_shards(shards: str | list[str], option: str = "shards") -> list[str]:
    """Shard files of ``shards``: ``.tar`` files, brace patterns (``data-{000..099}.tar``) and folders (their
    ``.tar`` files, sorted); each entry's files in order. A missing file is a ConfigError naming ``option[i]``."""
    from webdataset.shardlists import expand_urls

    single = isinstance(shards, str)
    entries = [shards] if single else list(shards)
    if not entries:
        raise ConfigError("no shards given; name .tar files, brace patterns or folders of shards", option)
    files: list[str] = []
    for i, entry in enumerate(entries):
        key = option if single else f"{option}[{i}]"
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.is_file() and p.name.endswith(".tar"))
            if not found:
                raise ConfigError(f"folder '{entry}' holds no .tar shards", key)
            files += found
            continue
        for file in expand_urls(str(path)):
            if file.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
                raise ConfigError(f"'{file}' is compressed, and a compressed tar cannot be read by index; "
                                  f"store plain .tar shards (the images in them are compressed already)", key)
            if not os.path.isfile(file):
                where = f"'{entry}' names '{file}', which" if file != entry else f"'{entry}'"
                raise ConfigError(f"{where} does not exist; name .tar files, brace patterns such as "
                                  f"shards-{{000..099}}.tar, or folders of shards", key)
            files.append(file)
    return files


def index_shard(shard: str) -> dict[str, np.ndarray]:
    """Index one shard: ``keys`` (str) and ``members`` (int64 N x 4: image offset, image size, caption offset,
    caption size; the caption -1, -1 when the sample has none). Samples without an image are left out."""
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, list[int]] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            while True:
                try:
                    member = tar.next()  # headers only: tarfile seeks over the data
                except tarfile.TarError as exc:  # truncated or damaged from here on: keep what came before
                    logger.warning("%s is unreadable after %d members (%s); the samples before that are used",
                                   shard, len(samples), exc)
                    break
                if member is None:
                    break
                if not member.isfile():
                    continue
                key, extension = base_plus_ext(member.name)
                if key is None:
                    continue
                sample = samples.setdefault(key, [-1, -1, -1, -1])
                extension = extension.lower()
                if extension in _IMAGE_EXTENSIONS and sample[0] < 0:
                    sample[0:2] = [member.offset_data, member.size]
                elif extension == "txt":
                    sample[2:4] = [member.offset_data, member.size]
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"not a readable tar shard: {exc}", shard) from exc
    kept = {key: sample for key, sample in samples.items() if sample[0] >= 0}
    if len(kept) < len(samples):
        logger.warning("%s: %d of %d samples have no image member and are left out", shard,
                       len(samples) - len(kept), len(samples))
    return {"keys": np.array(list(kept), dtype=str),
            "members": np.array(list(kept.values()), dtype=np.int64).reshape(-1, 4)}


def load_index(shard: str, use_cache: bool = True) -> dict[str, np.ndarray]:
    """:func:`index_shard` of ``shard``, from its cached index while the shard is unchanged."""
    stat = os.stat(shard)
    stamp = np.array([_INDEX_VERSION, stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    candidates = _index_files(shard) if use_cache else []
    for file in candidates:
        try:
            with np.load(file, allow_pickle=False) as cached:
                if np.array_equal(cached["stamp"], stamp):
                    return {"keys": cached["keys"], "members": cached["members"]}
        except (OSError, ValueError, KeyError):
            pass  # absent, stale or damaged: index again
    index = index_shard(shard)
    for file in candidates:
        try:
            temporary = file.with_name(f".{file.name}.tmp{os.getpid()}")
            with open(temporary, "wb") as out:
                np.savez(out, stamp=stamp, **index)
            os.replace(temporary, file)
            break
        except OSError:
            continue  # a read-only shard folder: the cache folder is next
    return index


def _index_files(shard: str) -> list[Path]:
    """Where the index of ``shard`` may be cached: next to it, else in the index cache folder."""
    digest = hashlib.sha1(os.path.realpath(shard).encode()).hexdigest()[:20]
    return [Path(shard + INDEX_SUFFIX), cache_dir() / f"shard-{digest}{INDEX_SUFFIX}"]


def read_member(shard: str, offset: int, size: int) -> bytes:
    with open(shard, "rb") as file:
        file.seek(offset)
        data = file.read(size)
    if len(data) < size:
        raise UnreadableImage(f"the shard ends inside this member ({len(data)} of {size} bytes): truncated shard")
    return data


@DATASETS.register("tar_shards")
class TarShardDataset(SeededDataset):
    """Captioned images from webdataset tar shards (``NAME.jpg`` + ``NAME.txt`` members), read by index.

    Items: ``hq`` (float CHW RGB in [0, 1]), ``caption`` (one line of the sample's ``.txt``, drawn per item from
    its seeded generator) and ``path`` (``SHARD/KEY``). Shards are indexed once and the index is cached next to
    them (``SHARD.tar.index.npz``), so random access and exact resumes work as with image folders.

    shards: ``.tar`` files, brace patterns (``/data/laion/{00000..00099}.tar``) or folders of ``.tar`` files.
    target_size: output side in pixels; null (default) gives whole images (batch size 1, or equal sizes).
    resize: with target_size, first scale the image (bicubic, antialiased) so its shorter side is target_size,
        keeping the whole caption true (default true); false crops at the stored resolution and skips images
        smaller than target_size.
    crop: ``random`` (default) or ``center`` square crop of target_size.
    use_flip: random horizontal flips, with "left" and "right" swapped in the caption (default false).
    caption_choice: ``random`` (default: one of the sample's caption lines per item) or ``first``.
    on_bad_image: ``skip`` (default) replaces an undecodable or truncated image, a missing or empty caption and
        a too-small image by another item and warns once (``bad_count`` counts them); ``error`` stops.
    cache_index: keep shard indexes on disk (default true); false indexes every shard at every start.
    """

    keys = ("hq", "caption", "path")  # the state keys of every item (the trainer checks its graph against them)

    def __init__(self, shards: str | list[str], target_size: int | None = None, resize: bool = True,
                 crop: Literal["random", "center"] = "random", use_flip: bool = False,
                 caption_choice: Literal["random", "first"] = "random",
                 on_bad_image: Literal["skip", "error"] = "skip", cache_index: bool = True):
        super().__init__(on_bad_image)
        import_webdataset()
        if target_size is not None and target_size < 1:
            raise ConfigError(f"must be a positive number of pixels or null, got {target_size}", "target_size")
        self.shards = expand_shards(shards)
        indexes = [load_index(shard, cache_index) for shard in self.shards]
        self._keys = [index["keys"] for index in indexes]
        self._members = [index["members"] for index in indexes]
        self._starts = np.cumsum([0] + [len(keys) for keys in self._keys])
        if self._starts[-1] == 0:
            raise ConfigError(f"the {len(self.shards)} shard(s) hold no samples with an image member "
                              f"(first: '{self.shards[0]}')", "shards")
        self.target_size = target_size
        self.resize = resize
        self.crop = crop
        self.use_flip = use_flip
        self.caption_choice = caption_choice

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def name_of(self, index: int) -> str:
        """``SHARD/KEY`` of item ``index``."""
        shard, local = self._locate(index)
        return f"{self.shards[shard]}/{self._keys[shard][local]}"

    def files_of(self, index: int) -> list[str]:
        return [self.name_of(index)]

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        shard, local = self._locate(index)
        name = self.name_of(index)
        image_offset, image_size, text_offset, text_size = (int(v) for v in self._members[shard][local])
        captions = []
        if text_offset >= 0:
            try:
                text = read_member(self.shards[shard], text_offset, text_size).decode("utf-8")
            except (UnreadableImage, UnicodeDecodeError) as exc:
                raise BadImage(name, f"unreadable caption: {exc}") from exc
            captions = [line.strip() for line in text.splitlines() if line.strip()]
        if not captions:
            raise BadImage(name, "no caption (the sample's .txt member is missing or empty)")
        try:
            image = decode_image_bytes(read_member(self.shards[shard], image_offset, image_size))
        except UnreadableImage as exc:
            raise BadImage(name, str(exc)) from exc
        caption = captions[0] if self.caption_choice == "first" else captions[int(rng.integers(len(captions)))]
        side = self.target_size
        if side is not None and not self.resize and min(image.shape[:2]) < side:
            raise BadImage(name, f"{image.shape[1]}x{image.shape[0]} is smaller than target_size {side} "
                                 "(resize: true scales it)")
        image = to_rgb_float(image)
        if side is not None:  # as text_image does, so shards and folders of the same photos give the same items
            image = shorter_side_to(image, side) if self.resize else image
            image = random_crop(image, side, rng) if self.crop == "random" else center_crop(image, side)
        if self.use_flip and rng.random() < 0.5:
            image, caption = image[:, ::-1], mirror_caption(caption)
        return {"hq": to_tensor(np.ascontiguousarray(image)), "caption": caption, "path": name}
