"""Scoring an output image against its reference with a stated convention: the one scorer the ``sr`` evaluator
and ``dlas-test --metrics`` share, so a number means the same wherever it was printed."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from dlas.metrics.convention import tensor_to_uint8
from dlas.metrics.psnr import psnr
from dlas.metrics.ssim import ssim

METRICS = ("psnr", "ssim", "lpips")


class ImageScorer:
    """PSNR / SSIM / LPIPS of HWC uint8 RGB images with BasicSR's conventions.

    metrics: any of ``psnr``, ``ssim``, ``lpips``.
    crop_border: pixels ignored at each edge for PSNR/SSIM; ``None``: the scale (4 for x4), as published tables.
    y_channel: PSNR/SSIM on the MATLAB BT.601 luma instead of RGB.
    lpips_net / lpips_weights: LPIPS backbone and its weights file (LPIPS is computed on the whole RGB image).
    crop_option: the option name a "too small for crop_border" hint names (``crop_border``, ``--crop-border``).

    Images too small for the crop (or for SSIM's 11x11 window) raise ``ValueError`` with a hint.
    """

    def __init__(self, metrics: Sequence[str] = ("psnr", "ssim"), crop_border: Optional[int] = None,
                 y_channel: bool = True, lpips_net: str = "alex", lpips_weights: Optional[str] = None,
                 device: Optional[torch.device] = None, crop_option: str = "crop_border"):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
        self.metrics = list(dict.fromkeys(metrics))
        self.crop_border = crop_border
        self.y_channel = y_channel
        self.lpips_net = lpips_net
        self.lpips_weights = lpips_weights
        self.device = device or torch.device("cpu")
        self.crop_option = crop_option
        self._lpips = None

    def crop(self, scale: int) -> int:
        return scale if self.crop_border is None else self.crop_border

    def _lpips_metric(self):
        if self._lpips is None:
            from dlas.metrics.lpips import LPIPSMetric

            self._lpips = LPIPSMetric(self.lpips_net, self.lpips_weights, self.device)
        return self._lpips

    def __call__(self, output: np.ndarray, reference: np.ndarray, scale: int) -> dict[str, float]:
        """The metrics of ``output`` against ``reference`` (both HWC uint8 RGB of the same shape)."""
        values = {}
        try:
            if "psnr" in self.metrics:
                values["psnr"] = psnr(output, reference, self.crop(scale), self.y_channel)
            if "ssim" in self.metrics:
                values["ssim"] = ssim(output, reference, self.crop(scale), self.y_channel)
        except ValueError as exc:
            hint = (f"; lower {self.crop_option}, leave out ssim or use larger images"
                    if "shape" not in str(exc) else "")
            raise ValueError(f"{exc}{hint}") from exc
        if "lpips" in self.metrics:
            values["lpips"] = self._lpips_metric()(output, reference)
        return values

    def baseline_psnr(self, lq: torch.Tensor, reference: np.ndarray, scale: int) -> float:
        """PSNR of plain bicubic upscaling of ``lq`` (NCHW or CHW in [0, 1]) under the same convention."""
        import torch.nn.functional as F

        lq = lq[None] if lq.dim() == 3 else lq
        bicubic = F.interpolate(lq.float(), size=reference.shape[:2], mode="bicubic", align_corners=False)
        return psnr(tensor_to_uint8(bicubic[0]), reference, self.crop(scale), self.y_channel)

    def convention(self, scale: Optional[int] = None) -> str:
        """How the numbers were computed, written next to them."""
        crop = (f"{self.crop(scale)} px" if scale is not None or self.crop_border is not None else "scale px")
        lpips = f"; LPIPS {self.lpips_net}, RGB, whole image" if "lpips" in self.metrics else ""
        return f"PSNR/SSIM on {'Y (BT.601)' if self.y_channel else 'RGB'}, {crop} cropped per edge, uint8{lpips}"
