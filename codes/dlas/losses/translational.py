"""Translational self-consistency: a generator should produce the same pixels for a region however it is cropped."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from dlas.context import Context
from dlas.errors import ConfigError
from dlas.losses.base import Loss
from dlas.registry import LOSSES


@LOSSES.register("translational")
class TranslationalLoss(Loss):
    """L1 between the generator's outputs for two overlapping LR crops, on the HR region both crops cover.

    Each call picks a random LR crop A of ``patch_size/scale`` pixels and a crop B shifted from it diagonally by
    ``(patch_size - overlap)/scale`` pixels in a random one of the four diagonal directions, so the two outputs
    share an ``overlap`` x ``overlap`` HR region. The same crops are used for the whole batch; positions come from
    torch's global RNG (seeded and checkpointed by the trainer). Both outputs get gradients. DLAS added this to
    ESRGAN training to suppress border- and position-dependent artifacts; it is exactly zero for a
    translation-equivariant generator.

    Options:
        generator: name of the generator network (it runs twice more per step, on the two crops in one batch).
        lq: state key of the LR input.
        patch_size: HR size of each crop (96 in DLAS); a multiple of ``scale``.
        overlap: HR size of the shared region (64 in DLAS); a multiple of ``scale``, smaller than patch_size.
        scale: the generator's upscaling factor.

    The LR input must be at least (2*patch_size - overlap)/scale pixels high and wide (32 for the defaults).
    """

    def __init__(self, generator: str = "generator", lq: str = "lq", patch_size: int = 96, overlap: int = 64,
                 scale: int = 4):
        super().__init__(reads=[lq], networks=[generator])
        if scale < 1:
            raise ConfigError(f"scale must be >= 1, got {scale}", "scale")
        for name, value in (("patch_size", patch_size), ("overlap", overlap)):
            if value <= 0 or value % scale:
                raise ConfigError(f"{name} is in HR pixels and must be a positive multiple of scale ({scale}), "
                                  f"got {value}", name)
        if overlap >= patch_size:
            raise ConfigError(f"overlap ({overlap}) must be smaller than patch_size ({patch_size})", "overlap")
        self.generator, self.lq, self.scale = generator, lq, scale
        self.patch = patch_size // scale
        self.shift = (patch_size - overlap) // scale
        self.overlap = overlap

    def forward(self, state: Mapping[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        lq = state[self.lq]
        span = self.patch + self.shift
        height, width = lq.shape[-2:]
        if height < span or width < span:
            raise ValueError(f"translational loss needs LR inputs of at least {span}x{span} pixels for patch_size "
                             f"{self.patch * self.scale} and overlap {self.overlap}, got {height}x{width}")
        top = int(torch.randint(0, height - span + 1, ()))
        left = int(torch.randint(0, width - span + 1, ()))
        down, right = (bool(b) for b in torch.randint(0, 2, (2,)))
        # A sits at the window's corner the shift points away from; B at the opposite corner.
        a_top, b_top = (top, top + self.shift) if down else (top + self.shift, top)
        a_left, b_left = (left, left + self.shift) if right else (left + self.shift, left)
        crop_a = lq[..., a_top:a_top + self.patch, a_left:a_left + self.patch]
        crop_b = lq[..., b_top:b_top + self.patch, b_left:b_left + self.patch]
        out_a, out_b = ctx.networks[self.generator](torch.cat([crop_a, crop_b])).chunk(2)
        s, o = self.scale, self.overlap
        # The overlap in each output's own HR coordinates: B's top-left region lies at offset shift*scale in A.
        ay, ax = (b_top - a_top) * s if down else 0, (b_left - a_left) * s if right else 0
        by, bx = 0 if down else (a_top - b_top) * s, 0 if right else (a_left - b_left) * s
        return F.l1_loss(out_a[..., ay:ay + o, ax:ax + o], out_b[..., by:by + o, bx:bx + o])
