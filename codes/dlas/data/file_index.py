"""Turning a dataset's ``paths:`` list into a sorted list of image files.

Each entry of ``paths`` may be:

- a folder: every image below it, recursively (hidden files and folders, e.g. macOS ``._x.png`` stubs, are
  ignored). The listing is cached (see below);
- an LMDB folder in BasicSR's layout (``data.mdb`` + ``meta_info.txt``, see :mod:`dlas.data.lmdb_store`): its
  images, named ``FOLDER/NAME``;
- an image file;
- a ``.txt`` file listing image paths, one per line (relative paths are relative to the list's folder; blank
  lines and ``#`` comments are skipped);
- ``skimage:NAME``: photographs bundled with scikit-image, so examples and tests need no download.
  ``NAME`` is one image (``skimage:astronaut``), several separated by commas (``skimage:coffee,chelsea``) or a
  set: ``skimage:color`` (the nine RGB photographs: astronaut, chelsea, coffee, hubble_deep_field, ihc,
  motorcycle_left, motorcycle_right, retina, rocket), ``skimage:gray`` (nine grayscale photographs and
  textures: brick, camera, cell, coins, grass, gravel, moon, page, text) or ``skimage:all`` (both).

The folder listing is cached as JSON in ``$DLAS_CACHE_DIR/index`` (default ``~/.cache/dlas/index``), one file
per folder. It records the modification time of every sub-folder; since adding, removing or renaming a file
changes its folder's modification time, the cache is reused only while no folder changed, and a restart on
100k files costs a few hundred ``stat`` calls instead of a full walk.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from dlas.data.image_file import IMAGE_EXTENSIONS, decode_image, is_image_file
from dlas.data.lmdb_store import LmdbStore, is_lmdb_folder
from dlas.errors import ConfigError, did_you_mean

SKIMAGE_PREFIX = "skimage:"

# Only files shipped inside the scikit-image wheel: skimage.data fetches others with pooch, which needs a network.
SKIMAGE_SETS: dict[str, tuple[str, ...]] = {
    "color": ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
              "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg"),
    "gray": ("brick.png", "camera.png", "cell.png", "coins.png", "grass.png", "gravel.png", "moon.png",
             "page.png", "text.png"),
}
SKIMAGE_SETS["all"] = SKIMAGE_SETS["color"] + SKIMAGE_SETS["gray"]

_INDEX_VERSION = 1
IMAGE_CACHE_MB = 256  # decoded images a dataset keeps in memory, per loader process, by default


def skimage_data_dir() -> Path:
    """The folder of scikit-image's bundled sample images (found without importing skimage.data)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the 'skimage:' prefix needs scikit-image; install it with `pip install scikit-image`",
                          "paths")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def skimage_images(name: str, key: str = "paths") -> list[str]:
    """Files of ``skimage:NAME`` (``NAME`` without the prefix): a set, one image or a comma-separated list."""
    folder = skimage_data_dir()
    available = {Path(f).stem: f for f in os.listdir(folder) if is_image_file(f)}
    files = []
    for part in [p.strip() for p in name.split(",") if p.strip()]:
        if part in SKIMAGE_SETS:
            files += [str(folder / f) for f in SKIMAGE_SETS[part] if (folder / f).is_file()]
        elif part in available:
            files.append(str(folder / available[part]))
        else:
            choices = sorted(SKIMAGE_SETS) + sorted(available)
            raise ConfigError(f"unknown scikit-image sample '{part}'{did_you_mean(part, choices)}; "
                              f"choose from: {', '.join(choices)}", key)
    if not files:
        raise ConfigError(f"'{SKIMAGE_PREFIX}{name}' names no images", key)
    return files


class ImageFiles(list):
    """The image names ``paths`` resolved to (what items' ``path`` shows), and how to decode each one.

    A plain list of names for every use of a list; :meth:`decode` reads a file by its path and an LMDB image
    (``FOLDER.lmdb/NAME``) from its database. With a cache budget (:meth:`cache_decoded`) the decoded arrays are
    kept, read-only, until the budget is full, so that a dataset of a few photos decodes each once per process
    instead of once per item (decoding a photo costs more than cropping, flipping and degrading the crop).
    Nothing is evicted: over a dataset larger than the budget, the images that fit stay and the rest are decoded
    each time, which is what any cache gets from uniformly random access.
    """

    def __init__(self, names: tuple[str, ...] | list[str] = ()):
        super().__init__(names)
        self.stores: list[LmdbStore] = []
        self.cache_bytes = 0
        self._decoded: dict[str, np.ndarray] = {}
        self._decoded_bytes = 0

    def add_store(self, store: LmdbStore) -> None:
        self.stores.append(store)
        self.extend(store.names)

    def cache_decoded(self, megabytes: int, key: str = "cache_mb") -> None:
        """Keep decoded images up to ``megabytes`` MB (0: none); a negative budget is a ConfigError on ``key``."""
        if megabytes < 0:
            raise ConfigError(f"must be 0 (no cache) or a number of megabytes, got {megabytes}", key)
        self.cache_bytes = int(megabytes * 2**20)

    def decode(self, name: str) -> np.ndarray:
        """Image ``name`` as :func:`~dlas.data.image_file.decode_image` decodes it (raises UnreadableImage); a
        cached image comes back read-only, so a dataset that writes into it fails loudly instead of corrupting
        the cache."""
        array = self._decoded.get(name)
        if array is None:
            array = self._decode(name)
            if self._decoded_bytes + array.nbytes <= self.cache_bytes:
                array.flags.writeable = False
                self._decoded[name] = array
                self._decoded_bytes += array.nbytes
        return array

    def _decode(self, name: str) -> np.ndarray:
        for store in self.stores:
            if name.startswith(store.prefix) and name in store:
                return store.decode(name)
        return decode_image(name)


def resolve_image_paths(paths: list[str], key: str = "paths", cache_index: bool = True) -> ImageFiles:
    """Expand ``paths`` (folders, LMDBs, image files, ``.txt`` lists, ``skimage:`` names) into image names.

    Each entry's files are sorted (an LMDB's come in its ``meta_info.txt`` order); entries keep their order. A
    missing path, or a folder or list without images, is a :class:`ConfigError` naming ``key[i]`` (``key`` when
    ``paths`` is one string).
    """
    single = isinstance(paths, (str, os.PathLike))
    if single:
        paths = [paths]
    if not paths:
        raise ConfigError("no paths given; name at least one image folder", key)
    files = ImageFiles()
    for i, entry in enumerate(paths):
        entry_key = key if single else f"{key}[{i}]"
        entry = str(entry)
        if entry.startswith(SKIMAGE_PREFIX):
            files += skimage_images(entry[len(SKIMAGE_PREFIX):], entry_key)
            continue
        path = Path(entry).expanduser()
        if path.is_dir() and is_lmdb_folder(path):
            files.add_store(LmdbStore(str(path), entry_key))
        elif path.is_dir():
            found = list_folder(str(path), cache_index)
            if not found:
                raise ConfigError(f"folder '{entry}' holds no images (looked for "
                                  f"{', '.join(IMAGE_EXTENSIONS)}, recursively)", entry_key)
            files += found
        elif path.is_file() and path.suffix.lower() == ".txt":
            found = _read_list_file(path)
            if not found:
                raise ConfigError(f"list file '{entry}' names no images", entry_key)
            first_line, first = found[0]
            if not os.path.isfile(first):  # one stat catches a list written for another folder or format
                raise ConfigError(f"list file '{entry}' line {first_line}: '{first}' does not exist; a list holds "
                                  "one image path per line, relative to the list's own folder (BasicSR's "
                                  "meta_info 'NAME (H,W,C)' files are not lists: point paths at the folder)",
                                  entry_key)
            files += [file for _, file in found]
        elif path.is_file() and is_image_file(path.name):
            files.append(str(path))
        elif path.is_file():
            raise ConfigError(f"'{entry}' is not an image file ({', '.join(IMAGE_EXTENSIONS)}), a folder or a .txt "
                              f"list", entry_key)
        else:
            raise ConfigError(f"'{entry}' does not exist; point it at a folder of images, an image file, "
                              f"a .txt list or a 'skimage:' sample", entry_key)
    return files


def _read_list_file(path: Path) -> list[tuple[int, str]]:
    """``(line number, path)`` of every entry of a list file."""
    files = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            item = Path(line).expanduser()
            files.append((number, str(item if item.is_absolute() else path.parent / item)))
    return files


def list_folder(folder: str, use_cache: bool = True) -> list[str]:
    """Every image file below ``folder`` (recursive, sorted), from the cache when no sub-folder changed."""
    root = os.path.realpath(folder)
    cache_file = _cache_file(root) if use_cache else None
    if cache_file is not None:
        cached = _load_cache(cache_file, root)
        if cached is not None:
            return [os.path.join(folder, rel) for rel in cached]
    relative, folder_mtimes = _walk(root)
    if cache_file is not None:
        _save_cache(cache_file, {"version": _INDEX_VERSION, "root": root, "dirs": folder_mtimes, "files": relative})
    return [os.path.join(folder, rel) for rel in relative]


def _walk(root: str) -> tuple[list[str], dict[str, int]]:
    relative: list[str] = []
    folder_mtimes: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        folder_mtimes[rel_dir] = os.stat(dirpath).st_mtime_ns
        for name in filenames:
            if not name.startswith(".") and is_image_file(name):
                relative.append(os.path.normpath(os.path.join(rel_dir, name)))
    relative.sort()
    return relative, folder_mtimes


def cache_dir() -> Path:
    """Where index caches go: ``$DLAS_CACHE_DIR/index`` (default ``~/.cache/dlas/index``)."""
    return Path(os.environ.get("DLAS_CACHE_DIR") or Path.home() / ".cache" / "dlas") / "index"


def _cache_file(root: str) -> Path:
    return cache_dir() / (hashlib.sha1(root.encode()).hexdigest()[:20] + ".json")


def _load_cache(cache_file: Path, root: str) -> Optional[list[str]]:
    try:
        data = json.loads(cache_file.read_text())
        if data.get("version") != _INDEX_VERSION or data.get("root") != root:
            return None
        for rel_dir, mtime in data["dirs"].items():
            if os.stat(os.path.join(root, rel_dir)).st_mtime_ns != mtime:
                return None
        return list(data["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no cache, a corrupt one or a vanished folder: list the folder again


def _save_cache(cache_file: Path, data: dict) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps(data))
        os.replace(temporary, cache_file)
    except OSError:
        pass  # a read-only home only costs the next start-up another walk
