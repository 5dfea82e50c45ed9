"""SR GAN discriminators: BasicSR's VGG-style classifier and Real-ESRGAN's per-pixel U-Net with spectral norm."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from dlas.errors import ConfigError
from dlas.registry import NETWORKS

# DLAS's GroupNorm discriminators used 8 groups: small enough that 64-channel layers keep 8 channels per group.
GROUP_NORM_GROUPS = 8


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(GROUP_NORM_GROUPS, channels, affine=True)
    return nn.Identity()


@NETWORKS.register("vgg_discriminator")
class VGGStyleDiscriminator(nn.Module):
    """A VGG-style image classifier (BasicSR ``VGGStyleDiscriminator``) giving one real/fake logit per image.

    Five (six at 256) stages of [3x3 conv, norm, LeakyReLU 0.2, 4x4 stride-2 conv, norm, LeakyReLU 0.2] (no norm
    after the very first conv) with nf, 2nf, 4nf, 8nf, 8nf channels take the input down to 4x4, then ``linear1``
    (8nf*16 -> 100) and ``linear2`` (100 -> 1). 14,499,401 parameters at nf=64, input_size=128 with batch or group norm. Key names follow BasicSR
    (``conv0_0``, ``conv0_1``, ``bn0_1``, ..., ``linear1``, ``linear2``; the norm layers keep the ``bn`` names
    whatever their kind).

    Options:
        in_nc: input channels.
        nf: features of the first stage (64).
        input_size: 128 or 256; the input must be exactly this size (random-crop HR patches to it).
        norm: ``batch`` (BasicSR/ESRGAN; its statistics are those of each call: real and fake images apart, one
            micro-batch at a time under ``mega_batch_factor``), ``group`` (GroupNorm with 8 groups: the DLAS
            recommendation, it keeps D's outputs from "exploding" and its outputs do not depend on the rest of the
            batch) or ``none`` (the convs then get biases instead).
    """

    def __init__(self, in_nc: int = 3, nf: int = 64, input_size: int = 128,
                 norm: Literal["none", "batch", "group"] = "batch"):
        super().__init__()
        if input_size not in (128, 256):
            raise ConfigError(f"vgg_discriminator supports input_size 128 or 256, got {input_size}", "input_size")
        if norm == "group" and nf % GROUP_NORM_GROUPS:
            raise ConfigError(f"norm: group needs nf divisible by {GROUP_NORM_GROUPS}, got {nf}", "nf")
        self.input_size = input_size
        self.in_nc = in_nc
        bias = norm == "none"  # a norm layer's shift makes a conv bias redundant
        widths = [nf, nf * 2, nf * 4, nf * 8, nf * 8] + ([nf * 8] if input_size == 256 else [])
        previous = in_nc
        for stage, width in enumerate(widths):
            if stage == 0:
                self.conv0_0 = nn.Conv2d(in_nc, width, 3, 1, 1, bias=True)
            else:
                setattr(self, f"conv{stage}_0", nn.Conv2d(previous, width, 3, 1, 1, bias=bias))
                setattr(self, f"bn{stage}_0", _norm(norm, width))
            setattr(self, f"conv{stage}_1", nn.Conv2d(width, width, 4, 2, 1, bias=bias))
            setattr(self, f"bn{stage}_1", _norm(norm, width))
            previous = width
        self.stages = len(widths)
        self.linear1 = nn.Linear(widths[-1] * 4 * 4, 100)
        self.linear2 = nn.Linear(100, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_nc or x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(
                f"vgg_discriminator expects (N, {self.in_nc}, {self.input_size}, {self.input_size}) input, got "
                f"{tuple(x.shape)}; crop the HR patches to input_size or change the discriminator's input_size"
            )
        fea = self.lrelu(self.conv0_0(x))
        fea = self.lrelu(self.bn0_1(self.conv0_1(fea)))
        for stage in range(1, self.stages):
            fea = self.lrelu(getattr(self, f"bn{stage}_0")(getattr(self, f"conv{stage}_0")(fea)))
            fea = self.lrelu(getattr(self, f"bn{stage}_1")(getattr(self, f"conv{stage}_1")(fea)))
        fea = self.lrelu(self.linear1(fea.flatten(1)))
        return self.linear2(fea)


@NETWORKS.register("unet_discriminator")
class UNetDiscriminatorSN(nn.Module):
    """Real-ESRGAN's U-Net discriminator with spectral norm: one real/fake logit per *pixel* (N, 1, H, W).

    Three stride-2 4x4 convs down (nf -> 2nf -> 4nf -> 8nf), three bilinear x2 + 3x3 conv stages up, with the
    encoder features added back (``skip_connection``), then two 3x3 convs and a 1-channel output conv. All but the
    first and last convs are spectrally normalised (which bounds D's Lipschitz constant, the stabiliser
    Real-ESRGAN relies on). 4.38M parameters at nf=64. Key names follow Real-ESRGAN (``conv0`` ... ``conv9``, with
    ``weight_orig``/``weight_u``/``weight_v``), so its ``*_netD.pth`` files load.

    Options:
        in_nc: input channels.
        nf: features of the first level (64).
        skip_connection: add encoder features to the decoder (True, as Real-ESRGAN).

    The input height and width must be multiples of 8.
    """

    def __init__(self, in_nc: int = 3, nf: int = 64, skip_connection: bool = True):
        super().__init__()
        self.skip_connection = skip_connection
        self.in_nc = in_nc
        self.conv0 = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.conv1 = spectral_norm(nn.Conv2d(nf, nf * 2, 4, 2, 1, bias=False))
        self.conv2 = spectral_norm(nn.Conv2d(nf * 2, nf * 4, 4, 2, 1, bias=False))
        self.conv3 = spectral_norm(nn.Conv2d(nf * 4, nf * 8, 4, 2, 1, bias=False))
        self.conv4 = spectral_norm(nn.Conv2d(nf * 8, nf * 4, 3, 1, 1, bias=False))
        self.conv5 = spectral_norm(nn.Conv2d(nf * 4, nf * 2, 3, 1, 1, bias=False))
        self.conv6 = spectral_norm(nn.Conv2d(nf * 2, nf, 3, 1, 1, bias=False))
        self.conv7 = spectral_norm(nn.Conv2d(nf, nf, 3, 1, 1, bias=False))
        self.conv8 = spectral_norm(nn.Conv2d(nf, nf, 3, 1, 1, bias=False))
        self.conv9 = nn.Conv2d(nf, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_nc or x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(f"unet_discriminator expects (N, {self.in_nc}, H, W) input with H and W multiples of 8, "
                             f"got {tuple(x.shape)}; crop the patches to a multiple of 8")
        x0 = F.leaky_relu(self.conv0(x), 0.2)
        x1 = F.leaky_relu(self.conv1(x0), 0.2)
        x2 = F.leaky_relu(self.conv2(x1), 0.2)
        x3 = F.leaky_relu(self.conv3(x2), 0.2)
        fea = x3
        for conv, skip in ((self.conv4, x2), (self.conv5, x1), (self.conv6, x0)):
            fea = F.interpolate(fea, scale_factor=2, mode="bilinear", align_corners=False)
            fea = F.leaky_relu(conv(fea), 0.2)
            if self.skip_connection:
                fea = fea + skip
        fea = F.leaky_relu(self.conv7(fea), 0.2)
        fea = F.leaky_relu(self.conv8(fea), 0.2)
        return self.conv9(fea)
