"""Turning dataset items into the state a step starts from: named keys, batched, with one clear error.

A dataset item is normally a dict of named tensors (``{"lq": ..., "hq": ...}``): its keys are the state keys
the injectors and losses read. An ordinary PyTorch dataset that returns a tuple ``(image, label)`` or a single
tensor works too once its parts are named with the loader key ``item_keys: [hq, label]``.

``torch.utils.data.default_collate`` fails deep inside torch with "stack expects each tensor to be equal size"
when two items differ; :class:`ItemCollator` says which dataset, which key and which shapes instead.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch.utils.data import default_collate

from dlas.errors import DataError


class ItemCollator:
    """Collates items of the dataset ``datasets.NAME`` into a batch dict (picklable, so loader workers use it).

    ``item_keys`` names the parts of items that are tuples, lists or single tensors.
    """

    def __init__(self, dataset_name: str, item_keys: Optional[Sequence[str]] = None):
        self.path = f"datasets.{dataset_name}"
        self.item_keys = list(item_keys) if item_keys else None

    def named(self, item: Any) -> dict[str, Any]:
        """``item`` as a dict of state keys."""
        if self.item_keys is not None:
            parts = list(item) if isinstance(item, (tuple, list)) else [item]
            if isinstance(item, Mapping) or len(parts) != len(self.item_keys):
                what = f"a dict of {len(item)} keys" if isinstance(item, Mapping) else f"{len(parts)} value(s)"
                raise DataError(f"item_keys names {len(self.item_keys)} value(s) ({', '.join(self.item_keys)}) but "
                                f"the dataset's items are {what}", f"{self.path}.item_keys")
            return dict(zip(self.item_keys, parts))
        if isinstance(item, Mapping):
            return dict(item)
        kind = f"a tuple of {len(item)} values" if isinstance(item, (tuple, list)) else type(item).__name__
        example = ", ".join(["hq", "label", "x", "y"][: len(item)] if isinstance(item, (tuple, list)) else ["hq"])
        raise DataError(f"the dataset's items are {kind}, not a dict of named values; name their parts as state "
                        f"keys with item_keys: [{example}] or return a dict", f"{self.path}.item_keys")

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        batch = [self.named(item) for item in items]
        keys = list(batch[0])
        for i, item in enumerate(batch[1:], 1):
            if list(item) != keys:
                missing = sorted(set(keys) ^ set(item))
                raise DataError(f"items of one batch have different keys: '{missing[0]}' is in some items but not "
                                f"others (item 0 has {keys}, item {i} has {list(item)})", self.path)
        try:
            return default_collate(batch)
        except (TypeError, RuntimeError, ValueError) as exc:
            raise self._explain(batch, keys, exc) from exc

    def _explain(self, batch: list[dict[str, Any]], keys: list[str], exc: Exception) -> DataError:
        """The one-line reason the batch cannot be collated, naming the key."""
        for key in keys:
            values = [item[key] for item in batch]
            if any(v is None for v in values):
                index = next(i for i, v in enumerate(values) if v is None)
                return DataError(f"key '{key}' is None in item {index} of a batch; a batch cannot hold None (return "
                                 "a tensor or number, or leave the key out of every item)", self.path)
            if all(isinstance(v, torch.Tensor) for v in values):
                shapes = list(dict.fromkeys(tuple(v.shape) for v in values))
                if len(shapes) > 1:
                    return DataError(f"key '{key}' has tensors of different shapes in one batch ({shapes[0]} and "
                                     f"{shapes[1]}); give every item the same size (crop or resize in the dataset) "
                                     "or use batch_size: 1", self.path)
            try:
                default_collate(values)
            except (TypeError, RuntimeError, ValueError) as inner:
                kinds = sorted({type(v).__name__ for v in values})
                return DataError(f"key '{key}' cannot be batched ({', '.join(kinds)}): {inner}", self.path)
        return DataError(f"the batch cannot be collated: {exc}", self.path)


def wants_epoch_keys(dataset: Any) -> bool:
    """Whether ``dataset`` asked for ``(epoch, index)`` keys and the run's seed (``epoch_keys = True``)."""
    return bool(getattr(dataset, "epoch_keys", False))
