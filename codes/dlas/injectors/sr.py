"""Injectors specific to super-resolution."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from dlas.context import Context
from dlas.errors import ConfigError
from dlas.injectors.base import Injector
from dlas.registry import INJECTORS


@INJECTORS.register("image_patch")
class ImagePatchInjector(Injector):
    """Random aligned sub-patches of an LR/HR pair: an LR patch of ``patch_size/scale`` and the HR patch above it.

    Use it to feed a fixed-size discriminator (e.g. ``vgg_discriminator`` at 128) or a patch-level loss from
    larger training images. Offsets come from torch's global RNG (seeded and checkpointed by the trainer).

    Options:
        lq, hq: state keys of the LR and HR images (HR exactly ``scale`` times the LR size).
        out_lq, out_hq: state keys to write the patches to.
        patch_size: HR patch size; a multiple of ``scale``.
        scale: HR/LR size ratio.
        per_sample: False (default): one offset for the whole batch (a single slice, cheapest). True: each
            sample gets its own offset (more varied patches within a batch).
    """

    def __init__(self, lq: str = "lq", hq: str = "hq", out_lq: str = "lq_patch", out_hq: str = "hq_patch",
                 patch_size: int = 128, scale: int = 4, per_sample: bool = False):
        super().__init__(reads=[lq, hq], writes=[out_lq, out_hq])
        if scale < 1:
            raise ConfigError(f"scale must be >= 1, got {scale}", "scale")
        if patch_size <= 0 or patch_size % scale:
            raise ConfigError(f"patch_size is in HR pixels and must be a positive multiple of scale ({scale}), "
                              f"got {patch_size}", "patch_size")
        self.lq, self.hq, self.out_lq, self.out_hq = lq, hq, out_lq, out_hq
        self.patch_size, self.scale, self.per_sample = patch_size, scale, per_sample

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        lq, hq = state[self.lq], state[self.hq]
        s, lr_patch = self.scale, self.patch_size // self.scale
        height, width = lq.shape[-2:]
        if tuple(hq.shape[-2:]) != (height * s, width * s):
            raise ValueError(f"image_patch: '{self.hq}' is {tuple(hq.shape[-2:])} but '{self.lq}' is "
                             f"{(height, width)}; HR must be exactly scale={s} times LR")
        if height < lr_patch or width < lr_patch:
            raise ValueError(f"image_patch: LR images of {(height, width)} are smaller than the LR patch "
                             f"{lr_patch}x{lr_patch} (patch_size {self.patch_size} / scale {s})")
        count = lq.shape[0] if self.per_sample else 1
        tops = torch.randint(0, height - lr_patch + 1, (count,)).tolist()
        lefts = torch.randint(0, width - lr_patch + 1, (count,)).tolist()
        lq_patches, hq_patches = [], []
        for i, (top, left) in enumerate(zip(tops, lefts)):
            rows = slice(i, i + 1) if self.per_sample else slice(None)
            lq_patches.append(lq[rows, ..., top:top + lr_patch, left:left + lr_patch])
            hq_patches.append(hq[rows, ..., top * s:(top + lr_patch) * s, left * s:(left + lr_patch) * s])
        return {self.out_lq: torch.cat(lq_patches), self.out_hq: torch.cat(hq_patches)}
