"""Learning-rate schedulers named under ``train.lr_scheduler: {type: …}``.

The framework passes ``optimizer``; the trainer calls ``step()`` once after each optimizer step and saves
``state_dict()`` in every checkpoint. Positions are counted in scheduler steps: the lr used by the 1-based
training step ``s`` is the schedule's value at ``s - 1`` (step 1 uses the initial lr). All of them are torch
``LRScheduler``s, so ``get_last_lr()`` gives the current lr of each parameter group.
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Optional

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, MultiStepLR

from dlas.errors import ConfigError
from dlas.registry import SCHEDULERS


def _unit(step: int) -> float:
    return 1.0


@SCHEDULERS.register("constant")
def constant(optimizer: torch.optim.Optimizer) -> LambdaLR:
    """Keeps the optimizer's lr unchanged (useful as the scheduler inside ``linear_warmup``)."""
    return LambdaLR(optimizer, _unit)


@SCHEDULERS.register("multistep")
def multistep(optimizer: torch.optim.Optimizer, milestones: list[int], gamma: float = 0.5) -> MultiStepLR:
    """Multiplies the lr by ``gamma`` at each milestone (``torch.optim.lr_scheduler.MultiStepLR``).

    Options:
      milestones: increasing step counts; once a milestone's number of steps is done, the lr is multiplied
        by ``gamma`` (``milestones: [50000]`` trains steps 1 … 50000 at the full lr and step 50001 on at half).
        ESRGAN uses [50000, 100000, 200000, 300000] over 400k steps.
      gamma: the factor, 0.5 halves the lr at each milestone.
    """
    if any(not b > a for a, b in zip(milestones, milestones[1:])) or any(m < 1 for m in milestones):
        raise ConfigError(f"must be increasing step counts >= 1, got {milestones}", "milestones")
    if gamma <= 0:
        raise ConfigError(f"must be > 0, got {gamma}", "gamma")
    return MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)


@SCHEDULERS.register("cosine")
class CosineAnnealingRestart(LRScheduler):
    """Cosine annealing with warm restarts, as BasicSR's ``CosineAnnealingRestartLR``.

    The schedule is a sequence of cosine periods. In period ``i`` of ``periods[i]`` steps, starting at step
    ``t0`` (the sum of the periods before it), the lr at scheduler step ``t`` is
    ``eta_min + restart_weights[i] * (base_lr - eta_min) * (1 + cos(pi * (t - t0) / periods[i])) / 2``:
    it falls from ``restart_weights[i] * base_lr`` to ``eta_min`` at the period's last step, then jumps back up.
    After the last period the lr stays at ``eta_min``.

    Options:
      periods: the periods' lengths in steps; the SR recipes use [250000, 250000, 250000, 250000] for 1M steps.
      restart_weights: the height of each period's peak relative to the base lr, one per period (default: all 1).
      eta_min: the lowest lr, reached at the end of each period (the SR recipes use 1e-7).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, periods: list[int],
                 restart_weights: Optional[list[float]] = None, eta_min: float = 0.0):
        if not periods or any(p < 1 for p in periods):
            raise ConfigError(f"must be a non-empty list of step counts >= 1, got {periods}", "periods")
        restart_weights = [1.0] * len(periods) if restart_weights is None else list(restart_weights)
        if len(restart_weights) != len(periods):
            raise ConfigError(f"gives {len(restart_weights)} weights for {len(periods)} periods; give one per "
                              "period", "restart_weights")
        if eta_min < 0:
            raise ConfigError(f"must be >= 0, got {eta_min}", "eta_min")
        self.periods = list(periods)
        self.restart_weights = restart_weights
        self.eta_min = eta_min
        self.period_ends = [sum(self.periods[: i + 1]) for i in range(len(self.periods))]
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        t = self.last_epoch
        # The period holding t: t == a period's end still belongs to it, which is where eta_min is reached.
        i = bisect.bisect_left(self.period_ends, t)
        if i == len(self.periods):
            return [self.eta_min for _ in self.base_lrs]
        start = self.period_ends[i - 1] if i else 0
        weight = self.restart_weights[i]
        cosine = 1 + math.cos(math.pi * (t - start) / self.periods[i])
        return [self.eta_min + weight * 0.5 * (base - self.eta_min) * cosine for base in self.base_lrs]


class LinearWarmup(LRScheduler):
    """Scales the lr of another scheduler by a factor rising linearly to 1 over the first steps.

    Each step, the wrapped scheduler computes its lr as if alone (it is handed back its own last lr first, so
    schedulers that update the lr multiplicatively, like ``MultiStepLR``, stay exact); this one then multiplies
    it by the warm-up factor. The wrapped scheduler keeps counting from step 0, so its milestones and periods
    stay at the steps the config names.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, inner: LRScheduler, warmup_steps: int,
                 start_factor: float):
        self.inner = inner
        self.warmup_steps = warmup_steps
        self.start_factor = start_factor
        super().__init__(optimizer)

    def factor(self, t: int) -> float:
        if t >= self.warmup_steps:
            return 1.0
        return self.start_factor + (1.0 - self.start_factor) * t / self.warmup_steps

    def get_lr(self) -> list[float]:
        return [lr * self.factor(self.last_epoch) for lr in self.inner.get_last_lr()]

    def step(self, epoch: Optional[int] = None) -> None:
        if epoch is not None:
            raise TypeError("linear_warmup counts its own steps; call step() without an epoch")
        if self.last_epoch >= 0:  # the constructor's initial step: the inner scheduler already made its own
            for group, lr in zip(self.optimizer.param_groups, self.inner.get_last_lr()):
                group["lr"] = lr
            self.inner.step()
        super().step()

    def state_dict(self) -> dict[str, Any]:
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "inner")}
        state["inner"] = self.inner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.inner.load_state_dict(state.pop("inner"))
        self.__dict__.update(state)


@SCHEDULERS.register("linear_warmup")
def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int = 1000,
                  scheduler: Optional[dict[str, Any]] = None, start_factor: float = 0.0) -> LinearWarmup:
    """Linear lr warm-up in front of another scheduler.

    Step 1 trains at ``start_factor`` times the wrapped scheduler's lr; the factor rises linearly and reaches 1
    at step ``warmup_steps + 1``; from then on the wrapped scheduler alone sets the lr. The wrapped schedule is
    not shifted: ``milestones: [50000]`` inside still halves the lr after 50000 steps in total.

    Options:
      warmup_steps: length of the warm-up in steps (1000-10000 is common for transformers).
      scheduler: the scheduler to warm up, a mapping with its own ``type`` (default ``{type: constant}``),
        e.g. ``{type: cosine, periods: [100000], eta_min: 1e-6}``.
      start_factor: the factor at step 1, between 0 and 1 (0: the first step does not move the weights).
    """
    if warmup_steps < 1:
        raise ConfigError(f"must be >= 1, got {warmup_steps}", "warmup_steps")
    if not 0 <= start_factor <= 1:
        raise ConfigError(f"must be between 0 and 1, got {start_factor}", "start_factor")
    # A relative path: the registry puts the outer one (train.lr_scheduler) in front of it.
    inner = SCHEDULERS.build(dict(scheduler or {"type": "constant"}), "scheduler", optimizer=optimizer)
    return LinearWarmup(optimizer, inner, warmup_steps, start_factor)
