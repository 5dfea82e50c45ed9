"""SRFlow (Lugmayr et al., ECCV 2020): a conditional normalizing flow that learns p(HR | LR).

An RRDB encoder turns the LR image into feature maps; a multi-scale Glow-style flow, conditioned on them,
maps the HR image bijectively to Gaussian latents. Training minimises the exact negative log-likelihood;
sampling runs the flow backwards from latents drawn at a temperature (0 gives the "mean" SR image).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError, DataError
from dlas.models.sr.rrdbnet import RRDBNet
from dlas.models.srflow.layers import FlowStep, Split, Squeeze, autocast_off, standard_normal_logp
from dlas.registry import NETWORKS

log = logging.getLogger(__name__)


def _full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for the flow. Its log-determinants, 1x1-conv inverses and couplings need float32: with bf16
    coupling networks the reverse pass misses the input by up to a grey level. The encoder keeps autocast."""
    return autocast_off(x.device.type)


class NonFiniteError(FloatingPointError):
    """The reverse (sampling) pass produced NaN or Inf; the message names the layer where it first happened."""


class FlowLevel(nn.Module):
    """One resolution of the flow: squeeze, transition steps, K conditional steps, then (optionally) a split."""

    def __init__(self, channels: int, cond_channels: int, K: int, transition_steps: int, hidden_channels: int,
                 lu_decomposed: bool, split: bool, split_cond_channels: int):
        super().__init__()
        self.squeeze = Squeeze()
        channels *= 4
        self.transitions = nn.ModuleList(
            FlowStep(channels, 0, hidden_channels, lu_decomposed) for _ in range(transition_steps))
        self.steps = nn.ModuleList(
            FlowStep(channels, cond_channels, hidden_channels, lu_decomposed) for _ in range(K))
        self.split = Split(channels, split_cond_channels) if split else None
        self.channels = channels
        # Channels that continue to the next level, and channels that leave the flow here as a latent.
        self.channels_pass = self.split.channels_pass if split else channels
        self.latent_channels = self.split.channels_out if split else channels

    def blocks(self) -> list[nn.Module]:
        """The level's modules in forward order, flow steps whole (the units of activation checkpointing)."""
        return [self.squeeze, *self.transitions, *self.steps] + ([self.split] if self.split is not None else [])

    def named_layers(self) -> list[tuple[str, nn.Module]]:
        """Every invertible layer in forward order, named for error messages (``step 3/16 coupling``)."""
        layers: list[tuple[str, nn.Module]] = [("squeeze", self.squeeze)]
        for kind, steps in (("transition", self.transitions), ("step", self.steps)):
            for k, step in enumerate(steps):
                layers += [(f"{kind} {k + 1}/{len(steps)} {name}", layer) for name, layer in step.sublayers()]
        if self.split is not None:
            layers.append(("split", self.split))
        return layers


@NETWORKS.register("srflow")
class SRFlow(nn.Module):
    """SRFlow: normalizing-flow super-resolution, trained by negative log-likelihood only.

    Architecture (published x4 model: nf 64, nb 23, K 16, L 3, hidden 64, 2 transition steps; 37.6M parameters
    here, 16.7M of them the encoder):
    an ``rrdbnet`` encoder of the LR image; its outputs of blocks ``encoder_blocks`` are stacked and, resized, joined
    to each level's feature map (``fea_up2``, ``fea_up1``, then the LR features halved, … for levels 1..L at x4),
    giving ``nf * (len(encoder_blocks) + 1)`` conditioning channels. The flow has L levels, each a squeeze, 2
    transition steps (actnorm + 1x1 conv), K steps (actnorm, 1x1 conv, conditional affine injector, conditional
    affine coupling), and a split that moves half of the channels out under a learned prior (every level but the
    last). Image size is taken from the input: HR height and width must be divisible by 2**L (160 in the recipe).
    Under ``precision: bf16`` or ``fp16`` only the encoder runs in reduced precision; the flow always runs in
    float32 (in bf16 its reverse pass would miss the input by up to a grey level).

    Calling it (the ``generator`` injector):
      ``forward(hq, lq)`` -> ``{"nll": [B], "nll_srflow": [B], "z": final latent, "logdet": [B]}``.
        ``nll`` is the loss: bits per dimension (normalised by C·H·W, with the discretisation term of uniform
        dequantisation noise of width 1/``quant``; log2(quant) = 8 bits/dim is a model that has learned nothing
        beyond the value range). ``nll_srflow`` is the SRFlow code's convention for comparing with its logs:
        normalised by H·W only and with the dequantisation term counted per pixel, i.e.
        ``C·(nll - log2 quant) + log2 quant``. Use ``out: {nll: nll}`` and a ``direct`` loss on ``nll``.
      ``forward(lq=lq, temperature=0.9)`` (no ``hq``) -> ``{"sample": SR image in [0, 1]}``, without gradients;
        ``net(lq)`` (one positional image, as SR networks are called) -> that sample tensor, at 0.9.
      ``sample(lq, temperature)`` is the same for scripts (``dlas-test --temperature``); ``encode``/``reverse``
      give the full latents.

    Options:
      in_nc: image channels (3).
      nf, nb, gc: the encoder's trunk width, RRDB blocks and growth channels (64, 23, 32 as ESRGAN).
      scale: SR factor: 2, 4 or 8 (L = 3 at x4 and L = 4 at x8 in the paper).
      K: conditional flow steps per level (16 published; 2 is enough for tests).
      L: levels; each halves the resolution. HR sizes must be multiples of 2**L.
      hidden_channels: width of the small conv nets inside injectors and couplings (64).
      transition_steps: unconditional actnorm + 1x1 conv steps opening each level (2).
      encoder_blocks: 0-based RRDB blocks whose outputs condition the flow ([1, 8, 15, 22] for nb 23); every id
        must be < nb.
      lu_decomposed: LU-parametrised 1x1 convolutions (cheaper log-det, never singular); SRFlow used plain ones.
      conditional_split_prior: condition the split priors on the encoder features too (the paper's do not).
      quant: dequantisation noise U(-0.5, 0.5)/quant is added to HR images in [0, 1]; 256 for 8-bit data
        (SRFlow's own configs used 32: coarser noise, and NLL numbers not comparable with 256).
      pretrained_encoder: RRDB generator weights (e.g. from ``options/esrgan_psnr_x4.yml``; BasicSR/ESRGAN files
        work) to start the encoder from. Without it the encoder starts from scratch (a warning is logged).
      train_encoder_after: the encoder is frozen (run under no_grad: no gradients, less memory) for the first N
        training steps and trained afterwards; 0 trains it from the start, null never. The published recipe froze
        it for half of training. Applied by ``set_step``, which the trainer calls every iteration.
      reverse_clamp: when set (e.g. 1e3), activations of the reverse pass are clamped to [-c, c] after every layer
        and NaNs zeroed, instead of raising ``NonFiniteError``: SRFlow can diverge when sampling LR images or
        latents far from its training data (black spots; SRFlow issues #2, #22).
    """

    def __init__(self, in_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32, scale: int = 4, K: int = 16,
                 L: int = 3, hidden_channels: int = 64, transition_steps: int = 2,
                 encoder_blocks: list[int] = (1, 8, 15, 22), lu_decomposed: bool = False,
                 conditional_split_prior: bool = False, quant: int = 256, pretrained_encoder: Optional[str] = None,
                 train_encoder_after: Optional[int] = 0, reverse_clamp: Optional[float] = None):
        super().__init__()
        if scale not in (2, 4, 8):
            raise ConfigError(f"srflow supports scale 2, 4 or 8, got {scale}", "scale")
        for name, value, minimum in (("K", K, 1), ("L", L, 1), ("hidden_channels", hidden_channels, 1),
                                     ("transition_steps", transition_steps, 0), ("quant", quant, 1),
                                     ("nb", nb, 1), ("nf", nf, 1), ("in_nc", in_nc, 1)):
            if value < minimum:
                raise ConfigError(f"srflow {name} must be >= {minimum}, got {value}", name)
        bad = [b for b in encoder_blocks if not 0 <= b < nb]
        if bad:
            raise ConfigError(f"encoder block ids {bad} do not exist in an encoder of nb={nb} blocks; use ids "
                              f"0..{nb - 1} (e.g. [1, 8, 15, 22] for nb 23)", "encoder_blocks")
        if train_encoder_after is not None and train_encoder_after < 0:
            raise ConfigError(f"train_encoder_after must be a step count >= 0 or null, got {train_encoder_after}",
                              "train_encoder_after")
        if reverse_clamp is not None and reverse_clamp <= 0:
            raise ConfigError(f"reverse_clamp must be positive, got {reverse_clamp}", "reverse_clamp")
        self.in_nc, self.scale, self.L, self.quant = in_nc, scale, L, quant
        self.encoder_blocks = list(encoder_blocks)
        self.train_encoder_after = train_encoder_after
        self.reverse_clamp = reverse_clamp

        self.encoder = RRDBNet(in_nc, in_nc, nf=nf, nb=nb, gc=gc, scale=scale)
        if pretrained_encoder:
            from dlas.weights import load_network_weights

            load_network_weights(self.encoder, pretrained_encoder)
            log.info("srflow: encoder weights loaded from %s", pretrained_encoder)
        else:
            log.warning("srflow: no pretrained_encoder given, so the RRDB encoder starts from scratch; the published "
                        "recipe first trains it with an L1 loss (options/esrgan_psnr_x4.yml) and converges faster")

        cond_channels = nf * (len(self.encoder_blocks) + 1)
        levels, channels = [], in_nc
        for level in range(L):
            levels.append(FlowLevel(channels, cond_channels, K, transition_steps, hidden_channels, lu_decomposed,
                                    split=level < L - 1,
                                    split_cond_channels=cond_channels if conditional_split_prior else 0))
            channels = levels[-1].channels_pass
        self.levels = nn.ModuleList(levels)
        self.set_step(1)
        self._last_stats: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ trainer protocol
    def set_step(self, step: int) -> None:
        """Freeze or unfreeze the encoder for training step ``step`` (1-based) per ``train_encoder_after``."""
        # Freezing runs the encoder under no_grad rather than flipping requires_grad: DDP fixes the set of
        # parameters it synchronises when it wraps the network, so a thawed encoder would never be all-reduced.
        # Its gradients stay None, and optimizers skip such parameters.
        after = self.train_encoder_after
        self.encoder_trainable = after is not None and step > after

    def checkpoint_modules(self) -> list[nn.Module]:
        """The encoder's RRDB blocks and every conditional flow step: what ``checkpointing: true`` recomputes in
        the backward pass instead of storing (the flow steps hold most of the activations at 160x160)."""
        return [*self.encoder.checkpoint_modules(), *(step for level in self.levels for step in level.steps)]

    def debug_info(self) -> dict[str, torch.Tensor]:
        """The last training batch's NLL split into its flow log-det and prior terms (bits/dim), and its NLL in the
        SRFlow paper's convention (``nll_srflow``)."""
        return dict(self._last_stats)

    # ------------------------------------------------------------------ shapes and conditioning
    def _check_sizes(self, lq: torch.Tensor, hq: Optional[torch.Tensor] = None) -> tuple[int, int]:
        if lq.dim() != 4 or lq.shape[1] != self.in_nc:
            raise DataError(f"srflow expects lq of shape [B, {self.in_nc}, h, w], got {tuple(lq.shape)}", "lq")
        height, width = lq.shape[2] * self.scale, lq.shape[3] * self.scale
        if hq is not None and tuple(hq.shape) != (lq.shape[0], self.in_nc, height, width):
            raise DataError(f"hq must be lq x{self.scale} with {self.in_nc} channels: expected "
                            f"{(lq.shape[0], self.in_nc, height, width)}, got {tuple(hq.shape)}", "hq")
        multiple = 2**self.L
        if height % multiple or width % multiple:
            raise DataError(f"srflow with L={self.L} needs HR height and width divisible by {multiple}, got "
                            f"{height}x{width}; crop the images (e.g. target_size: 160) or use sample(), which pads",
                            "hq")
        return height, width

    def latent_shapes(self, lq: torch.Tensor) -> list[tuple[int, ...]]:
        """Shapes of the latents for ``lq``: one per split level, then the final one."""
        height, width = self._check_sizes(lq)
        shapes = []
        for i, level in enumerate(self.levels):
            size = (height >> (i + 1), width >> (i + 1))
            shapes.append((lq.shape[0], level.latent_channels, *size))
        return shapes

    def conditions(self, lq: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features for every level: that resolution's feature map joined with the stacked block outputs."""
        height, width = self._check_sizes(lq)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trainable):
            features = self.encoder.forward_features(lq, self.encoder_blocks)
        lr_features = features["last_lr_fea"]
        stacked = torch.cat([features[f"block_{b}"] for b in self.encoder_blocks], dim=1) \
            if self.encoder_blocks else None
        conditions = []
        for i in range(self.L):
            size = (height >> (i + 1), width >> (i + 1))
            ratio = size[0] // lr_features.shape[2]
            tapped = features.get(f"fea_up{ratio}")
            if tapped is None or tuple(tapped.shape[2:]) != size:
                # Levels below the encoder's LR resolution (fea_up0 in SRFlow) use the LR features, bilinearly resized.
                tapped = F.interpolate(lr_features, size=size, mode="bilinear", align_corners=False)
            if stacked is not None:
                tapped = torch.cat([tapped, F.interpolate(stacked, size=size, mode="nearest")], dim=1)
            conditions.append(tapped)
        return conditions

    # ------------------------------------------------------------------ the two directions
    def encode(self, hq: torch.Tensor, lq: torch.Tensor, dequantize: bool = True,
               generator: Optional[torch.Generator] = None,
               ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """HR -> latents. Returns ``(latents, logdet, nll_bits_per_dim, nll_srflow)``, the last three per sample.

        ``dequantize`` adds U(-0.5, 0.5)/quant noise first (always on for training; the likelihood of exact 8-bit
        values is degenerate without it), drawn from ``generator`` when given. ``latents`` are the split latents
        of levels 1..L-1, then the final one.
        """
        self._check_sizes(lq, hq)
        if dequantize:
            noise = torch.rand(hq.shape, generator=generator, device=hq.device, dtype=hq.dtype)
            x = hq + (noise - 0.5) / self.quant
        else:
            x = hq
        logdet = hq.new_zeros(hq.shape[0])
        latents = []
        conditions = self.conditions(lq)
        with _full_precision(x):
            for level, cond in zip(self.levels, conditions):
                for block in level.blocks():
                    x, logdet = block(x, cond.to(x.dtype), logdet)
                if level.split is not None:
                    latents.append(x[:, level.channels_pass:])
                    x = x[:, :level.channels_pass]
        latents.append(x)
        log_prior = sum(standard_normal_logp(z) for z in latents)
        channels, height, width = hq.shape[1:]
        # log P(8-bit image) = log p(dequantised) + C·H·W·log(1/quant): the density integrated over one bin.
        discretisation = math.log(self.quant)
        nll_nats = -(logdet + log_prior)
        nll = (nll_nats + discretisation * channels * height * width) / (math.log(2) * channels * height * width)
        nll_srflow = (nll_nats + discretisation * height * width) / (math.log(2) * height * width)
        if self.training:
            dims = math.log(2) * channels * height * width
            self._last_stats = {"logdet_bits_per_dim": (-logdet / dims).mean().detach(),
                                "prior_bits_per_dim": (-log_prior / dims).mean().detach(),
                                "nll_srflow": nll_srflow.mean().detach()}
        return latents, logdet, nll, nll_srflow

    def reverse(self, lq: torch.Tensor, latents: list[torch.Tensor]) -> torch.Tensor:
        """Latents (as ``encode`` returns them) -> HR image, not clamped. Keeps gradients if they are enabled.

        After every layer the activations are checked: NaN/Inf raises :class:`NonFiniteError` naming the level,
        step and layer where it first appeared, unless ``reverse_clamp`` is set, which clamps them instead. The
        checks are read once, at the end of the pass (one host sync instead of one per layer).
        """
        if len(latents) != self.L:
            raise ValueError(f"srflow reverse needs {self.L} latents (one per level), got {len(latents)}")
        conditions = self.conditions(lq)
        x = latents[-1]
        finite: list[torch.Tensor] = []
        where: list[str] = []
        with _full_precision(x):
            for i in reversed(range(self.L)):
                level, cond = self.levels[i], conditions[i].to(x.dtype)
                if level.split is not None:
                    x = torch.cat([x, latents[i].to(x.dtype)], dim=1)
                for name, layer in reversed(level.named_layers()):
                    x = layer.reverse(x, cond)
                    if self.reverse_clamp is not None:
                        c = self.reverse_clamp
                        x = torch.nan_to_num(x, nan=0.0, posinf=c, neginf=-c).clamp(-c, c)
                    else:
                        finite.append(torch.isfinite(x).all())
                        where.append(f"level {i + 1}/{self.L}, {name}")
        if finite:
            flags = torch.stack(finite)
            if not bool(flags.all()):
                first = int((~flags).nonzero()[0, 0])
                raise NonFiniteError(f"srflow reverse pass produced NaN/Inf at {where[first]}; the LR image or "
                                     "latents are probably far from the training data: lower the temperature or set "
                                     "reverse_clamp (e.g. 1000) to clamp instead")
        return x

    @torch.no_grad()
    def sample(self, lq: torch.Tensor, temperature: float = 0.9,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """An SR image in [0, 1] for ``lq``, with latents ~ N(0, temperature²) (0: the deterministic "mean" image).

        LR images whose HR size is not a multiple of 2**L are reflect-padded and the result cropped back.
        """
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}", "temperature")
        height, width = lq.shape[2] * self.scale, lq.shape[3] * self.scale
        # The smallest LR step whose HR size is a multiple of 2**L (1 LR pixel at x4 with L=2, 2 with L=3).
        step = 2**self.L // math.gcd(2**self.L, self.scale)
        pad_h, pad_w = -lq.shape[2] % step, -lq.shape[3] % step
        padded = lq
        if pad_h or pad_w:
            mode = "reflect" if pad_h < lq.shape[2] and pad_w < lq.shape[3] else "replicate"
            padded = F.pad(lq, (0, pad_w, 0, pad_h), mode=mode)
        latents = [temperature * torch.randn(shape, generator=generator, device=lq.device, dtype=lq.dtype)
                   if temperature > 0 else lq.new_zeros(shape) for shape in self.latent_shapes(padded)]
        sr = self.reverse(padded, latents)
        return sr[:, :, :height, :width].clamp(0, 1)

    @torch.no_grad()
    def generate(self, count: int, generator: torch.Generator, image: torch.Tensor,
                 temperature: float = 0.9) -> torch.Tensor:
        """``count`` SR samples of the LR ``image`` (1 x C x H x W) at ``temperature``, drawn from ``generator``:
        the ``sample`` inference task (``dlas-test --task sample --input lr/ --n 8 --seed 0``)."""
        return torch.cat([self.sample(image, temperature, generator) for _ in range(count)])

    def forward(self, hq: Optional[torch.Tensor] = None, lq: Optional[torch.Tensor] = None,
                temperature: float = 0.9) -> dict[str, torch.Tensor] | torch.Tensor:
        """``(hq, lq)``: the NLL dict for training. ``lq=`` alone: ``{"sample": ...}`` at ``temperature``.

        A single positional image is an LR image, as every SR network is called (``net(lq)`` by ``dlas-test`` and
        the ``sr`` evaluator): it returns the sample tensor itself.
        """
        if lq is None:
            if hq is None:
                raise ValueError("srflow needs lq: forward(hq, lq) to train, forward(lq=lq) or net(lq) to sample")
            return self.sample(hq, temperature)
        if hq is None:
            return {"sample": self.sample(lq, temperature)}
        latents, logdet, nll, nll_srflow = self.encode(hq, lq)
        return {"nll": nll, "nll_srflow": nll_srflow, "z": latents[-1], "logdet": logdet}
