"""Validation loss: the training graph's losses on held-out data, without any update."""
from __future__ import annotations

from collections import defaultdict

from dlas.data.collate import ItemCollator
from dlas.errors import ConfigError
from dlas.evaluators.base import EvalContext, Evaluator
from dlas.registry import EVALUATORS


@EVALUATORS.register("loss")
class LossEvaluator(Evaluator):
    """Runs the training steps' injectors and losses on a validation dataset and reports each loss's mean.

    The numbers are the unweighted per-loss values the trainer logs, averaged over all items (weighted by
    batch size, so the last short batch counts for what it holds). A validation loss that rises while the
    training loss falls is the classic sign of over-fitting. All metrics are lower-is-better.

    Options:
      dataset: the dataset to evaluate on (name under ``datasets:``).
      batch_size: items per forward pass on each rank (memory only: the means do not depend on it). Consecutive
        items of different sizes (whole validation images) run in separate passes.
      max_items: evaluate only the first N items (null: all).
    """

    def __init__(self, dataset: str = "val", batch_size: int = 1, max_items: int | None = None):
        if batch_size < 1:
            raise ConfigError(f"must be >= 1, got {batch_size}", "batch_size")
        if max_items is not None and max_items < 1:
            raise ConfigError(f"must be >= 1 or null (all items), got {max_items}", "max_items")
        self.dataset_name = dataset
        self.batch_size = batch_size
        self.max_items = max_items

    def is_higher_better(self, metric: str) -> bool:
        return False

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        if ctx.compute_losses is None:
            raise ConfigError("the 'loss' evaluator needs the training graph (only available while training)", "eval")
        data = self.dataset(ctx, self.dataset_name)
        count = len(data) if self.max_items is None else min(len(data), self.max_items)
        if count == 0:
            raise ConfigError("the dataset is empty", f"datasets.{self.dataset_name}")
        indices = list(ctx.shard(count))
        entry = (ctx.config.get("datasets") or {}).get(self.dataset_name) or {}
        collate = ItemCollator(self.dataset_name, entry.get("item_keys"))
        sums: dict[str, float] = defaultdict(float)
        for start in range(0, len(indices), self.batch_size):
            items = [collate.named(data[i]) for i in indices[start : start + self.batch_size]]
            for group in _same_size_groups(items):
                for name, value in ctx.compute_losses(collate(group)).items():
                    sums[name] += float(value) * len(group)
        # every rank must reduce the same names, even one that got no items: ask for them on an empty shard too
        names = sorted(sums) or sorted(ctx.compute_losses(collate([data[0]])))
        return ctx.global_mean({name: sums[name] for name in names}, len(indices))


def _same_size_groups(items: list[dict]) -> list[list[dict]]:
    """``items`` split into runs whose tensors share their shapes (whole validation images differ in size and
    cannot be stacked into one batch); each run keeps the batch's order."""
    groups: list[list[dict]] = []
    shapes = lambda item: [tuple(v.shape) for v in item.values() if hasattr(v, "shape")]
    for item in items:
        if groups and shapes(groups[-1][0]) == shapes(item):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups
