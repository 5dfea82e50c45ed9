"""What an evaluator sees of the trainer (:class:`EvalContext`) and the :class:`Evaluator` base class.

Validation is split across ranks: an evaluator takes the items ``rank::world_size`` of its dataset, sums its
per-item values and counts, and passes them through ``ctx.all_reduce_sum`` so every rank returns the global
mean. The trainer logs the returned ``{metric: value}`` as ``EVALNAME/metric`` (console, tensorboard,
``val/STEP/metrics.json``); evaluators may also write files (images, per-image numbers) into ``ctx.out_dir``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Mapping, Optional

import torch

from dlas.errors import ConfigError


@dataclass
class EvalContext:
    """The trainer as seen by an evaluator during one validation pass."""

    networks: Mapping[str, torch.nn.Module]  # in eval mode; EMA weights where the network has an EMA (default)
    datasets: Mapping[str, torch.utils.data.Dataset]  # built datasets by config name ("val", ...)
    out_dir: Path  # experiments/NAME/val/STEP/EVALNAME — write images here (create it)
    step: int
    device: torch.device
    autocast: Callable[[], ContextManager]  # the run's precision context (nullcontext for fp32)
    compute_losses: Optional[Callable[[dict], dict[str, float]]] = None  # the training graph's losses on one batch
    rank: int = 0
    world_size: int = 1
    # sums per-rank tensors over all ranks (identity when world_size == 1)
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    config: Mapping[str, Any] = field(default_factory=dict)  # the run's resolved config (tasks read it)
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # NCHW in [0, 1]: logged to tensorboard

    def add_image(self, name: str, images: torch.Tensor) -> None:
        """Log ``images`` (NCHW, or one CHW image, in [0, 1]) to tensorboard as ``val/EVALNAME/name``."""
        self.images[name] = (images[None] if images.dim() == 3 else images).detach().float().cpu()

    def shard(self, count: int) -> range:
        """The item indices of ``range(count)`` this rank evaluates."""
        return range(self.rank, count, self.world_size)

    def global_mean(self, sums: Mapping[str, float], count: int) -> dict[str, float]:
        """Turn this rank's per-metric sums over ``count`` items into means over all ranks' items."""
        names = sorted(sums)
        local = torch.tensor([float(sums[n]) for n in names] + [float(count)], dtype=torch.float64, device=self.device)
        total = self.all_reduce_sum(local)
        n = float(total[-1])
        return {name: float(total[i]) / n if n else float("nan") for i, name in enumerate(names)}


class Evaluator:
    """Base class: ``__call__(ctx) -> {metric: value}``; ``higher_is_better`` says each metric's direction;
    ``summary(metrics)`` gives the lines the run's final summary prints for this evaluator's last metrics."""

    higher_is_better: ClassVar[Mapping[str, bool]] = {}

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        raise NotImplementedError

    def summary(self, metrics: Mapping[str, float]) -> list[str]:
        """Lines worth printing at the end of training about ``metrics`` (this evaluator's, unprefixed)."""
        return []

    def is_higher_better(self, metric: str) -> bool:
        """Whether a larger ``metric`` is better (for keeping the best checkpoint)."""
        if metric not in self.higher_is_better:
            raise ConfigError(f"{type(self).__name__} reports no metric '{metric}'; it reports: "
                              f"{', '.join(self.higher_is_better)}", "logger.keep_best")
        return self.higher_is_better[metric]

    @staticmethod
    def dataset(ctx: EvalContext, name: str) -> torch.utils.data.Dataset:
        """The dataset called ``name`` in ``datasets:``; a ConfigError listing the others when absent."""
        if name not in ctx.datasets:
            raise ConfigError(f"no dataset '{name}' to evaluate on; datasets: {', '.join(ctx.datasets) or '(none)'}",
                              f"datasets.{name}")
        return ctx.datasets[name]

    @staticmethod
    def network(ctx: EvalContext, name: str) -> torch.nn.Module:
        """The network called ``name`` in ``networks:``; a ConfigError listing the others when absent."""
        if name not in ctx.networks:
            raise ConfigError(f"no network '{name}' to evaluate; networks: {', '.join(ctx.networks) or '(none)'}",
                              f"networks.{name}")
        return ctx.networks[name]


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON; an infinite PSNR (identical images) is written as ``Infinity``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=True))


class Validation:
    """A run's evaluators, run together: at each validation while training, or once by ``dlas-test -opt``.

    ``make_context(name, step)`` gives the :class:`EvalContext` of evaluator ``name`` at ``step``. Metrics are
    returned as ``EVALNAME/metric``, images (for tensorboard) as ``EVALNAME/name``.
    """

    def __init__(self, evaluators: Mapping[str, Any], make_context: Callable[[str, int], EvalContext]):
        self.evaluators = dict(evaluators)
        self.make_context = make_context
        self.images: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.evaluators)

    def __call__(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        self.images = {}
        with torch.no_grad():
            for name, evaluator in self.evaluators.items():
                ctx = self.make_context(name, step)
                metrics.update({f"{name}/{k}": float(v) for k, v in evaluator(ctx).items()})
                self.images.update({f"{name}/{k}": v for k, v in ctx.images.items()})
        return metrics

    def higher_is_better(self, key: str) -> bool:
        """The direction of ``EVALNAME/metric`` (evaluators without ``is_higher_better``: unless it is a loss)."""
        name, _, metric = key.partition("/")
        evaluator = self.evaluators.get(name)
        return evaluator.is_higher_better(metric) if hasattr(evaluator, "is_higher_better") else "loss" not in key

    def summary(self, metrics: Mapping[str, float]) -> list[str]:
        """Every evaluator's summary lines about its part of ``metrics``."""
        lines = []
        for name, evaluator in self.evaluators.items():
            own = {k[len(name) + 1:]: v for k, v in metrics.items() if k.startswith(f"{name}/")}
            if own and hasattr(evaluator, "summary"):
                lines += [f"{name}: {line}" for line in evaluator.summary(own)]
        return lines
