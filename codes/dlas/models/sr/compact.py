"""A small, fast SR generator for CPU runs (Real-ESRGAN's SRVGGNetCompact design)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError
from dlas.models.ops.norm import NormKind, check_norm_channels, norm_layer
from dlas.models.sr.rrdbnet import scaled_kaiming_init
from dlas.registry import NETWORKS


@NETWORKS.register("compact_sr")
class CompactSR(nn.Module):
    """A plain stack of 3x3 conv + PReLU at LR resolution, a pixel shuffle, and the upsampled input added back.

    All the work happens at LR resolution and there are no skips or concatenations inside, so it is the fastest
    generator here: the CPU quickstart trains it. At nf=32, num_conv=8: 89K parameters; forward+backward of a
    16x3x32x32 batch (x4) takes ~0.07 s on 2 CPU cores (see docs/sr.md). The layout (``body.N``) matches
    Real-ESRGAN's ``SRVGGNetCompact``, so ``realesr-general-x4v3.pth`` loads with nf=64, num_conv=32,
    upsample=nearest.

    Options:
        in_nc: input channels.
        out_nc: output channels (must equal in_nc: the upsampled input is added to the output).
        nf: features of every conv (32-48 for CPU training, 64 in Real-ESRGAN).
        num_conv: number of nf->nf convs in the body (8-16 for CPU training; 16 or 32 in Real-ESRGAN).
        scale: upsampling factor (1-8).
        upsample: how the input is upsampled for the global residual: ``nearest`` (Real-ESRGAN's choice) or
            ``bilinear``/``bicubic`` (smoother, so the network only has to learn the detail). The last conv starts
            at zero, so the untrained network *is* this upsampler; with ``bicubic`` it starts at bicubic PSNR. The
            other convs start with He et al.'s PReLU init and zero biases, so the body passes the input on at any
            depth (see docs/sr.md).
        norm: ``none`` (Real-ESRGAN) or ``batch``, ``group`` (8 groups; nf a multiple of 8), ``instance``: a
            normalization layer between every conv but the last and its PReLU (the convs lose their biases, and
            the layers' indices in ``body`` shift, so Real-ESRGAN's files load only with ``none``).
    """

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 32, num_conv: int = 8, scale: int = 4,
                 upsample: Literal["nearest", "bilinear", "bicubic"] = "nearest", norm: NormKind = "none"):
        super().__init__()
        if not 1 <= scale <= 8:
            raise ConfigError(f"compact_sr supports scale 1 to 8, got {scale}", "scale")
        if out_nc != in_nc:
            raise ConfigError(f"compact_sr adds the upsampled input to its output, so out_nc ({out_nc}) must "
                              f"equal in_nc ({in_nc})", "out_nc")
        check_norm_channels(norm, {"nf": nf})
        self.scale = scale
        self.upsample = upsample
        layers: list[nn.Module] = []
        for i in range(num_conv + 1):
            layers.append(nn.Conv2d(in_nc if i == 0 else nf, nf, 3, 1, 1, bias=norm == "none"))
            if norm != "none":  # no Identity placeholders: they would shift Real-ESRGAN's body.N indices
                layers.append(norm_layer(norm, nf))
            layers.append(nn.PReLU(nf))
        # He et al.'s init for PReLU (slope 0.25 at init), and zero biases. PyTorch's default init scales a layer's
        # output by about 1/sqrt(3), so after four layers the features were the biases alone, the same for every
        # input: the body started as a constant and, with the zero last conv, training sat at bicubic quality for
        # hundreds of steps, at batch 8 for good.
        scaled_kaiming_init(layers, 1.0, negative_slope=0.25)
        last = nn.Conv2d(nf, out_nc * scale * scale, 3, 1, 1)
        # Zero-init so the untrained network is exactly the plain upsampler: training starts at interpolation
        # quality instead of below it, and every step that lowers the loss improves on it.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.body = nn.Sequential(*layers)
        self.pixel_shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.body[0].in_channels:
            raise ValueError(f"compact_sr expects NCHW input with {self.body[0].in_channels} channels, "
                             f"got shape {tuple(x.shape)}")
        out = self.pixel_shuffle(self.body(x))
        if self.upsample == "nearest":
            base = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        else:
            base = F.interpolate(x, scale_factor=self.scale, mode=self.upsample, align_corners=False)
        return out + base
