"""Exponential moving averages of network weights, at one or several rates.

``train.ema: {rate: 0.999, networks: [generator], warmup: 0, start: 0}``. Each update does
``ema = decay * ema + (1 - decay) * weight`` for every parameter (buffers such as BatchNorm statistics are
copied). With ``warmup: W`` the decay of the t-th update is ``min(rate, (1 + t) / (W + t))``, so early
averages are not dominated by the random initialisation: with W=10 and rate 0.999, the decay reaches 0.99 at
t≈890 and 0.999 at t≈9000. ``start: S`` copies the weights at step S and only then begins averaging.
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Optional, Sequence

import torch


class EMA:
    """Shadow copies of ``networks``, one per rate, updated after each optimizer step that trains them."""

    def __init__(self, networks: Mapping[str, torch.nn.Module], rates: Sequence[float], warmup: int = 0,
                 start: int = 0):
        self.rates = [float(r) for r in rates]
        self.warmup = warmup
        self.start = start
        self.updates = 0
        self.shadows: dict[float, dict[str, torch.nn.Module]] = {}
        for rate in self.rates:
            self.shadows[rate] = {}
            for name, net in networks.items():
                shadow = copy.deepcopy(net).eval()
                shadow.requires_grad_(False)
                self.shadows[rate][name] = shadow
        self.sources = dict(networks)

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def decay(self, rate: float) -> float:
        if self.warmup <= 0:
            return rate
        return min(rate, (1 + self.updates) / (self.warmup + self.updates))

    @torch.no_grad()
    def update(self, step: int, names: Sequence[str] | None = None, applied: Optional[torch.Tensor] = None) -> None:
        """Average the current weights of ``names`` (default: all) into every shadow.

        ``applied`` (a 0-d bool tensor): whether the optimizer step just taken was applied; a skipped one (the
        NaN guard's) leaves the shadows as they were, decided on the device without a host sync. It still
        counts towards the warm-up.
        """
        if step < self.start:
            return
        names = self.names if names is None else [n for n in names if n in self.sources]
        first = step == self.start
        for rate in self.rates:
            weight = 1.0 - (0.0 if first else self.decay(rate))
            if applied is not None:
                weight = applied.float() * weight
            for name in names:
                src = list(self.sources[name].parameters())
                dst = list(self.shadows[rate][name].parameters())
                torch._foreach_lerp_(dst, src, weight)
                for b_dst, b_src in zip(self.shadows[rate][name].buffers(), self.sources[name].buffers()):
                    b_dst.copy_(b_src if applied is None else torch.where(applied, b_src, b_dst))
        self.updates += 1

    def primary(self, name: str) -> torch.nn.Module:
        """The shadow of ``name`` at the first rate (the one validation uses)."""
        return self.shadows[self.rates[0]][name]

    def file_stem(self, rate: float, name: str) -> str:
        """``NET_ema`` for the first rate, ``NET_ema_RATE`` for the others (checkpoint file names)."""
        return f"{name}_ema" if rate == self.rates[0] else f"{name}_ema_{rate:g}"

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {self.file_stem(rate, name): shadow.state_dict()
                for rate, shadows in self.shadows.items() for name, shadow in shadows.items()}

    def load_state_dicts(self, stems: Mapping[str, Mapping[str, torch.Tensor]], updates: int,
                         load: Optional[Callable[[str, torch.nn.Module, Mapping[str, torch.Tensor]], None]] = None
                         ) -> None:
        """Restore the shadows from checkpoint files (``stems``: file stem -> state dict). A shadow the files do
        not have (a new rate or network since the checkpoint) starts from the live weights. ``load(name, module,
        state_dict)`` loads into a shadow (the trainer's, which knows sharded networks)."""
        for rate, shadows in self.shadows.items():
            for name, shadow in shadows.items():
                sd = stems.get(self.file_stem(rate, name))
                if sd is None:
                    with torch.no_grad():
                        for dst, src in zip(shadow.parameters(), self.sources[name].parameters()):
                            dst.copy_(src)
                        for dst, src in zip(shadow.buffers(), self.sources[name].buffers()):
                            dst.copy_(src)
                elif load is not None:
                    load(name, shadow, sd)
                else:
                    shadow.load_state_dict(sd)
        self.updates = updates
