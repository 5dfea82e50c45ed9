"""SR GAN discriminators: BasicSR's VGG-style classifier and Real-ESRGAN's per-pixel U-Net with spectral norm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError
from dlas.models.ops.norm import (
    GROUP_NORM_GROUPS,
    NormKind,
    check_norm_channels,
    norm_layer,
    spectral_normed,
)
from dlas.registry import NETWORKS

__all__ = ["GROUP_NORM_GROUPS", "UNetDiscriminatorSN", "VGGStyleDiscriminator"]


@NETWORKS.register("vgg_discriminator")
class VGGStyleDiscriminator(nn.Module):
    """A VGG-style image classifier (BasicSR ``VGGStyleDiscriminator``) giving one real/fake logit per image.

    Five (six at 256) stages of [3x3 conv, norm, LeakyReLU 0.2, 4x4 stride-2 conv, norm, LeakyReLU 0.2] (no norm
    after the very first conv) with nf, 2nf, 4nf, 8nf, 8nf channels take the input down to 4x4, then ``linear1``
    (8nf*16 -> 100) and ``linear2`` (100 -> 1). 14,499,401 parameters at nf=64, input_size=128 with batch, group
    or instance norm. Key names follow BasicSR (``conv0_0``, ``conv0_1``, ``bn0_1``, ..., ``linear1``, ``linear2``;
    the norm layers keep the ``bn`` names whatever their kind).

    Options:
        in_nc: input channels.
        nf: features of the first stage (64).
        input_size: 128 or 256; the input must be exactly this size (random-crop HR patches to it).
        norm: ``batch`` (BasicSR/ESRGAN; its statistics are those of each call: real and fake images apart, one
            micro-batch at a time under ``mega_batch_factor``), ``group`` (GroupNorm with 8 groups: the DLAS
            recommendation, it keeps D's outputs from "exploding" and its outputs do not depend on the rest of the
            batch), ``instance`` (per image and channel; the last stage normalises 4x4 maps, so it is noisier) or
            ``none`` (the convs then get biases instead).
        spectral_norm: spectrally normalise every conv and linear layer (Miyato et al. 2018: bounds D's
            Lipschitz constant; often used with norm: none). Keys become ``convX_Y.weight_orig`` plus the
            ``weight_u``/``weight_v`` buffers; the parameter count is unchanged.
    """

    def __init__(self, in_nc: int = 3, nf: int = 64, input_size: int = 128, norm: NormKind = "batch",
                 spectral_norm: bool = False):
        super().__init__()
        if input_size not in (128, 256):
            raise ConfigError(f"vgg_discriminator supports input_size 128 or 256, got {input_size}", "input_size")
        check_norm_channels(norm, {"nf": nf})
        self.input_size = input_size
        self.in_nc = in_nc
        bias = norm == "none"  # a norm layer's shift makes a conv bias redundant
        widths = [nf, nf * 2, nf * 4, nf * 8, nf * 8] + ([nf * 8] if input_size == 256 else [])
        previous = in_nc
        for stage, width in enumerate(widths):
            if stage == 0:
                self.conv0_0 = spectral_normed(nn.Conv2d(in_nc, width, 3, 1, 1, bias=True), spectral_norm)
            else:
                setattr(self, f"conv{stage}_0",
                        spectral_normed(nn.Conv2d(previous, width, 3, 1, 1, bias=bias), spectral_norm))
                setattr(self, f"bn{stage}_0", norm_layer(norm, width))
            setattr(self, f"conv{stage}_1", spectral_normed(nn.Conv2d(width, width, 4, 2, 1, bias=bias), spectral_norm))
            setattr(self, f"bn{stage}_1", norm_layer(norm, width))
            previous = width
        self.stages = len(widths)
        self.linear1 = spectral_normed(nn.Linear(widths[-1] * 4 * 4, 100), spectral_norm)
        self.linear2 = spectral_normed(nn.Linear(100, 1), spectral_norm)
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
        spectral_norm: spectrally normalise conv1 to conv8 (True, as Real-ESRGAN). Off, they are plain convs
            (keys ``convN.weight``), e.g. to try ``norm`` alone.
        norm: ``none`` (Real-ESRGAN), ``batch``, ``group`` (8 groups; nf a multiple of 8) or ``instance``: a
            normalization layer after each of conv1 to conv8, before its LeakyReLU (keys ``normN``).

    The input height and width must be multiples of 8.
    """

    def __init__(self, in_nc: int = 3, nf: int = 64, skip_connection: bool = True, spectral_norm: bool = True,
                 norm: NormKind = "none"):
        super().__init__()
        check_norm_channels(norm, {"nf": nf})
        self.skip_connection = skip_connection
        self.in_nc = in_nc
        self.conv0 = nn.Conv2d(in_nc, nf, 3, 1, 1)
        widths = [(nf, nf * 2, 4, 2), (nf * 2, nf * 4, 4, 2), (nf * 4, nf * 8, 4, 2), (nf * 8, nf * 4, 3, 1),
                  (nf * 4, nf * 2, 3, 1), (nf * 2, nf, 3, 1), (nf, nf, 3, 1), (nf, nf, 3, 1)]
        for i, (c_in, c_out, kernel, stride) in enumerate(widths, start=1):
            conv = nn.Conv2d(c_in, c_out, kernel, stride, 1, bias=False)
            setattr(self, f"conv{i}", spectral_normed(conv, spectral_norm))
            setattr(self, f"norm{i}", norm_layer(norm, c_out))  # Identity (no keys) for none
        self.conv9 = nn.Conv2d(nf, 1, 3, 1, 1)

    def _layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(getattr(self, f"norm{i}")(getattr(self, f"conv{i}")(x)), 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_nc or x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(f"unet_discriminator expects (N, {self.in_nc}, H, W) input with H and W multiples of 8, "
                             f"got {tuple(x.shape)}; crop the patches to a multiple of 8")
        x0 = F.leaky_relu(self.conv0(x), 0.2)
        x1 = self._layer(1, x0)
        x2 = self._layer(2, x1)
        x3 = self._layer(3, x2)
        fea = x3
        for i, skip in ((4, x2), (5, x1), (6, x0)):
            fea = self._layer(i, F.interpolate(fea, scale_factor=2, mode="bilinear", align_corners=False))
            if self.skip_connection:
                fea = fea + skip
        fea = self._layer(8, self._layer(7, fea))
        return self.conv9(fea)
