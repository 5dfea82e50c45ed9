"""Pixel losses: a distance between two state tensors, and a state value that already is a loss."""
from __future__ import annotations

from typing import Any, Literal, Mapping

import torch

from dlas.context import Context
from dlas.errors import ConfigError
from dlas.losses.base import Loss
from dlas.registry import LOSSES


@LOSSES.register("pix")
class PixelLoss(Loss):
    """Mean per-element distance between ``fake`` and ``real`` (the PSNR-oriented SR loss).

    Options:
      criterion: ``l1`` (mean absolute error, the usual SR choice: sharper than l2), ``l2`` (mean squared
        error, what PSNR measures) or ``charbonnier`` (``mean(sqrt((fake - real)^2 + eps^2))``, a smooth L1
        from LapSRN: within eps^2 / (2 |error|) of l1 for errors much larger than eps, and smooth at 0).
      real: the target's state key (e.g. ``hq``).
      fake: the prediction's state key (e.g. ``gen``).
      eps: the charbonnier constant, 1e-3 as in the literature (so eps^2 = 1e-6 under the root); on [0, 1]
        images that is a quarter of one 8-bit grey level.
    Both tensors must have the same shape; the difference is taken in float32 even under bf16/fp16 autocast.
    """

    def __init__(self, criterion: Literal["l1", "l2", "charbonnier"] = "l1", real: str = "hq", fake: str = "gen",
                 eps: float = 1e-3):
        super().__init__(reads=[fake, real])
        if eps <= 0:
            raise ConfigError(f"must be > 0, got {eps}", "eps")
        self.criterion = criterion
        self.real = real
        self.fake = fake
        self.eps = eps

    def forward(self, state: Mapping[str, Any], ctx: Context) -> torch.Tensor:
        fake, real = state[self.fake], state[self.real]
        if fake.shape != real.shape:
            raise ValueError(f"pix loss: '{self.fake}' has shape {tuple(fake.shape)} but '{self.real}' has shape "
                             f"{tuple(real.shape)}; they must match")
        diff = fake.float() - real.float()
        if self.criterion == "l1":
            return diff.abs().mean()
        if self.criterion == "l2":
            return diff.square().mean()
        return (diff.square() + self.eps ** 2).sqrt().mean()


@LOSSES.register("direct")
class DirectLoss(Loss):
    """Uses the state value ``key`` as the loss, averaged if it is not a scalar.

    For networks that compute their own objective, e.g. SRFlow's negative log-likelihood per sample.
    """

    def __init__(self, key: str):
        super().__init__(reads=[key])
        self.key = key

    def forward(self, state: Mapping[str, Any], ctx: Context) -> torch.Tensor:
        value = state[self.key]
        if not torch.is_tensor(value):
            raise ValueError(f"direct loss: '{self.key}' is a {type(value).__name__}, not a tensor")
        return value if value.dim() == 0 else value.float().mean()
