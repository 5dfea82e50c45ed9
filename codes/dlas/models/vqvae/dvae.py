"""``dvae``: the discrete VAE of the triforce, image -> grid of integer tokens -> image.

A convolutional encoder downsamples by ``downsample`` (2, 4, 8, 16 or 32), a quantizer turns each position into
one of ``codebook_size`` tokens (Gumbel-softmax as in DALL-E, or an EMA vector quantizer), and a decoder
mirrors the encoder back to pixels. The transformer models the tokens; :meth:`DiscreteVAE.encode` and
:meth:`DiscreteVAE.decode` are the public interface it, the pipeline and ``scripts/extract_tokens.py`` use.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dlas.errors import ConfigError, DataError
from dlas.models.vqvae.quantizers import (
    CodeUsage,
    EMAVectorQuantizer,
    GumbelQuantizer,
    TemperatureSchedule,
    temperature_at,
    updates_state,
)
from dlas.registry import NETWORKS

Norm = Literal["none", "group", "batch"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) if channels % 4 == 0 else 1, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class ResBlock(nn.Module):
    """``x + conv3(act(norm(conv3(act(norm(x))))))``, its last convolution zero at initialisation (so each block
    starts as the identity and a deep stack trains from the first step)."""

    def __init__(self, channels: int, norm: Norm):
        super().__init__()
        self.body = nn.Sequential(_norm(norm, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  _norm(norm, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """3x3 stem, then per level ``res_blocks`` blocks and a stride-2 4x4 convolution, then blocks at the bottom
    and a 1x1 projection to ``out_channels`` (logits or code vectors)."""

    def __init__(self, widths: list[int], res_blocks: int, norm: Norm, out_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for width, next_width in zip(widths[:-1], widths[1:]):
            layers += [ResBlock(width, norm) for _ in range(res_blocks)]
            layers.append(nn.Conv2d(width, next_width, 4, stride=2, padding=1))
        layers += [ResBlock(widths[-1], norm) for _ in range(res_blocks)]
        layers += [_norm(norm, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], out_channels, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """The encoder mirrored: 3x3 from the code vectors, blocks, then per level nearest x2 upsampling, a 3x3
    convolution and blocks, then a 3x3 convolution to RGB."""

    def __init__(self, widths: list[int], res_blocks: int, norm: Norm, in_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[-1], 3, padding=1)]
        layers += [ResBlock(widths[-1], norm) for _ in range(res_blocks)]
        for width, next_width in zip(widths[:0:-1], widths[-2::-1]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, next_width, 3, padding=1)]
            layers += [ResBlock(next_width, norm) for _ in range(res_blocks)]
        layers += [_norm(norm, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], 3, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@NETWORKS.register("dvae")
class DiscreteVAE(nn.Module):
    """Discrete VAE (DALL-E's dVAE / VQ-VAE): images in [0, 1] -> token grid [B, H/f, W/f] -> images.

    Forward (training): ``{"recon": [B, 3, H, W] (unclamped), "tokens": [B, h, w] int64, "kl": 0-d,
    "commitment": 0-d}``; weight the terms in the config (both keys are always there; the other quantizer's
    term is 0)::

        injectors:
          dvae: {type: generator, network: dvae, in: hq, out: {recon: recon, kl: kl, commitment: commitment}}
        losses:
          pix: {type: pix, criterion: l1, real: hq, fake: recon}
          commitment: {type: direct, key: commitment, weight: 0.25}            # vq
          kl: {type: direct, key: kl, weight: {schedule: cosine, from: 0, to: 0.001, start: 0, end: 5000}}  # gumbel

    Public methods: ``encode(images) -> tokens`` [B, h, w] int64 (the argmax/nearest code, deterministic),
    ``decode(tokens) -> images`` [B, 3, h*f, w*f] in [0, 1], ``reconstruct(images)`` (both, for the
    ``reconstruct`` task and the ``reconstruction`` evaluator), ``token_grid(height, width)``. Attributes:
    ``codebook_size``, ``downsample`` (= ``size_multiple``). Inputs must be a multiple of ``downsample`` in
    height and width (the reconstruct task pads them).

    Logged (``debug_info``, at print time): ``codebook_usage``, the fraction of codes picked in the last
    ``usage_window`` training forwards; ``perplexity``, the effective number of codes in use over that
    window; ``code_frequency`` (a histogram); ``temperature`` for Gumbel. A usage far below 1 is codebook
    collapse, the most reported failure of these models: for VQ raise ``dead_code_threshold`` (rarely used
    codes are restarted sooner), for Gumbel raise the KL weight.

    Options:
      codebook_size: number of codes K (DALL-E: 8192; 256-1024 for small data).
      downsample: the side reduction f, a power of two from 2 to 32 (DALL-E: 8); the token grid is H/f x W/f.
      width: channels of the first level; level i has ``width * channel_mult[i]``.
      channel_mult: one multiplier per level, log2(downsample) + 1 of them (default 1, 2, 2, 4, 4, 4, ...).
      res_blocks: residual blocks per level, in the encoder and the decoder alike.
      norm: ``none`` (default), ``group`` (GroupNorm, up to 32 groups) or ``batch``.
      codebook_dim: size of a code vector (the decoder's input channels).
      quantizer: ``gumbel`` (DALL-E) or ``vq`` (EMA codebook, default: works out of the box on small data).
      temperature, temperature_end, temperature_steps, temperature_schedule: the Gumbel temperature, annealed
        from ``temperature`` at iteration 0 to ``temperature_end`` at ``temperature_steps`` (DALL-E: 1 to 1/16
        over 150000 updates) by ``cosine``, ``linear`` or ``exponential``; a function of the iteration only.
      hard: Gumbel straight-through: decode one-hot samples, back-propagate through the soft ones.
      decay, eps: the VQ codebook's EMA decay (0.99) and Laplace smoothing.
      dead_code_threshold: VQ codes averaging fewer EMA assignments per training forward than this are
        restarted from random encoder outputs of the current batch (0: never). Compare it with the average,
        batch positions / codebook_size (32 images of 8x8 tokens over 512 codes: 4).
      usage_window: training forwards over which codebook usage and perplexity are measured.
    """

    inference_task = "reconstruct"

    def __init__(self, codebook_size: int = 512, downsample: int = 4, width: int = 64,
                 channel_mult: list[int] | None = None, res_blocks: int = 1, norm: Norm = "none",
                 codebook_dim: int = 64, quantizer: Literal["gumbel", "vq"] = "vq", temperature: float = 1.0,
                 temperature_end: float = 1 / 16, temperature_steps: int = 150000,
                 temperature_schedule: TemperatureSchedule = "cosine", hard: bool = False, decay: float = 0.99,
                 eps: float = 1e-5, dead_code_threshold: float = 1.0, usage_window: int = 100):
        super().__init__()
        levels = downsample.bit_length() - 1
        if downsample < 2 or downsample > 32 or downsample != 2**levels:
            raise ConfigError(f"must be a power of two from 2 to 32, got {downsample}", "downsample")
        if codebook_size < 2:
            raise ConfigError(f"must be at least 2, got {codebook_size}", "codebook_size")
        mult = list(channel_mult) if channel_mult is not None else [1, 2, 2, 4, 4, 4][:levels + 1]
        if len(mult) != levels + 1 or min(mult) < 1:
            raise ConfigError(f"needs {levels + 1} positive multipliers for downsample {downsample} (one per level), "
                              f"got {channel_mult}", "channel_mult")
        for option, value in (("width", width), ("codebook_dim", codebook_dim), ("usage_window", usage_window)):
            if value < 1:
                raise ConfigError(f"must be at least 1, got {value}", option)
        if res_blocks < 0:
            raise ConfigError(f"must be >= 0, got {res_blocks}", "res_blocks")
        if not 0 < temperature_end <= temperature:
            raise ConfigError(f"must be in (0, temperature={temperature}], got {temperature_end}", "temperature_end")
        if not 0 < decay < 1:
            raise ConfigError(f"must be between 0 and 1, got {decay}", "decay")
        if dead_code_threshold < 0:
            raise ConfigError(f"must be >= 0 (0: no restarts), got {dead_code_threshold}", "dead_code_threshold")
        self.codebook_size = codebook_size
        self.downsample = downsample
        self.size_multiple = downsample
        self.quantizer_kind = quantizer
        self.temperature_schedule = (temperature, temperature_end, temperature_steps, temperature_schedule)
        if quantizer == "gumbel":
            self.quantizer: nn.Module = GumbelQuantizer(codebook_size, codebook_dim, hard)
        else:
            self.quantizer = EMAVectorQuantizer(codebook_size, codebook_dim, decay, eps, dead_code_threshold)
        widths = [width * m for m in mult]
        self.encoder = Encoder(widths, res_blocks, norm, self.quantizer.input_channels)
        self.decoder = Decoder(widths, res_blocks, norm, codebook_dim)
        self.usage = CodeUsage(codebook_size, usage_window)
        self.set_step(0)

    # ------------------------------------------------------------------ trainer protocol
    def set_step(self, iteration: int) -> None:
        """Anneal the Gumbel temperature to its value at ``iteration`` (a pure function of it)."""
        if self.quantizer_kind == "gumbel":
            self.quantizer.temperature = temperature_at(iteration, *self.temperature_schedule)

    def debug_info(self) -> dict[str, torch.Tensor | float]:
        info: dict[str, torch.Tensor | float] = {"codebook_usage": self.usage.usage(),
                                                  "perplexity": self.usage.perplexity(),
                                                  "code_frequency": self.usage.frequency.clone()}
        if self.quantizer_kind == "gumbel":
            info["temperature"] = self.quantizer.temperature
        return info

    def checkpoint_modules(self) -> list[nn.Module]:
        """Every residual block (most of the activations)."""
        return [m for m in self.modules() if isinstance(m, ResBlock)]

    # ------------------------------------------------------------------ the model
    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (h, w) of an image of ``height`` x ``width`` pixels."""
        return height // self.downsample, width // self.downsample

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise DataError(f"dvae expects images of shape [B, 3, H, W], got {tuple(images.shape)}", "images")
        height, width = images.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise DataError(f"dvae with downsample {self.downsample} needs height and width divisible by "
                            f"{self.downsample}, got {height}x{width} (crop or pad the images)", "images")

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_images(images)
        z = self.encoder(images * 2 - 1)
        quantized = self.quantizer(z)
        if updates_state(self, z):
            self.usage.update(quantized.tokens)
        recon = self.decoder(quantized.decoder_input) * 0.5 + 0.5
        return {"recon": recon, "tokens": quantized.tokens, "kl": quantized.kl, "commitment": quantized.commitment}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> tokens [B, H/f, W/f] int64 in [0, codebook_size)."""
        self._check_images(images)
        return self.quantizer.encode(self.encoder(images * 2 - 1))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, h, w] (any integer type) -> images [B, 3, h*f, w*f] in [0, 1]."""
        if tokens.dim() != 3:
            raise DataError(f"dvae.decode expects tokens of shape [B, h, w], got {tuple(tokens.shape)}", "tokens")
        images = self.decoder(self.quantizer.lookup(tokens.long())) * 0.5 + 0.5
        return images.clamp(0, 1)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """``decode(encode(images))``: what the transformer's tokens can show of an image."""
        return self.decode(self.encode(images))

