"""The seeded-dataset base: reproducible, resumable items and survivable bad files.

A dataset opts in to the framework's per-item seeding by declaring ``epoch_keys = True`` (this base class
does): the framework's sampler (:class:`dlas.data.sampler.ResumableSampler`) then hands it ``(epoch, index)``
keys instead of plain ``int`` indices, and the framework sets ``dataset.seed = cfg.seed`` before it builds the
loaders; a plain ``int`` key (validation, a user's own loop) means epoch 0. Every random choice an item makes
(crop position, flips, degradation parameters) comes from :func:`sample_rng` seeded by ``(seed, epoch,
index)``, never from a global or per-worker generator. So item ``(e, i)`` is the same whichever worker loads
it, with 0 or 16 workers, before and after a resume, and changes from one epoch to the next. A dataset that
does not declare it is left alone and receives ``int`` indices, as any PyTorch dataset expects.

A file that cannot be used (unreadable, truncated, smaller than the crop) is reported once with a warning on
the ``dlas`` logger and replaced by another index chosen deterministically from ``(seed, epoch, index)``, so a
single bad file among 100k cannot stop a run at hour 30. ``on_bad_image: error`` raises a
:class:`~dlas.errors.DataError` naming the file instead.
"""
from __future__ import annotations

import logging
import multiprocessing
from typing import Any, Literal, Union

import numpy as np
import torch

from dlas.errors import ConfigError, DataError

logger = logging.getLogger("dlas")

SampleKey = Union[int, tuple[int, int]]

# Give up after this many bad replacements in a row: by then the data, not one file, is broken.
MAX_REPLACEMENTS = 50


class BadImage(Exception):
    """Raised by a dataset's :meth:`SeededDataset.load` when the file at ``path`` is unusable."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def split_key(key: Any) -> tuple[int, int]:
    """``(epoch, index)`` of a sampler key: a pair of ints, or one int (epoch 0)."""
    if isinstance(key, (tuple, list)):
        epoch, index = key
        return int(epoch), int(index)
    return 0, int(key)


def sample_rng(seed: int, epoch: int, index: int, *extra: int) -> np.random.Generator:
    """The generator of one item: a pure function of ``(seed, epoch, index, *extra)``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, epoch, index, *extra])


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A ``torch.Generator`` derived from an item's numpy generator (for torch-side random ops)."""
    return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))


class SeededDataset(torch.utils.data.Dataset):
    """Base class of the image datasets: ``__getitem__((epoch, index))`` -> ``load(index, rng)``.

    Subclasses implement ``__len__`` and ``load(index, rng)``, draw every random number from ``rng`` and
    raise :class:`BadImage` for an unusable file. ``bad_count`` counts the bad files found so far, by this
    process and its loader workers together.
    """

    epoch_keys = True  # the sampler hands (epoch, index) keys and the framework sets `seed`

    def __init__(self, on_bad_image: Literal["skip", "error"] = "skip"):
        if on_bad_image not in ("skip", "error"):
            raise ConfigError(f"must be 'skip' or 'error', got {on_bad_image!r}", "on_bad_image")
        self.seed = 0
        self.on_bad_image = on_bad_image
        self._known_bad: set[str] = set()
        # Shared with forked/spawned loader workers, so the trainer's process sees their finds too.
        self._bad_counter = multiprocessing.Value("i", 0)

    @property
    def bad_count(self) -> int:
        """How many unusable files were found and skipped (each file counted once per loader process)."""
        return self._bad_counter.value

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """Build item ``index`` drawing every random choice from ``rng``; raise :class:`BadImage` if unusable."""
        raise NotImplementedError

    def files_of(self, index: int) -> list[str]:
        """The files item ``index`` reads (known-bad ones are skipped without decoding them again)."""
        return []

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        epoch, index = split_key(key)
        rng = sample_rng(self.seed, epoch, index)
        for attempt in range(1, MAX_REPLACEMENTS + 1):
            if not any(file in self._known_bad for file in self.files_of(index)):
                try:
                    return self.load(index, rng)
                except BadImage as bad:
                    self._report(bad)
            # The replacement depends only on (seed, epoch, index, attempt): identical in every worker.
            rng = sample_rng(self.seed, epoch, index, attempt)
            index = int(rng.integers(len(self)))
        raise DataError(f"{MAX_REPLACEMENTS} unusable images in a row; run scripts/check_images.py on the "
                        f"dataset's folders", (self.files_of(index) or ["dataset"])[0])

    def _report(self, bad: BadImage) -> None:
        if self.on_bad_image == "error":
            raise DataError(f"unusable image: {bad.reason}; remove or replace the file, or set "
                            f"on_bad_image: skip to skip such files", bad.path)
        if bad.path in self._known_bad:
            return
        self._known_bad.add(bad.path)
        with self._bad_counter.get_lock():
            self._bad_counter.value += 1
            count = self._bad_counter.value
        logger.warning("skipping %s: %s (%d unusable image%s so far; scripts/check_images.py lists them all)",
                       bad.path, bad.reason, count, "" if count == 1 else "s")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if not self._counter_can_travel():
            # Pickled outside a worker start (deepcopy, saving) or into a worker of another start method:
            # the shared counter cannot travel, its value can (that worker's finds are then only logged).
            state["_bad_counter"] = self._bad_counter.value
        return state

    def _counter_can_travel(self) -> bool:
        if multiprocessing.context.get_spawning_popen() is None:
            return False
        try:
            self._bad_counter.get_lock().__getstate__()  # refuses a worker started by another method
            return True
        except RuntimeError:
            return False

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_bad_counter"], int):
            state["_bad_counter"] = multiprocessing.Value("i", state["_bad_counter"])
        self.__dict__.update(state)
