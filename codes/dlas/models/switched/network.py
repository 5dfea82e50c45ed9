"""What a network built from switched convolutions needs around them.

* :func:`convert_to_switched`: replace chosen ``nn.Conv2d`` layers of a (trained) network by switched ones, in place.
* :func:`expand_state_dict`: map a plain network's weights onto the switched network's keys (what
  ``path.pretrain_model_NET`` uses, through the network's ``convert_state_dict``).
* :func:`advance_switches`: the per-iteration bookkeeping (temperature, usage record; one all-reduce under DDP).
* :func:`switch_debug_info`, :func:`balance_loss`: what is logged and what the auxiliary loss reads.
* :class:`SwitchedNetwork`: the trainer protocol (``set_step``, ``debug_info``, ``convert_state_dict``) built on them.
"""
from __future__ import annotations

import colorsys
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError
from dlas.models.switched.conv import SwitchedConv

# buffers each rank accumulates itself during an iteration; advance_switches all-reduces them
PENDING_BUFFERS = ("usage_pending", "usage_pending_count")


def switched_layers(module: nn.Module) -> dict[str, SwitchedConv]:
    """Every SwitchedConv of ``module``, by qualified name, in module order."""
    return {name: m for name, m in module.named_modules() if isinstance(m, SwitchedConv)}


@dataclass(frozen=True)
class TemperatureSchedule:
    """Linear from ``start`` to ``end`` over the first ``steps`` iterations, then ``end`` (a pure function of the
    iteration, so a resumed run uses exactly the temperatures of an uninterrupted one)."""

    start: float = 1.0
    end: float = 1.0
    steps: int = 0

    def __post_init__(self) -> None:
        for option, value in (("temperature_start", self.start), ("temperature_end", self.end)):
            if not value > 0:
                raise ConfigError(f"must be > 0, got {value}", option)
        if self.steps < 0:
            raise ConfigError(f"must be >= 0, got {self.steps}", "temperature_steps")

    def __call__(self, iteration: int) -> float:
        if self.steps == 0 or iteration >= self.steps:
            return self.end
        return self.start + (self.end - self.start) * max(iteration, 0) / self.steps


def advance_switches(module: nn.Module, temperature: Optional[float] = None) -> None:
    """Once per iteration, before its forwards: commit the last iteration's usage to every layer's record and set
    the temperature.

    Under ``torch.distributed`` the pending usage of every layer is summed over ranks in one all-reduce first, so
    every rank keeps the same record. Every rank must call this the same number of times (the trainer's
    ``set_step`` does).
    """
    layers = list(switched_layers(module).values())
    if not layers:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        pending = [getattr(layer, name) for layer in layers for name in PENDING_BUFFERS]
        flat = torch.cat([p.reshape(-1) for p in pending])
        torch.distributed.all_reduce(flat)
        for tensor, part in zip(pending, flat.split([p.numel() for p in pending])):
            tensor.copy_(part.view_as(tensor))
    for layer in layers:
        layer.commit_usage()
        if temperature is not None:
            layer.temperature.fill_(temperature)


def keep_pending_per_rank(module: nn.Module) -> None:
    """Tell DDP not to broadcast rank 0's pending usage over the other ranks' before each forward (it would
    replace their own counts); :func:`advance_switches` sums them instead. Call on the module DDP wraps."""
    names = [f"{name}.{buffer}" for name in switched_layers(module) for buffer in PENDING_BUFFERS]
    module._ddp_params_and_buffers_to_ignore = names


def balance_loss(module: nn.Module) -> torch.Tensor:
    """The mean over switched layers of their last training forward's balance term (see :class:`SwitchedConv`),
    each layer's taken once; 0 when there is none (no switched layer, evaluation, no gradient)."""
    terms = []
    for layer in switched_layers(module).values():
        if layer.balance_loss is not None:
            terms.append(layer.balance_loss)
            layer.balance_loss = None
    if not terms:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack(terms).mean()


def _palette(experts: int, device: torch.device) -> torch.Tensor:
    """``[K, 3]`` distinct colours (evenly spaced hues); one expert is grey."""
    if experts == 1:
        return torch.full((1, 3), 0.5, device=device)
    colours = [colorsys.hsv_to_rgb(k / experts, 0.8, 0.95) for k in range(experts)]
    return torch.tensor(colours, device=device)


def expert_maps(layers: Mapping[str, SwitchedConv]) -> Optional[torch.Tensor]:
    """The first sample's per-pixel winning expert of every layer (coloured, each layer's own palette), side by
    side at the largest layer's size: ``[1, 3, H, W * layers]``, or None before any training forward."""
    maps = [(layer.num_experts, layer.last_map) for layer in layers.values() if layer.last_map is not None]
    if not maps:
        return None
    height = max(m.shape[0] for _, m in maps)
    width = max(m.shape[1] for _, m in maps)
    tiles = []
    for experts, winner in maps:
        image = _palette(experts, winner.device)[winner].permute(2, 0, 1).unsqueeze(0)
        tiles.append(F.interpolate(image, size=(height, width), mode="nearest"))
    return torch.cat(tiles, dim=3).float()


def switch_debug_info(module: nn.Module) -> dict[str, Any]:
    """Per switched layer, the share of pixels each expert got since the last call (a 1-D tensor: a tensorboard
    histogram) and that distribution's entropy divided by log K (1: all experts equally used, 0: one expert takes
    everything); their mean; the temperature; and ``expert_maps`` (the routing of the last batch's first sample,
    one coloured map per layer)."""
    layers = switched_layers(module)
    info: dict[str, Any] = {}
    entropies = []
    for name, layer in layers.items():
        counts = layer.take_routed_pixels()
        if layer.num_experts == 1:
            continue
        share = counts / counts.sum().clamp_min(1)
        entropy = -(share * share.clamp_min(1e-12).log()).sum() / math.log(layer.num_experts)
        info[f"switch/{name}/usage"] = share
        info[f"switch/{name}/entropy"] = entropy
        entropies.append(entropy)
    if entropies:
        info["switch/usage_entropy"] = torch.stack(entropies).mean()
    if layers:
        info["switch/temperature"] = next(iter(layers.values())).temperature.clone()
        maps = expert_maps(layers)
        if maps is not None:
            info["switch/expert_maps"] = maps
    return info


# ---------------------------------------------------------------------- conversion
def convert_to_switched(module: nn.Module, patterns: Iterable[str], num_experts: int,
                        mode: str = "hard", **options: Any) -> list[str]:
    """Replace every ``nn.Conv2d`` of ``module`` whose qualified name matches one of ``patterns`` (shell-style:
    ``body.*.conv1``; ``*`` crosses dots) by :meth:`SwitchedConv.from_conv`, in place. Returns the names replaced.

    The network computes exactly what it computed before; its switched layers are then fine-tuned. ``options`` go
    to each SwitchedConv (selector_hidden, usage_history, dropout, ...).
    """
    patterns = list(patterns)
    targets = [name for name, m in module.named_modules()
               if type(m) is nn.Conv2d and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, SwitchedConv.from_conv(getattr(parent, child), num_experts, mode=mode, **options))
    keep_pending_per_rank(module)
    return targets


def expand_state_dict(state: Mapping[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """A plain network's state dict mapped onto ``module``, whose convolutions are (partly) switched.

    For each switched layer whose plain weight ``[O, C, kh, kw]`` is in ``state``, the weight and bias are repeated
    over the experts (so the switched network computes what the plain one did) and the layer's selector and
    bookkeeping buffers, which a plain file cannot have, are taken from ``module`` as it is. Keys of switched
    layers that are already switched, and every other key, are returned unchanged; anything that does not fit
    is left for the loader to report.
    """
    out = dict(state)
    own = module.state_dict()
    for name, layer in switched_layers(module).items():
        weight = out.get(f"{name}.weight")
        if weight is None or weight.dim() != 4:
            continue
        out[f"{name}.weight"] = weight.unsqueeze(0).repeat(layer.num_experts, 1, 1, 1, 1)
        bias = out.get(f"{name}.bias")
        if bias is not None and bias.dim() == 1:
            out[f"{name}.bias"] = bias.unsqueeze(0).repeat(layer.num_experts, 1)
        for key, value in own.items():
            if key.startswith(f"{name}.") and key not in out:
                out[key] = value
    return out


class SwitchedNetwork:
    """Mixin giving a network of switched convolutions the trainer's protocol methods.

    The network sets ``self.temperature_schedule`` (a :class:`TemperatureSchedule`) and calls
    :func:`keep_pending_per_rank` once its layers exist; its forward may return :func:`balance_loss` as a state
    output for an auxiliary loss.
    """

    temperature_schedule = TemperatureSchedule()

    def set_step(self, iteration: int) -> None:
        """Commit the usage record and set the temperature of iteration ``iteration``."""
        advance_switches(self, self.temperature_schedule(iteration))

    def debug_info(self) -> dict[str, Any]:
        return switch_debug_info(self)

    def convert_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights of the plain twin (same options, plain convolutions) load into this network: see
        :func:`expand_state_dict`. A file of this network itself is returned unchanged."""
        parent = super()
        if hasattr(parent, "convert_state_dict"):
            state = parent.convert_state_dict(state)
        return expand_state_dict(state, self)
