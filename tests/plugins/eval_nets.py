"""Tiny networks for the dlas-test / video / evaluator tests (imported by name through a config's imports:)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dlas.registry import NETWORKS


@NETWORKS.register("eval_tiny_sr")
class EvalTinySR(torch.nn.Module):
    """Nearest-neighbour upscaling plus a zero-initialised 3x3 conv residual (an identity-ish SR net)."""

    def __init__(self, scale: int = 2, nf: int = 4):
        super().__init__()
        self.scale = scale
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        torch.nn.init.zeros_(self.conv.weight)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return up + self.conv(up)


@NETWORKS.register("eval_tiny_flow")
class EvalTinyFlow(EvalTinySR):
    """EvalTinySR with a ``sample(lq, temperature)`` that brightens by ``temperature / 10`` (deterministic)."""

    def sample(self, lq: torch.Tensor, temperature: float) -> torch.Tensor:
        return (self.forward(lq) + temperature / 10).clamp(0, 1)


@NETWORKS.register("eval_tiny_critic")
class EvalTinyCritic(EvalTinySR):
    """EvalTinySR's weights, but one score per image (a discriminator picked by mistake with --network)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).mean(dim=(1, 2, 3))[:, None]
