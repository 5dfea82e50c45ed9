"""The resumable, distributed sampler and the loader built on it.

:class:`ResumableSampler` yields keys forever, epoch after epoch, each epoch a fresh permutation seeded by
``(seed, epoch)``: plain ``int`` indices, as any PyTorch dataset expects, or ``(epoch, index)`` pairs for the
datasets that ask for them with ``epoch_keys = True`` (the framework's seeded datasets, see
:mod:`dlas.data.base`). With ``world_size`` ranks, rank ``r`` takes positions
``r, r + world_size, ...`` of the epoch's permutation, so the ranks' shares are disjoint and together cover the
epoch.

**Resuming: the trainer's sample counter is the source of truth.** A loader with workers prefetches, so what
the sampler has handed out is ahead of what the trainer has trained on. The trainer therefore counts the
samples *this rank consumed* (per-rank batch size x steps x micro-batches) and saves that number; on resume it
passes it back as ``build_loader(..., start_samples=n)`` (or ``sampler.load_state_dict(sampler.state_for(n))``).
The sampler jumps straight to that point in O(1), loading none of the skipped items, and continues exactly
where an uninterrupted run would be. ``state_for(n)`` gives the ``{"epoch", "position"}`` of that point;
``state_dict()`` gives the point the sampler itself has reached (prefetched items included), which equals
``state_for(consumed)`` only without workers.
"""
from __future__ import annotations

import functools
import random
import signal
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from dlas.errors import ConfigError


class ResumableSampler(Sampler):
    """Endless keys for one rank; see the module docstring for resuming.

    length: the dataset's length.
    shuffle: a new permutation per epoch, seeded by ``(seed, epoch)``; otherwise 0, 1, 2, ... each epoch.
    seed: the run's seed; all ranks must pass the same one.
    rank, world_size: this process's share of each epoch.
    drop_last: each epoch, drop the tail that does not fill a whole batch on every rank (training); otherwise
        the permutation is extended from its start so every rank gets the same number of samples.
    batch_size: the per-rank batch; with ``drop_last`` each rank's epoch share is a multiple of it, so a batch
        never straddles two epochs, except when the dataset holds less than one global batch: then each
        epoch gives every rank ``length // world_size`` samples and batches run on into the next epoch.
    epochs: stop after this many epochs (``None``: never); validation uses 1, and each iteration of a bounded
        sampler makes the same pass again.
    epoch_keys: yield ``(epoch, index)`` pairs instead of ``int`` indices.
    """

    def __init__(self, length: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, batch_size: int = 1, epochs: Optional[int] = None, epoch_keys: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.epochs = epochs
        self.epoch_keys = epoch_keys
        if length < world_size:
            raise ConfigError(f"the dataset has {length} items, fewer than the {world_size} ranks; add data",
                              "dataset")
        if not drop_last:
            self.samples_per_epoch = -(-length // world_size)  # ceil
        elif length >= world_size * batch_size:
            self.samples_per_epoch = length // (world_size * batch_size) * batch_size
        else:
            # Fewer items than one global batch (a handful of example photos): batches span epochs.
            self.samples_per_epoch = length // world_size
        self.epoch = 0
        self.position = 0  # samples of the current epoch already handed out by this rank
        self._start = (0, 0)  # where a bounded sampler (re)starts each pass

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless ResumableSampler has no length; see samples_per_epoch")
        return self.epochs * self.samples_per_epoch - (self._start[0] * self.samples_per_epoch + self._start[1])

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch``, in order."""
        if self.shuffle:
            epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            generator = torch.Generator().manual_seed(epoch_seed)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.samples_per_epoch * self.world_size
        if total > self.length:  # drop_last off: wrap around so every rank gets the same count
            order = (order * (-(-total // self.length)))[:total]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[Union[int, tuple[int, int]]]:
        if self.epochs is not None:
            # A bounded sampler (validation) makes the same pass each time it is iterated;
            # an endless one continues where it stopped.
            self.epoch, self.position = self._start
        while self.epochs is None or self.epoch < self.epochs:
            indices = self.epoch_indices(self.epoch)
            while self.position < len(indices):
                index = indices[self.position]
                self.position += 1
                yield (self.epoch, index) if self.epoch_keys else index
            self.epoch += 1
            self.position = 0

    def state_for(self, consumed_samples: int) -> dict[str, int]:
        """The ``{"epoch", "position"}`` reached after this rank consumed ``consumed_samples`` from the start."""
        epoch, position = divmod(int(consumed_samples), self.samples_per_epoch)
        return {"epoch": epoch, "position": position}

    def state_dict(self) -> dict[str, int]:
        """Where the sampler itself is (including items prefetched by workers but not yet trained on)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (from :meth:`state_for`); skipped items are never loaded."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if not 0 <= self.position < self.samples_per_epoch:
            self.epoch += self.position // self.samples_per_epoch
            self.position %= self.samples_per_epoch
        self._start = (self.epoch, self.position)


def seed_worker(worker_id: int, base_seed: int, rank: int, start_samples: int = 0) -> None:
    """Seed python, numpy and torch in a loader worker from the run's seed, the rank, the worker id and the
    number of samples this rank had consumed when the loader started.

    The seeded datasets do not need it (each item has its own generator), but plain datasets that call
    ``random``, ``np.random`` or ``torch.rand`` then differ between workers and ranks, repeat between runs of
    the same config, and do not replay the start of the run's random stream after a resume.
    """
    # SLURM and torchrun signal the whole process group: workers must leave SIGINT/SIGTERM to the trainer, which
    # finishes its step and saves (a worker killed by them would make the loader raise before anything is saved).
    # Workers still end with their parent: the loader's watchdog stops them when the trainer exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed = int(np.random.SeedSequence([base_seed % 2**63, rank, worker_id, start_samples]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stop_workers(batches: Any) -> None:
    """Stop the loader workers behind the iterator ``batches`` (a no-op without workers).

    Workers ignore SIGTERM (see :func:`seed_worker`), so the interpreter's exit-time cleanup, which terminates
    daemonic children with SIGTERM and then joins them, would wait for them forever when an error leaves the
    iterator alive in a traceback. The loop therefore stops them itself, on every way out.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def build_loader(dataset: Any, batch_size: int, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start_samples: int = 0, pin_memory: Optional[bool] = None,
                 persistent_workers: Optional[bool] = None, training: bool = True,
                 prefetch_factor: Optional[int] = None, name: str = "train",
                 item_keys: Optional[Sequence[str]] = None) -> DataLoader:
    """A DataLoader over ``dataset`` driven by a :class:`ResumableSampler` (``loader.sampler``).

    Batches are dicts of state keys (:class:`~dlas.data.collate.ItemCollator`: ``item_keys`` names the parts of
    tuple items; a batch that cannot be collated is a DataError naming ``datasets.NAME`` and the key). The
    dataset gets ``(epoch, index)`` keys when it declares ``epoch_keys = True``, else plain ``int`` indices.

    batch_size: the per-rank batch (the config's global batch divided by world_size).
    start_samples: samples this rank already consumed (from the checkpoint): the loader starts after them.
    pin_memory: default: on when CUDA is available. persistent_workers: default: on when num_workers > 0.
    training: endless, drop_last sampling; ``False`` gives one pass over every item (validation).
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    from dlas.data.collate import ItemCollator, wants_epoch_keys

    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                               drop_last=training, batch_size=batch_size, epochs=None if training else 1,
                               epoch_keys=wants_epoch_keys(dataset))
    if start_samples:
        sampler.load_state_dict(sampler.state_for(start_samples))
    extra = {}
    if num_workers > 0:
        import cv2

        # Forking while OpenCV's thread pool is alive deadlocks the workers' first OpenCV call, so shrink the
        # pool before the workers are forked; each worker is a parallel lane of its own anyway.
        cv2.setNumThreads(1)
        extra["worker_init_fn"] = functools.partial(seed_worker, base_seed=seed, rank=rank,
                                                    start_samples=start_samples)
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    # A loader without its own generator draws its workers' base seed from the global torch RNG each time an
    # iterator starts, so a resumed run (whose iterator starts later) would drift from an uninterrupted one.
    generator = torch.Generator().manual_seed((seed * 1000 + rank) % 2**63)  # any 64-bit config seed fits
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=training, generator=generator,
                      collate_fn=ItemCollator(name, item_keys), **extra)
