"""One optimizer step of the graph: its injectors, weighted losses, optimizer, scheduler and grad scaler.

A step's config (``steps.NAME``) names the networks it trains, the injectors that extend the state and the
losses it minimises. :meth:`Step.forward_backward` runs on one micro-batch state; :meth:`Step.optimize` runs
once per iteration after all micro-batches have been accumulated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from dlas.config.schema import GATE_KEYS, LOSS_KEYS
from dlas.context import Context
from dlas.errors import ConfigError
from dlas.injectors.base import Injector
from dlas.losses.base import Loss
from dlas.registry import INJECTORS, LOSSES, OPTIMIZERS, SCHEDULERS
from dlas.trainer import fsdp
from dlas.trainer.schedules import Gate, build_weight


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``grads`` together (``torch.nn.utils.get_total_norm`` where torch has it)."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def gate_of(cfg: Mapping[str, Any], path: str) -> Gate:
    return Gate(after=cfg["after"], before=cfg["before"], every=cfg["every"], path=path)


@dataclass
class WeightedLoss:
    name: str
    loss: Loss
    weight: Callable[[int], float]
    gate: Gate


@dataclass
class GatedInjector:
    name: str
    injector: Injector
    gate: Gate


@dataclass
class Step:
    """An optimizer step over the networks in ``training``."""

    name: str
    training: list[str]
    injectors: list[GatedInjector]
    losses: list[WeightedLoss]
    gate: Gate
    grad_clip: Optional[float] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Any = None
    scaler: Optional[torch.amp.GradScaler] = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    params_by_network: dict[str, list[torch.nn.Parameter]] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> "Step":
        path = f"steps.{name}"
        injectors = [
            GatedInjector(key, INJECTORS.build(icfg, f"{path}.injectors.{key}", reserved=GATE_KEYS),
                          gate_of(icfg, f"{path}.injectors.{key}"))
            for key, icfg in cfg["injectors"].items()
        ]
        losses = [
            WeightedLoss(key, LOSSES.build(lcfg, f"{path}.losses.{key}", reserved=LOSS_KEYS),
                         build_weight(lcfg["weight"], f"{path}.losses.{key}.weight"),
                         gate_of(lcfg, f"{path}.losses.{key}"))
            for key, lcfg in cfg["losses"].items()
        ]
        if not losses:
            raise ConfigError("a step needs at least one loss", f"{path}.losses")
        return cls(name, list(cfg["training"]), injectors, losses, gate_of(cfg, path), cfg["grad_clip"])

    def build_optimizer(self, cfg: Mapping[str, Any], networks: Mapping[str, torch.nn.Module],
                        scheduler_cfg: Optional[Mapping[str, Any]], scheduler_path: str, use_scaler: bool,
                        device: torch.device) -> None:
        named = [(f"{net}.{pname}", p) for net in self.training for pname, p in networks[net].named_parameters()]
        self.params_by_network = {net: list(networks[net].parameters()) for net in self.training}
        self.params = [p for _, p in named]
        self.optimizer = OPTIMIZERS.build(dict(cfg), f"steps.{self.name}.optimizer", params=named)
        if scheduler_cfg:
            self.scheduler = SCHEDULERS.build(dict(scheduler_cfg), scheduler_path, optimizer=self.optimizer)
        if use_scaler:
            self.scaler = torch.amp.GradScaler(device.type)

    # ------------------------------------------------------------------ running
    def run_injectors(self, state: dict, ctx: Context) -> None:
        for item in self.injectors:
            if item.gate.active(ctx.iteration):
                state.update(item.injector(state, ctx))

    def compute_losses(self, state: dict, ctx: Context) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
        """Weighted total and ``{name: unweighted, name/weighted: weighted}`` of the active losses."""
        total = None
        logged: dict[str, torch.Tensor] = {}
        for item in self.losses:
            if not item.gate.active(ctx.iteration):
                continue
            weight = item.weight(ctx.iteration)
            value = item.loss(state, ctx)
            if value.dim() != 0:
                raise ValueError(f"steps.{self.name}.losses.{item.name} returned shape {tuple(value.shape)}, "
                                 "expected a scalar")
            logged[item.name] = value.detach()
            if weight == 0:  # a zero-weighted loss still reports, but must not build a graph into the sum
                continue
            weighted = value.float() * weight
            logged[f"{item.name}/weighted"] = weighted.detach()
            total = weighted if total is None else total + weighted
        return total, logged

    def forward_backward(self, state: dict, ctx: Context, micro_batches: int,
                         autocast: Callable[[], Any]) -> dict[str, torch.Tensor]:
        """Injectors, losses and backward on one micro-batch; returns the detached losses for logging."""
        with autocast():
            self.run_injectors(state, ctx)
            total, logged = self.compute_losses(state, ctx)
        if total is not None:
            # Dividing by the micro-batch count makes K accumulated micro-batches the same update as one batch.
            total = total / micro_batches
            (self.scaler.scale(total) if self.scaler else total).backward()
            logged["total"] = total.detach() * micro_batches
        return logged

    def optimize(self, losses_finite: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Clip, check and apply the accumulated gradients.

        Returns the gradient norm of each trained network and of all of them (``"total"``), and whether the
        update was applied, as a 0-d bool tensor: a non-finite loss or gradient norm skips it (the NaN/Inf
        guard). A fused optimizer (torch's choice on CUDA) skips it on the device, through the ``found_inf``
        that it reads like the grad scaler's, so the step never waits for the host; another optimizer needs the
        answer on the host first: that is then the step's one host sync.
        """
        grads = {net: [p.grad for p in params if p.grad is not None] for net, params in self.params_by_network.items()}
        grads = {net: g for net, g in grads.items() if g}
        if not grads:
            return {"total": torch.zeros(())}, losses_finite.reshape(())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norms = {net: fsdp.full(total_norm(g)) for net, g in grads.items()}  # FSDP: reduced over the shards
        norms["total"] = torch.linalg.vector_norm(torch.stack(list(norms.values())))
        if self.grad_clip:  # as clip_grad_norm_, reusing the norms already computed
            coef = (self.grad_clip / (norms["total"] + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([g for gs in grads.values() for g in gs], coef)
        if self.scaler:
            # The scaler skips steps whose gradients overflowed and lowers its scale: that is fp16's normal
            # dynamics, not a bad step, so only a non-finite loss counts as one.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return norms, losses_finite.reshape(())
        ok = (torch.isfinite(norms["total"]) & losses_finite).reshape(())
        if self.optimizer.defaults.get("fused"):
            self.optimizer.grad_scale = None
            self.optimizer.found_inf = (~ok).float()
            self.optimizer.step()
        elif bool(ok):
            self.optimizer.step()
        return norms, ok

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            # injectors that learn as they go (a loss-aware timestep sampler) keep their state with the step's
            "injectors": {item.name: item.injector.state_dict() for item in self.injectors
                          if hasattr(item.injector, "state_dict")},
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.scheduler and sd.get("scheduler") is not None:
            self.scheduler.load_state_dict(sd["scheduler"])
        if self.scaler and sd.get("scaler") is not None:
            self.scaler.load_state_dict(sd["scaler"])
        saved = sd.get("injectors") or {}
        for item in self.injectors:
            if item.name in saved and hasattr(item.injector, "load_state_dict"):
                item.injector.load_state_dict(saved[item.name])
