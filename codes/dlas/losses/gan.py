"""Adversarial losses: the generator's and the discriminator's side of a GAN, and gradient penalties.

Formulas, with r = D(real), f = D(fake) (logits) and BCE with logits:

| gan_type | generator loss                                       | discriminator loss                                 |
| -------- | ---------------------------------------------------- | -------------------------------------------------- |
| vanilla  | BCE(f, 1)                                            | BCE(r, 1) + BCE(f, 0)                              |
| lsgan    | mean((f - 1)^2)                                      | mean((r - 1)^2) + mean(f^2)                        |
| ragan    | [BCE(r' - mean f, 0) + BCE(f - mean r', 1)] / 2      | [BCE(r - mean f', 1) + BCE(f - mean r', 0)] / 2    |
| hinge    | -mean(f)                                             | mean(relu(1 - r)) + mean(relu(1 + f))              |
| wgan     | -mean(f)                                             | mean(f) - mean(r)                                  |

(x' = x detached.) RaGAN follows BasicSR's ESRGAN model; the relativistic mean is taken over the batch (and
over pixels for a per-pixel discriminator). With ``train.mega_batch_factor`` > 1 that batch is one micro-batch
(batch_size / mega_batch_factor images), so RaGAN's means get noisier as the factor grows; the other types do
not depend on it. Logits are converted to float32 before any of these formulas (bf16 autocast).
"""
from __future__ import annotations

from typing import Literal, Mapping, Optional

import torch
import torch.nn.functional as F

from dlas.context import Context
from dlas.errors import ConfigError
from dlas.losses.base import Loss
from dlas.registry import LOSSES

GanType = Literal["vanilla", "lsgan", "ragan", "hinge", "wgan"]
GpType = Literal["r1", "wgan_gp"]


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def generator_adversarial_loss(gan_type: str, d_fake: torch.Tensor, d_real: Optional[torch.Tensor] = None
                               ) -> torch.Tensor:
    """The generator's loss from D's logits on fakes (and on reals, needed by ``ragan`` only), in float32."""
    # Under bf16 autocast D's logits are bf16; differences and means of them in bf16 lose the third digit.
    d_fake = d_fake.float()
    d_real = None if d_real is None else d_real.float()
    if gan_type == "vanilla":
        return _bce(d_fake, 1.0)
    if gan_type == "lsgan":
        return ((d_fake - 1) ** 2).mean()
    if gan_type in ("hinge", "wgan"):
        return -d_fake.mean()
    if gan_type == "ragan":
        d_real = d_real.detach()
        return (_bce(d_real - d_fake.mean(), 0.0) + _bce(d_fake - d_real.mean(), 1.0)) / 2
    raise ValueError(f"unknown gan_type {gan_type!r}")


def discriminator_adversarial_loss(gan_type: str, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss from its logits on real and on (already detached) fake images, in float32."""
    d_real, d_fake = d_real.float(), d_fake.float()
    if gan_type == "vanilla":
        return _bce(d_real, 1.0) + _bce(d_fake, 0.0)
    if gan_type == "lsgan":
        return ((d_real - 1) ** 2).mean() + (d_fake**2).mean()
    if gan_type == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    if gan_type == "wgan":
        return d_fake.mean() - d_real.mean()
    if gan_type == "ragan":
        # Each term treats the other side's mean as a constant, as BasicSR's two separate backward passes do.
        return (_bce(d_real - d_fake.detach().mean(), 1.0) + _bce(d_fake - d_real.detach().mean(), 0.0)) / 2
    raise ValueError(f"unknown gan_type {gan_type!r}")


def gradient_penalty(discriminator: torch.nn.Module, real: torch.Tensor, fake: Optional[torch.Tensor],
                     gp_type: str) -> torch.Tensor:
    """R1: mean over samples of ||dD/dx||^2 at real x. WGAN-GP: mean of (||dD/dx|| - 1)^2 at random interpolates.

    The penalty is differentiable (``create_graph``) so it trains D. For StyleGAN-style R1 with gamma, use a
    weight of gamma/2.
    """
    if gp_type == "r1":
        points = real.detach().requires_grad_(True)
    elif gp_type == "wgan_gp":
        if fake is None:
            raise ValueError("wgan_gp needs fake images")
        alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
        points = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    else:
        raise ValueError(f"unknown gp_type {gp_type!r}")
    with torch.enable_grad():
        scores = discriminator(points)
        (grad,) = torch.autograd.grad(scores.sum(), points, create_graph=True)
    squared_norm = _squared_gradient_norm(grad)
    if gp_type == "r1":
        return squared_norm.mean()
    # The epsilon keeps the sqrt differentiable where a gradient vanishes exactly.
    return ((squared_norm + 1e-12).sqrt() - 1).pow(2).mean()


def _squared_gradient_norm(grad: torch.Tensor) -> torch.Tensor:
    return grad.float().flatten(1).pow(2).sum(1)


def r1_penalty_from_scores(scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 from D's scores on ``real``, which must require grad: spares ``gradient_penalty``'s own forward."""
    (grad,) = torch.autograd.grad(scores.sum(), real, create_graph=True)
    return _squared_gradient_norm(grad).mean()


def _with_noise(images: torch.Tensor, std: float) -> torch.Tensor:
    return images + torch.randn_like(images) * std if std > 0 else images


def _check_non_negative(**options: float) -> None:
    for name, value in options.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}", name)


@LOSSES.register("generator_gan")
class GeneratorGanLoss(Loss):
    """The generator's adversarial loss: make ``discriminator`` call ``fake`` real (see the table in gan.py).

    Options:
        discriminator: name of the discriminator network (under ``networks:``); it is not trained by this step.
        gan_type: ``vanilla`` (BCE; the DLAS recommendation), ``lsgan``, ``ragan`` (relativistic average, ESRGAN;
            also runs D on ``real``; its averages are over one micro-batch, so a large ``mega_batch_factor``
            makes them noisy), ``hinge`` or ``wgan``. Must match the discriminator_gan's.
        real, fake: state keys of the real and the generated images.
        noise: std of gaussian noise added to D's inputs (e.g. 0.004 ~ 1/255, so D cannot spot fakes by their
            lack of 8-bit quantisation). Use the same value as the discriminator_gan.
    """

    def __init__(self, discriminator: str = "discriminator", gan_type: GanType = "vanilla", real: str = "hq",
                 fake: str = "gen", noise: float = 0.0):
        super().__init__(reads=[fake, real] if gan_type == "ragan" else [fake], networks=[discriminator])
        _check_non_negative(noise=noise)
        self.discriminator, self.gan_type, self.real, self.fake, self.noise = discriminator, gan_type, real, fake, noise

    def forward(self, state: Mapping[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        net = ctx.networks[self.discriminator]
        d_fake = net(_with_noise(state[self.fake], self.noise))
        d_real = net(_with_noise(state[self.real], self.noise)) if self.gan_type == "ragan" else None
        return generator_adversarial_loss(self.gan_type, d_fake, d_real)


@LOSSES.register("discriminator_gan")
class DiscriminatorGanLoss(Loss):
    """The discriminator's loss: tell ``real`` from ``fake`` (``fake`` is detached: no gradient to the generator).

    Logs the mean logits as ``<discriminator>_real`` and ``<discriminator>_fake`` (their gap shows whether D
    is winning; a runaway gap is the "exploding" RaGAN discriminator that DLAS reports).

    Options:
        discriminator: name of the discriminator network (the one this step trains).
        gan_type: ``vanilla``, ``lsgan``, ``ragan``, ``hinge`` or ``wgan`` (table in gan.py).
        real, fake: state keys of the real and the generated images.
        noise: std of gaussian noise added to both inputs (e.g. 0.004 ~ 1/255).
        gradient_penalty: weight of a gradient penalty added to the loss (0: none; 10 is the usual WGAN-GP
            value; for R1 try 1-10 and halve it for StyleGAN's gamma convention).
        gp_type: ``r1`` (squared gradient norm at the real images, a zero-centred penalty for any gan_type) or
            ``wgan_gp`` ((||grad|| - 1)^2 at random interpolates of real and fake).
    """

    def __init__(self, discriminator: str = "discriminator", gan_type: GanType = "vanilla", real: str = "hq",
                 fake: str = "gen", noise: float = 0.0, gradient_penalty: float = 0.0, gp_type: GpType = "r1"):
        super().__init__(reads=[fake, real], networks=[discriminator])
        _check_non_negative(noise=noise, gradient_penalty=gradient_penalty)
        self.discriminator, self.gan_type, self.real, self.fake, self.noise = discriminator, gan_type, real, fake, noise
        self.gradient_penalty, self.gp_type = gradient_penalty, gp_type

    def forward(self, state: Mapping[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        net = ctx.networks[self.discriminator]
        real = _with_noise(state[self.real].detach(), self.noise)
        fake = _with_noise(state[self.fake].detach(), self.noise)
        # R1 is a gradient at the very reals D scores here: differentiate that forward instead of running a third.
        r1_from_this_forward = self.gradient_penalty > 0 and self.gp_type == "r1" and torch.is_grad_enabled()
        if r1_from_this_forward:
            real.requires_grad_(True)
        d_real, d_fake = net(real), net(fake)
        ctx.log(f"{self.discriminator}_real", d_real.detach().mean())
        ctx.log(f"{self.discriminator}_fake", d_fake.detach().mean())
        loss = discriminator_adversarial_loss(self.gan_type, d_real, d_fake)
        if self.gradient_penalty > 0:
            if r1_from_this_forward:
                penalty = r1_penalty_from_scores(d_real, real)
            else:
                penalty = gradient_penalty(net, real.detach(), fake, self.gp_type)
            ctx.log(f"{self.discriminator}_gradient_penalty", penalty.detach())
            loss = loss + self.gradient_penalty * penalty
        return loss


@LOSSES.register("gradient_penalty")
class GradientPenaltyLoss(Loss):
    """A gradient penalty on ``discriminator`` alone (to weight or gate it separately from the GAN loss).

    Options:
        discriminator: name of the discriminator network.
        real, fake: state keys (``fake`` is used by ``wgan_gp`` only).
        gp_type: ``r1`` (mean squared gradient norm at real images) or ``wgan_gp`` ((||grad|| - 1)^2 at random
            interpolates of real and fake); see discriminator_gan.
    """

    def __init__(self, discriminator: str = "discriminator", real: str = "hq", fake: str = "gen",
                 gp_type: GpType = "r1"):
        super().__init__(reads=[real, fake] if gp_type == "wgan_gp" else [real], networks=[discriminator])
        self.discriminator, self.real, self.fake, self.gp_type = discriminator, real, fake, gp_type

    def forward(self, state: Mapping[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        fake = state[self.fake] if self.gp_type == "wgan_gp" else None
        return gradient_penalty(ctx.networks[self.discriminator], state[self.real], fake, self.gp_type)
