"""switched_vae: a convolutional VAE whose body convolutions are switched (or plain, with ``num_experts: 1``)."""
from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError
from dlas.models.switched.conv import SwitchedConv
from dlas.models.switched.network import SwitchedNetwork, TemperatureSchedule, balance_loss, keep_pending_per_rank
from dlas.registry import NETWORKS

# log-variance clamp of the posterior: exp(-30..20) covers any sensible scale and keeps exp() finite in fp16/bf16
LOGVAR_RANGE = (-30.0, 20.0)

ConvFactory = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride) -> a 3x3 conv


class ResBlock(nn.Module):
    """``skip(x) + conv2(silu(conv1(silu(x))))``; a 1x1 plain skip where the width changes."""

    def __init__(self, in_channels: int, out_channels: int, conv: ConvFactory):
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, 1)
        self.conv2 = conv(out_channels, out_channels, 1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv2(F.silu(self.conv1(F.silu(x))))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv (no checkerboard artefacts, unlike a transposed conv)."""

    def __init__(self, channels: int, conv: ConvFactory):
        super().__init__()
        self.conv = conv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


@NETWORKS.register("switched_vae")
class SwitchedVAE(SwitchedNetwork, nn.Module):
    """A convolutional VAE (or plain autoencoder) whose encoder and decoder convolutions are switched.

    Encoder: a 3x3 conv to ``nf`` channels, then per level ``blocks`` residual blocks at ``nf * channel_mult[i]``
    channels and (except after the last) a stride-2 3x3 conv; a 3x3 conv to the posterior's mean and log-variance
    (``latent_channels`` each). Decoder: the mirror image, with nearest x2 upsampling + 3x3 conv. Activations are
    SiLU, there are no normalisation layers. The four convolutions that touch pixels or the latent (in and out of
    the encoder and the decoder) and the 1x1 skips stay plain; every other conv (2 per residual block, the down- and
    upsampling convs) is a :class:`SwitchedConv` with ``num_experts`` experts, or a plain ``nn.Conv2d`` when
    ``num_experts`` is 1: the plain twin, whose trained weights load into the switched network unchanged in
    function (``path.pretrain_model_NET``: each expert starts as a copy of the plain conv).

    ``forward(images)`` returns ``{"recon", "kl", "balance", "mean"}``: the reconstruction (unclamped, images in
    [0, 1]); the KL divergence from N(0, 1) per latent element, in nats (0 when ``variational`` is false); the
    mean auxiliary balance term of the switched layers (1 for uniform routing, up to K for collapse; 0 without
    switched layers); and the posterior mean. Training samples the latent; evaluation decodes the mean.
    ``reconstruct(images)`` (the ``reconstruct`` task, dlas-test's default) decodes the mean; inputs whose sides
    are not a multiple of ``2 ** (len(channel_mult) - 1)`` are padded by the task.

    Options:
      in_nc: image channels. nf: channels of the first level. channel_mult: per level, the width as a multiple of
        nf; the image is downsampled 2x between levels. blocks: residual blocks per level.
      latent_channels: channels of the latent, at 1 / 2**(levels - 1) of the image size.
      variational: false makes it a plain autoencoder (the latent is the mean; kl is 0).
      num_experts: experts per switched conv (1: plain convs).
      mode: ``hard`` (top-1 routing, about one conv's compute) or ``soft`` (probability-weighted mixture of all
        experts' outputs: num_experts times the compute).
      selector_hidden: 0: each selector is a 1x1 conv of the layer's input; > 0: 3x3 conv to that many channels,
        SiLU, 1x1 conv.
      temperature_start, temperature_end, temperature_steps: the selectors' softmax temperature, linear from start
        to end over the first temperature_steps iterations (a function of the iteration: exact on resume). In hard
        mode the temperature changes the balancing and the selector's gradient, not which expert wins.
      usage_history: iterations of per-expert usage the rolling balancing averages over (0: no balancing; the
        auxiliary loss on ``balance`` is the alternative).
      dropout: probability of dropping each expert for a whole sample during training (at least one stays).
      route_gradient: ``log_prob`` (the original work's) or ``straight_through``; see ``SwitchedConv``.
      implementation: ``fast`` (per-expert grouped matmuls) or ``reference`` (all experts computed, then picked).
    """

    inference_task = "reconstruct"

    def __init__(self, in_nc: int = 3, nf: int = 32, channel_mult: list[int] = (1, 2, 2), blocks: int = 1,
                 latent_channels: int = 4, variational: bool = True, num_experts: int = 8,
                 mode: Literal["hard", "soft"] = "hard", selector_hidden: int = 0, temperature_start: float = 1.0,
                 temperature_end: float = 1.0, temperature_steps: int = 0, usage_history: int = 128,
                 dropout: float = 0.0, route_gradient: Literal["log_prob", "straight_through"] = "log_prob",
                 implementation: Literal["fast", "reference"] = "fast"):
        super().__init__()
        for option, value in (("in_nc", in_nc), ("nf", nf), ("blocks", blocks), ("latent_channels", latent_channels),
                              ("num_experts", num_experts)):
            if value < 1:
                raise ConfigError(f"must be a positive integer, got {value}", option)
        if not channel_mult or min(channel_mult) < 1:
            raise ConfigError(f"must be a non-empty list of positive integers, got {list(channel_mult)}",
                              "channel_mult")
        self.temperature_schedule = TemperatureSchedule(temperature_start, temperature_end, temperature_steps)
        self.variational = variational
        self.size_multiple = 2 ** (len(channel_mult) - 1)

        def conv(cin: int, cout: int, stride: int) -> nn.Module:
            if num_experts == 1:
                return nn.Conv2d(cin, cout, 3, stride, 1)
            return SwitchedConv(cin, cout, 3, num_experts, stride=stride, padding=1, mode=mode,
                                selector_hidden=selector_hidden, temperature=temperature_start,
                                usage_history=usage_history, dropout=dropout, route_gradient=route_gradient,
                                implementation=implementation)

        widths = [nf * m for m in channel_mult]
        self.encoder_in = nn.Conv2d(in_nc, widths[0], 3, 1, 1)
        encoder: list[nn.Module] = []
        channels = widths[0]
        for level, width in enumerate(widths):
            for _ in range(blocks):
                encoder.append(ResBlock(channels, width, conv))
                channels = width
            if level < len(widths) - 1:
                encoder.append(conv(channels, channels, 2))
        self.encoder = nn.Sequential(*encoder)
        self.encoder_out = nn.Conv2d(channels, latent_channels * (2 if variational else 1), 3, 1, 1)

        self.decoder_in = nn.Conv2d(latent_channels, channels, 3, 1, 1)
        decoder: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(blocks):
                decoder.append(ResBlock(channels, widths[level], conv))
                channels = widths[level]
            if level > 0:
                decoder.append(Upsample(channels, conv))
        self.decoder = nn.Sequential(*decoder)
        self.decoder_out = nn.Conv2d(channels, in_nc, 3, 1, 1)
        keep_pending_per_rank(self)

    def _check_input(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.encoder_in.in_channels:
            raise ValueError(f"switched_vae expects NCHW images with {self.encoder_in.in_channels} channels, got "
                             f"shape {tuple(images.shape)}")
        if images.shape[2] % self.size_multiple or images.shape[3] % self.size_multiple:
            raise ValueError(f"switched_vae needs image sides divisible by {self.size_multiple}, got "
                             f"{tuple(images.shape[2:])} (crop, or use the reconstruct task, which pads)")

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The posterior's mean and log-variance (None for a plain autoencoder)."""
        self._check_input(images)
        h = self.encoder_out(F.silu(self.encoder(self.encoder_in(images))))
        if not self.variational:
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder_out(F.silu(self.decoder(self.decoder_in(latent))))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        mean, logvar = self.encode(images)
        if logvar is None:
            latent, kl = mean, mean.new_zeros(())
        else:
            kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1 - logvar.float()).mean()
            latent = mean + (0.5 * logvar).exp() * torch.randn_like(mean) if self.training else mean
        recon = self.decode(latent)
        return {"recon": recon, "kl": kl, "balance": balance_loss(self), "mean": mean}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean (deterministic)."""
        return self.decode(self.encode(images)[0])

    def checkpoint_modules(self) -> list[nn.Module]:
        """The residual blocks and resampling convs, for activation checkpointing."""
        return [*self.encoder, *self.decoder]
