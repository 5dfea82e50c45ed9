"""MSRResNet: BasicSR's "modified SRResNet" (no batch norm), the SRGAN generator as BasicSR trains it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError
from dlas.models.sr.rrdbnet import RESIDUAL_INIT_SCALE, scaled_kaiming_init
from dlas.registry import NETWORKS


class ResidualBlockNoBN(nn.Module):
    """conv-ReLU-conv added to the input; no batch norm (it causes artifacts in SR, see ESRGAN)."""

    def __init__(self, nf: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        scaled_kaiming_init([self], RESIDUAL_INIT_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


@NETWORKS.register("srresnet")
class MSRResNet(nn.Module):
    """SRResNet without batch norm (BasicSR ``MSRResNet``): residual blocks, pixel-shuffle upsampling, global skip.

    1,517,571 parameters at the defaults (x4). The output is ``conv_last(...)`` plus the bilinearly upsampled
    input, so at init the network is close to bilinear interpolation. Key names follow BasicSR (``conv_first``,
    ``body.N.conv1/conv2``, ``upconv1``, ``upconv2``, ``conv_hr``, ``conv_last``), so its ``.pth`` files load.

    Options:
        in_nc: input channels (3 for RGB).
        out_nc: output channels.
        nf: features (64).
        nb: residual blocks (16; each costs 74K parameters at nf=64).
        scale: 2, 3 or 4 (x4 is two x2 pixel-shuffle stages; x2/x3 one stage of that factor).
    """

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 16, scale: int = 4):
        super().__init__()
        if scale not in (2, 3, 4):
            raise ConfigError(f"srresnet supports scale 2, 3 or 4, got {scale}", "scale")
        self.scale = scale
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(nf) for _ in range(nb)])
        stage = 2 if scale == 4 else scale
        self.upconv1 = nn.Conv2d(nf, nf * stage * stage, 3, 1, 1)
        if scale == 4:
            self.upconv2 = nn.Conv2d(nf, nf * 4, 3, 1, 1)
        self.pixel_shuffle = nn.PixelShuffle(stage)
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.1, inplace=True)
        scaled_kaiming_init([self.conv_first, self.upconv1, self.conv_hr, self.conv_last], RESIDUAL_INIT_SCALE)
        if scale == 4:
            scaled_kaiming_init([self.upconv2], RESIDUAL_INIT_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.conv_first.in_channels:
            raise ValueError(f"srresnet expects NCHW input with {self.conv_first.in_channels} channels, "
                             f"got shape {tuple(x.shape)}")
        fea = self.body(self.lrelu(self.conv_first(x)))
        fea = self.lrelu(self.pixel_shuffle(self.upconv1(fea)))
        if self.scale == 4:
            fea = self.lrelu(self.pixel_shuffle(self.upconv2(fea)))
        out = self.conv_last(self.lrelu(self.conv_hr(fea)))
        return out + F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)

    def checkpoint_modules(self) -> list[nn.Module]:
        """The residual blocks, for activation checkpointing."""
        return list(self.body)
