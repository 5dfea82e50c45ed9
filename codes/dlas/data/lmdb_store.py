"""Images stored in an LMDB in BasicSR's layout, so existing DIV2K/DF2K LMDBs load unchanged.

The layout (written by BasicSR's ``scripts/data_preparation/create_lmdb.py`` and by ``scripts/make_lmdb.py``)::

    DIV2K_train_HR_sub.lmdb/
      data.mdb        key -> the encoded image file (PNG); the key is the image name without its extension
      lock.mdb
      meta_info.txt   one line per image: ``NAME (H,W,C) COMPRESSION``, e.g. ``0001_s001.png (480,480,3) 1``

An image dataset takes such a folder wherever it takes a folder of images (``paths``, ``lq_path``, ``hq_path``).
Its images are named ``FOLDER/NAME`` (``DIV2K_train_HR_sub.lmdb/0001_s001.png``) in items' ``path`` and in
warnings, so LQ/HQ pairs match by stem exactly as in folders. The images come in ``meta_info.txt`` order.

Opening checks that every key ``meta_info.txt`` lists is in ``data.mdb`` (one pass over the keys, not the
values): a missing key is a :class:`~dlas.errors.DataError` naming the key and the database, not a failure
hours into training. A value that does not decode is an unreadable image, skipped and counted like a bad file.
The database is opened read-only and without a lock file (so read-only storage works), once per process and
shared by every dataset of that process (LMDB allows one environment per database and process), and again in
each loader worker (an environment must not cross a ``fork``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlas.data.image_file import decode_image_bytes
from dlas.errors import ConfigError, DataError

DATA_FILE = "data.mdb"
META_FILE = "meta_info.txt"
INSTALL_HINT = 'pip install -e ".[lmdb]"'

# LMDB allows one open environment per database and process: every store of a process shares its reader. A forked
# loader worker inherits the parent's and must open its own, so each is kept with the id of the process it is for.
_READERS: dict[str, tuple[int, Any]] = {}

# "NAME (H,W,C) LEVEL"; BasicSR writes all three, the shape and level are optional here.
_META_LINE = re.compile(r"^(?P<name>\S+)(?:\s+\((?P<shape>\d+(?:\s*,\s*\d+){1,2})\))?(?:\s+(?P<level>-?\d+))?\s*$")


def import_lmdb(option: str = "paths") -> Any:
    """The ``lmdb`` module, or a ConfigError naming the extra that installs it."""
    try:
        import lmdb
    except ImportError as exc:
        raise ConfigError(f"reading or writing an LMDB needs the 'lmdb' package: {INSTALL_HINT}", option) from exc
    return lmdb


def is_lmdb_folder(path: Path) -> bool:
    """A folder holding a ``data.mdb``, or named ``*.lmdb`` (BasicSR's convention)."""
    return path.suffix.lower() == ".lmdb" or (path.is_dir() and (path / DATA_FILE).is_file())


@dataclass(frozen=True)
class MetaEntry:
    """One line of ``meta_info.txt``."""

    name: str  # the image name with its extension, e.g. 0001_s001.png
    shape: tuple[int, ...] | None  # (H, W, C) as listed
    compression: int | None  # the PNG compression level it was written with

    @property
    def key(self) -> bytes:
        return key_of(self.name)


def key_of(name: str) -> bytes:
    """The database key of image ``name``: the name without its extension, ASCII (BasicSR's keys)."""
    return os.path.splitext(name)[0].encode("ascii")


def meta_line(name: str, shape: tuple[int, int, int], compression: int) -> str:
    """The ``meta_info.txt`` line of one image (no newline)."""
    return f"{name} ({shape[0]},{shape[1]},{shape[2]}) {compression}"


def read_meta_info(folder: Path, option: str = "paths") -> list[MetaEntry]:
    """The entries of ``FOLDER/meta_info.txt``; a missing file or a malformed line is a ConfigError."""
    file = folder / META_FILE
    if not file.is_file():
        raise ConfigError(f"LMDB '{folder}' has no {META_FILE} (the list of its images, one 'NAME (H,W,C) "
                          f"LEVEL' line each); an interrupted scripts/make_lmdb.py writes it last: run it again",
                          option)
    entries: list[MetaEntry] = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        match = _META_LINE.match(line.strip())
        if match is None or not match["name"].isascii():
            raise ConfigError(f"{file} line {number}: expected 'NAME (H,W,C) LEVEL' with an ASCII name, "
                              f"got {line.strip()!r}", option)
        shape = tuple(int(s) for s in match["shape"].split(",")) if match["shape"] else None
        level = int(match["level"]) if match["level"] is not None else None
        entries.append(MetaEntry(match["name"], shape, level))
    if not entries:
        raise ConfigError(f"LMDB '{folder}' lists no images in {META_FILE}", option)
    return entries


def open_environment(folder: str, option: str = "paths", write: bool = False, map_size: int = 2**40) -> Any:
    """An ``lmdb.Environment`` on ``folder``: read-only without a lock file, or for writing."""
    lmdb = import_lmdb(option)
    try:
        if write:
            return lmdb.open(folder, map_size=map_size, readahead=False, meminit=False)
        return lmdb.open(folder, readonly=True, lock=False, readahead=False, meminit=False, max_readers=1024)
    except lmdb.Error as exc:
        raise DataError(f"cannot open the LMDB: {exc}", folder) from exc


def reader(folder: str, option: str = "paths") -> Any:
    """This process's read-only environment on ``folder`` (opened on first use)."""
    path = os.path.realpath(folder)
    pid, env = _READERS.get(path, (None, None))
    if pid != os.getpid():
        if env is not None:  # the parent's, inherited through a fork: without a lock file closing it only unmaps
            env.close()      # this process's copy (py-lmdb refuses a second open while it is registered)
        env = open_environment(folder, option)
        _READERS[path] = (os.getpid(), env)
    return env


def database_keys(env: Any) -> set[bytes]:
    """Every key of the database (a pass over the keys only; values are not read)."""
    with env.begin(buffers=False) as txn:
        return set(txn.cursor().iternext(keys=True, values=False))


class LmdbStore:
    """The images of one LMDB folder, decoded by name (``FOLDER/NAME``, as :attr:`names` lists them).

    folder: the ``.lmdb`` folder; option: the config option that named it (for errors).
    """

    def __init__(self, folder: str, option: str = "paths"):
        path = Path(folder).expanduser()
        if not (path / DATA_FILE).is_file():
            raise ConfigError(f"'{folder}' is not an LMDB (no {DATA_FILE} in it); point the option at the .lmdb "
                              f"folder that holds data.mdb and meta_info.txt", option)
        self.folder = str(path)
        self.prefix = self.folder.rstrip("/") + "/"
        entries = read_meta_info(path, option)
        self._keys: dict[str, bytes] = {}
        for entry in entries:
            if self.prefix + entry.name in self._keys:
                raise ConfigError(f"{path / META_FILE} lists '{entry.name}' twice", option)
            self._keys[self.prefix + entry.name] = entry.key
        present = database_keys(reader(self.folder, option))
        missing = [entry for entry in entries if entry.key not in present]
        if missing:
            raise DataError(f"{META_FILE} lists '{missing[0].name}' but {DATA_FILE} has no key "
                            f"'{missing[0].key.decode()}' ({len(missing)} of {len(entries)} listed images are "
                            f"missing); rebuild it with scripts/make_lmdb.py (it resumes)", self.folder)

    @property
    def names(self) -> list[str]:
        """``FOLDER/NAME`` of every image, in ``meta_info.txt`` order."""
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def read(self, name: str) -> bytes:
        """The stored (encoded) bytes of image ``name``."""
        key = self._keys[name]
        with reader(self.folder).begin(buffers=False) as txn:
            value = txn.get(key)
        if value is None:  # the database changed since it was opened
            raise DataError(f"{DATA_FILE} has no key '{key.decode()}' for '{name}' any more; was the LMDB "
                            f"rewritten during training?", self.folder)
        return value

    def decode(self, name: str) -> np.ndarray:
        """Image ``name`` as :func:`~dlas.data.image_file.decode_image` returns a file (raises UnreadableImage)."""
        return decode_image_bytes(self.read(name))
