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


@NETWORKS.register("eval_tiny_sampler")
class EvalTinySampler(EvalTinySR):
    """A generative toy with EvalTinySR's weights: ``generate`` draws seeded noise (scaled by ``temperature``)
    around a grey level set by the caption's length, plus the conv's bias."""

    inference_task = "sample"

    def generate(self, count: int, generator: torch.Generator, caption: str = None,
                 temperature: float = 1.0) -> torch.Tensor:
        level = 0.5 if caption is None else (len(caption) % 10) / 10
        noise = torch.rand(count, 3, 8, 8, generator=generator, device=self.conv.bias.device) - 0.5
        return (level + temperature * 0.2 * noise + self.conv.bias[None, :, None, None]).clamp(0, 1)


@NETWORKS.register("eval_tiny_autoencoder")
class EvalTinyAutoencoder(EvalTinySR):
    """An autoencoder toy: ``reconstruct`` takes sides that are multiples of 4 only, and adds the conv's bias."""

    size_multiple = 4

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"sides must be multiples of 4, got {tuple(x.shape[-2:])}")
        return x + self.conv(x)
