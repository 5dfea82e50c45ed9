"""MSRResNet: BasicSR's "modified SRResNet" (no batch norm), the SRGAN generator as BasicSR trains it."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError
from dlas.models.ops.norm import (
    NormKind,
    check_fixup,
    check_norm_channels,
    fixup_init,
    norm_layer,
)
from dlas.models.sr.rrdbnet import RESIDUAL_INIT_SCALE, scaled_kaiming_init
from dlas.registry import NETWORKS


class ResidualBlockNoBN(nn.Module):
    """conv-ReLU-conv added to the input; by default no batch norm (it causes artifacts in SR, see ESRGAN).

    ``norm`` puts a normalization layer after each conv, SRGAN's original conv-BN-ReLU-conv-BN (the convs then
    have no bias). ``fixup_branches`` (the network's count of blocks) Fixup-initialises the block: conv2 starts at
    zero, so the block starts as the identity, and a learned multiplier scales the branch.
    """

    def __init__(self, nf: int = 64, norm: NormKind = "none", fixup_branches: int | None = None):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1, bias=bias)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=bias)
        self.norm1, self.norm2 = norm_layer(norm, nf), norm_layer(norm, nf)  # Identity (no keys) for none
        self.branch_scale = None
        if fixup_branches is None:
            scaled_kaiming_init([self], RESIDUAL_INIT_SCALE)
        else:
            fixup_init([self.conv1, self.conv2], fixup_branches)
            self.branch_scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
        return x + (out if self.branch_scale is None else out * self.branch_scale)


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
        norm: ``none`` (BasicSR), ``batch`` (SRGAN's original SRResNet), ``group`` (8 groups; nf a multiple of 8) or
            ``instance``: a normalization layer after both convs of every residual block, replacing their biases.
            Other than ``none``, published weights do not load.
        init: ``default`` (BasicSR: kaiming-normal x0.1) or ``fixup`` (Fixup, Zhang et al. 2019, for training
            without normalization: each block's second conv starts at zero, its first at kaiming x nb^(-1/2), and
            a learned branch multiplier, so the blocks start as identities). Needs norm: none; adds one
            parameter per block (``body.N.branch_scale``).
    """

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 16, scale: int = 4,
                 norm: NormKind = "none", init: Literal["default", "fixup"] = "default"):
        super().__init__()
        if scale not in (2, 3, 4):
            raise ConfigError(f"srresnet supports scale 2, 3 or 4, got {scale}", "scale")
        check_norm_channels(norm, {"nf": nf})
        check_fixup(init, norm)
        self.scale = scale
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        fixup_branches = nb if init == "fixup" else None
        self.body = nn.Sequential(*[ResidualBlockNoBN(nf, norm, fixup_branches) for _ in range(nb)])
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
