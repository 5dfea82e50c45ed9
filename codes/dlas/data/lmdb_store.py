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
from collections import Counter
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

# The shape of "(H,W,C)" in a meta_info line (BasicSR writes "NAME (H,W,C) LEVEL"; shape and level may be absent).
_SHAPE = re.compile(r"^\(\d+(,\d+){1,2}\)$")


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


def key_of(name: str) -> bytes:
    """The database key of image ``name``: the name without its extension, ASCII (BasicSR's keys)."""
    return os.path.splitext(name)[0].encode("ascii")


def meta_line(name: str, shape: tuple[int, int, int], compression: int) -> str:
    """The ``meta_info.txt`` line of one image (no newline)."""
    return f"{name} ({shape[0]},{shape[1]},{shape[2]}) {compression}"


def read_meta_info(folder: Path, option: str = "paths") -> list[str]:
    """The image names ``FOLDER/meta_info.txt`` lists; a missing file or a malformed line is a ConfigError."""
    file = folder / META_FILE
    if not file.is_file():
        raise ConfigError(f"LMDB '{folder}' has no {META_FILE} (the list of its images, one 'NAME (H,W,C) "
                          f"LEVEL' line each); an interrupted scripts/make_lmdb.py writes it last: run it again",
                          option)
    names: list[str] = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if (not parts[0].isascii() or len(parts) > 3 or (len(parts) > 1 and not _SHAPE.match(parts[1]))
                or (len(parts) == 3 and not parts[2].lstrip("-").isdigit())):
            raise ConfigError(f"{file} line {number}: expected 'NAME (H,W,C) LEVEL' with an ASCII name, "
                              f"got {line.strip()!r}", option)
        names.append(parts[0])
    if not names:
        raise ConfigError(f"LMDB '{folder}' lists no images in {META_FILE}", option)
    return names


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
        listed = read_meta_info(path, option)
        self._keys: dict[str, bytes] = {self.prefix + name: key_of(name) for name in listed}
        if len(self._keys) < len(listed):
            counts = Counter(listed)
            twice = next(name for name in listed if counts[name] > 1)
            raise ConfigError(f"{path / META_FILE} lists '{twice}' twice", option)
        present = database_keys(reader(self.folder, option))
        missing = [name for name in listed if key_of(name) not in present]
        if missing:
            raise DataError(f"{META_FILE} lists '{missing[0]}' but {DATA_FILE} has no key "
                            f"'{key_of(missing[0]).decode()}' ({len(missing)} of {len(listed)} listed images are "
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
