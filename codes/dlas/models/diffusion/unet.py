"""The denoising UNet of improved DDPM / ADM, conditioned on a timestep, a low-resolution image and a vector."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError
from dlas.registry import NETWORKS


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (float) timesteps: ``[cos(t·f_k), sin(t·f_k)]`` with frequencies from 1 down to
    1/max_period, as the Transformer's positions; float32 whatever the autocast."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(embedding, (0, dim % 2))


def _zero(module: nn.Module) -> nn.Module:
    """``module`` with its parameters zeroed: a residual branch that starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """norm-SiLU-conv, the embedding as a scale and shift of the second norm (or added), norm-SiLU-dropout-conv,
    plus a skip connection (1x1 conv when the channel count changes). Starts as the skip connection alone."""

    def __init__(self, channels: int, out_channels: int, embedding_channels: int, dropout: float, groups: int,
                 scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm_in = nn.GroupNorm(groups, channels)
        self.conv_in = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_channels, out_channels * (2 if scale_shift else 1))
        self.norm_out = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(F.silu(self.norm_in(x)))
        e = self.embedding(F.silu(embedding))[..., None, None].to(h.dtype)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm_out(h) * (1 + scale) + shift
        else:
            h = self.norm_out(h + e)
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions of a feature map (starts as the identity)."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ConfigError(f"{channels} channels cannot be split into {heads} attention heads", "num_heads")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v)  # b, heads, hw, c/heads
        out = self.proj(attended.transpose(-1, -2).reshape(b, c, h * w))
        return x + out.reshape(b, c, h, w)


class Level(nn.Module):
    """One block of the UNet: a residual block, optionally followed by attention, or a resampling layer."""

    def __init__(self, res: Optional[ResBlock] = None, attention: Optional[AttentionBlock] = None,
                 resample: Optional[nn.Module] = None):
        super().__init__()
        self.res, self.attention, self.resample = res, attention, resample

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        if self.res is not None:
            x = self.res(x, embedding)
        if self.attention is not None:
            x = self.attention(x)
        if self.resample is not None:
            x = self.resample(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


@NETWORKS.register("diffusion_unet")
class DiffusionUNet(nn.Module):
    """The denoising UNet of a diffusion model (improved DDPM / ADM's architecture), optionally an upsampler.

    ``forward(x, t, lq=None, condition=None)``: ``x`` the noisy image batch (NCHW in [-1, 1]), ``t`` the float
    timestep of each sample (in [0, 1000)), ``lq`` the low-resolution image to condition on (bilinearly upsampled to
    x's size and concatenated, as SR3 and improved DDPM's super-resolution model do; any size), ``condition`` an
    extra ``[N, condition_dim]`` vector (or ``[N]`` scalar) embedded and added to the timestep embedding, e.g. a
    degradation strength. Returns the prediction (``channels``, or twice that with ``learn_sigma``). Train it with
    the ``gaussian_diffusion`` injector; ``dlas-test`` samples it with the ``diffusion`` task.

    Options:
      channels: image channels (3).
      lq_channels: channels of the low-resolution conditioning image; 0 for an unconditional model.
      scale: output size / lq size at inference (the ``diffusion`` task samples ``scale`` x the input); training
        accepts any pair of sizes.
      model_channels: channels of the first level (64; improved DDPM used 128, its 64->256 upsampler 192).
      channel_mult: channel multiplier of each level; each level after the first halves the resolution, so inputs
        must be multiples of 2^(levels - 1) (``size_multiple``; the ``diffusion`` task pads to it).
      num_res_blocks: residual blocks per level (2).
      attention_at: downsampling factors of the levels with self-attention (1 = full resolution, 2 = half, ...);
        [4, 8] on 64-pixel crops is improved DDPM's attention at 16 and 8 pixels. The middle always has attention.
      num_heads: attention heads (4).
      dropout: in every residual block (0; improved DDPM used 0.1-0.3 on small data sets).
      learn_sigma: also output the variance interpolation values (for ``variance: learned_range``).
      condition_dim: size of the extra condition vector (0: none).
      scale_shift_norm: the embedding scales and shifts the residual blocks' second normalisation (ADM's choice);
        false adds it instead (DDPM's).
      norm_groups: GroupNorm groups (32); must divide model_channels times every multiplier.
    """

    inference_task = "diffusion"

    def __init__(self, channels: int = 3, lq_channels: int = 3, scale: int = 4, model_channels: int = 64,
                 channel_mult: list[int] = (1, 2, 3, 4), num_res_blocks: int = 2, attention_at: list[int] = (4, 8),
                 num_heads: int = 4, dropout: float = 0.0, learn_sigma: bool = False, condition_dim: int = 0,
                 scale_shift_norm: bool = True, norm_groups: int = 32):
        super().__init__()
        for name, value in (("channels", channels), ("model_channels", model_channels), ("scale", scale),
                            ("num_res_blocks", num_res_blocks), ("num_heads", num_heads), ("norm_groups", norm_groups)):
            if value < 1:
                raise ConfigError(f"must be >= 1, got {value}", name)
        if lq_channels < 0 or condition_dim < 0:
            raise ConfigError("must be >= 0", "lq_channels" if lq_channels < 0 else "condition_dim")
        if not channel_mult or min(channel_mult) < 1:
            raise ConfigError(f"needs at least one level, each multiplier >= 1, got {list(channel_mult)}",
                              "channel_mult")
        if not 0 <= dropout < 1:
            raise ConfigError(f"must be in [0, 1), got {dropout}", "dropout")
        widths = [model_channels * m for m in channel_mult]
        if any(w % norm_groups for w in widths):
            raise ConfigError(f"{norm_groups} groups do not divide the level widths {widths}; pick norm_groups "
                              "dividing model_channels times every multiplier", "norm_groups")
        factors = [2 ** i for i in range(len(channel_mult))]
        unknown = sorted(set(attention_at) - set(factors))
        if unknown:
            raise ConfigError(f"{unknown} are not downsampling factors of this UNet (it has {factors})",
                              "attention_at")
        self.channels, self.lq_channels, self.scale = channels, lq_channels, scale
        self.condition_dim = condition_dim
        self.model_channels = model_channels
        self.learn_sigma = learn_sigma
        self.size_multiple = 2 ** (len(channel_mult) - 1)
        embedding = 4 * model_channels

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, embedding, dropout, norm_groups, scale_shift_norm)

        def attention(ch: int, factor: int) -> Optional[AttentionBlock]:
            return AttentionBlock(ch, num_heads, norm_groups) if factor in attention_at else None

        self.time_embedding = nn.Sequential(nn.Linear(model_channels, embedding), nn.SiLU(),
                                            nn.Linear(embedding, embedding))
        self.condition_embedding = nn.Linear(condition_dim, embedding) if condition_dim else None
        self.conv_in = nn.Conv2d(channels + lq_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [model_channels], model_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(Level(res(ch, width), attention(width, factors[level])))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                self.down.append(Level(resample=nn.Conv2d(ch, ch, 3, stride=2, padding=1)))
                skips.append(ch)
        self.middle = nn.ModuleList([Level(res(ch, ch), AttentionBlock(ch, num_heads, norm_groups)),
                                     Level(res(ch, ch))])
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for i in range(num_res_blocks + 1):
                width = widths[level]
                upsample = Upsample(width) if level and i == num_res_blocks else None
                self.up.append(Level(res(ch + skips.pop(), width), attention(width, factors[level]), upsample))
                ch = width
        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = _zero(nn.Conv2d(ch, channels * (2 if learn_sigma else 1), 3, padding=1))

    def checkpoint_modules(self) -> list[nn.Module]:
        """The residual / attention blocks (activation checkpointing with ``checkpointing: true``)."""
        return [*self.down, *self.middle, *self.up]

    def forward(self, x: torch.Tensor, t: torch.Tensor, lq: Optional[torch.Tensor] = None,
                condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[-2] % self.size_multiple or x.shape[-1] % self.size_multiple:
            raise ValueError(f"diffusion_unet: image size {tuple(x.shape[-2:])} is not a multiple of "
                             f"{self.size_multiple} (2^(levels - 1)); crop or pad the images")
        if self.lq_channels:
            if lq is None:
                raise ValueError("diffusion_unet: this upsampler (lq_channels > 0) needs the low-resolution image lq")
            if lq.shape[-2:] != x.shape[-2:]:
                lq = F.interpolate(lq, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, lq.to(x.dtype)], dim=1)
        elif lq is not None:
            raise ValueError("diffusion_unet: lq_channels is 0 (unconditional), but an lq image was given")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        embedding = self.time_embedding(timestep_embedding(t, self.model_channels))
        if self.condition_embedding is not None:
            if condition is None:
                raise ValueError(f"diffusion_unet: condition_dim is {self.condition_dim}; give the condition vector")
            condition = condition.reshape(x.shape[0], -1).to(embedding.dtype)
            if condition.shape[1] != self.condition_dim:
                raise ValueError(f"diffusion_unet: the condition has {condition.shape[1]} values per sample, "
                                 f"condition_dim is {self.condition_dim}")
            embedding = embedding + self.condition_embedding(condition)
        elif condition is not None:
            raise ValueError("diffusion_unet: condition_dim is 0, but a condition was given")
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, embedding)
            skips.append(h)
        for block in self.middle:
            h = block(h, embedding)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), embedding)
        return self.conv_out(F.silu(self.norm_out(h)))
