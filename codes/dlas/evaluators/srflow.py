"""SRFlow validation: likelihood of the HQ images, and quality and LR-consistency of samples at fixed temperatures."""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from dlas.errors import ConfigError, DataError
from dlas.evaluators.base import EvalContext, Evaluator, write_json
from dlas.inference import save_image, tensor_to_uint8
from dlas.metrics import psnr
from dlas.models.srflow.srflow import NonFiniteError
from dlas.registry import EVALUATORS

log = logging.getLogger(__name__)

Metric = Literal["psnr", "lpips"]


@EVALUATORS.register("srflow")
class SRFlowEvaluator(Evaluator):
    """Scores an ``srflow`` network on validation pairs: NLL, sample PSNR (/LPIPS) and LR-consistency.

    Reported (means over the images):
      ``nll``: bits per dimension of the HQ images given their LQ (the training loss; lower is better; 8 is the
        value of a model that learnt nothing but the [0, 1] range). ``nll_srflow``: the same in the SRFlow code's
        per-pixel convention.
      ``psnr_t{T}`` for each temperature T (``psnr_t0``, ``psnr_t0.9``): PSNR of a sample against the HQ image.
        T = 0 is the deterministic "mean" image (highest PSNR); the paper reports T = 0.9 (27.09 dB on DIV2K x4
        val, RGB, no crop) where samples are sharp and diverse.
      ``lpips_t{T}`` when ``lpips`` is in ``metrics`` (AlexNet LPIPS, as the paper).
      ``lr_psnr_t{T}``: PSNR between the sample downscaled by antialiased bicubic (PyTorch's, which follows
        MATLAB's imresize closely, like our datasets' LQ) and the LQ input. SRFlow reaches ~50 dB; a value
        below ~45 dB means samples contradict their LR image.
      ``nonfinite_t{T}``: the fraction of images whose sample hit NaN/Inf in the reverse pass (a known SRFlow
        failure, see the network's ``reverse_clamp``). Such samples are left out of the means above and logged
        with the layer where it happened, so one bad image cannot stop a training run.
    Every random draw (dequantisation noise, latents) comes from a generator seeded by ``seed`` and the image
    index, so the numbers are reproducible and training's random stream is left untouched. The flow runs in
    fp32 whatever the run's precision (its log-determinants and inverses need it).

    Options:
      network: the srflow network (name under ``networks:``).
      dataset: the dataset with ``lq``/``hq`` pairs (name under ``datasets:``).
      temperatures: sampling temperatures to score ([0, 0.9]).
      metrics: ``psnr`` and optionally ``lpips`` (needs the AlexNet/VGG ImageNet weights locally).
      crop_border: pixels ignored at each edge for PSNR against HQ (0: SRFlow's convention, whole image).
      y_channel: PSNR on MATLAB BT.601 luma instead of RGB (false: SRFlow's convention).
      center_crop: centre-crop HQ images to at most this size (LQ accordingly) to bound memory and time; null:
        whole images. Either way the pair is then cut to the nearest size the flow takes (HQ sides multiples of
        2**L: at most one LQ pixel per side at x4 with L = 3).
      max_images: evaluate the first N images only (null: all).
      seed: seed of the noise and latents.
      save_images: write each sample as ``<stem>_t<T>.png`` (``<stem>_<index>_t<T>.png`` for a repeated stem).
      lpips_net / lpips_weights: as in the ``sr`` evaluator (``alex`` is SRFlow's).
    """

    def __init__(
        self,
        network: str = "generator",
        dataset: str = "val",
        temperatures: list[float] = (0.0, 0.9),
        metrics: list[Metric] = ("psnr",),
        crop_border: int = 0,
        y_channel: bool = False,
        center_crop: Optional[int] = None,
        max_images: Optional[int] = None,
        seed: int = 0,
        save_images: bool = True,
        lpips_net: Literal["alex", "vgg"] = "alex",
        lpips_weights: Optional[str] = None,
    ):
        if not temperatures:
            raise ConfigError("give at least one temperature, e.g. [0, 0.9]", "temperatures")
        bad = [t for t in temperatures if t < 0]
        if bad:
            raise ConfigError(f"temperatures must be >= 0, got {bad}", "temperatures")
        if crop_border < 0:
            raise ConfigError(f"must be >= 0, got {crop_border}", "crop_border")
        if center_crop is not None and center_crop < 1:
            raise ConfigError(f"must be >= 1 or null (whole images), got {center_crop}", "center_crop")
        if max_images is not None and max_images < 1:
            raise ConfigError(f"must be >= 1 or null (all images), got {max_images}", "max_images")
        self.network_name = network
        self.dataset_name = dataset
        self.temperatures = [float(t) for t in dict.fromkeys(temperatures)]
        self.metrics = list(dict.fromkeys(metrics))
        self.crop_border = crop_border
        self.y_channel = y_channel
        self.center_crop = center_crop
        self.max_images = max_images
        self.seed = seed
        self.save_images = save_images
        self.lpips_net = lpips_net
        self.lpips_weights = lpips_weights
        self._lpips = None
        directions = {"nll": False, "nll_srflow": False}
        for t in self.temperatures:
            directions[f"psnr_t{t:g}"] = True
            directions[f"lr_psnr_t{t:g}"] = True
            if "lpips" in self.metrics:
                directions[f"lpips_t{t:g}"] = False
            directions[f"nonfinite_t{t:g}"] = False
        self.higher_is_better = directions

    def _flow(self, ctx: EvalContext) -> torch.nn.Module:
        net = self.network(ctx, self.network_name)
        net = getattr(net, "module", net)  # DDP / compile wrappers
        if not (hasattr(net, "encode") and hasattr(net, "sample") and hasattr(net, "scale")):
            raise ConfigError(f"network '{self.network_name}' is a {type(net).__name__}, not an srflow network; use "
                              "the 'sr' evaluator for it", "network")
        return net

    def _pair(self, item: dict, flow: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hq, lq)`` batched on ``device``, centre-cropped and cut to a size the flow can take."""
        source = str(item.get("path", "item"))
        if "lq" not in item or "hq" not in item:
            raise DataError(f"the 'srflow' evaluator needs items with 'lq' and 'hq', got {sorted(item)}", source)
        lq, hq = item["lq"], item["hq"]
        scale = flow.scale
        if tuple(hq.shape[-2:]) != (lq.shape[-2] * scale, lq.shape[-1] * scale):
            raise DataError(f"HQ {tuple(hq.shape[-2:])} is not LQ {tuple(lq.shape[-2:])} x{scale}; crop HQ "
                            f"images to a multiple of {scale}", source)
        # LR sizes whose HR size is a multiple of 2**L (the flow squeezes L times).
        step = 2**flow.L // math.gcd(2**flow.L, scale)
        limit = lq.shape[-2:] if self.center_crop is None else [min(n, self.center_crop // scale)
                                                                for n in lq.shape[-2:]]
        h, w = (n - n % step for n in limit)
        if h < 1 or w < 1:
            raise DataError(f"image too small for this flow (LQ {tuple(lq.shape[-2:])}, needs {step}x{step})",
                            source)
        top, left = (lq.shape[-2] - h) // 2, (lq.shape[-1] - w) // 2
        lq = lq[..., top:top + h, left:left + w]
        hq = hq[..., top * scale:(top + h) * scale, left * scale:(left + w) * scale]
        return hq[None].to(device).float(), lq[None].to(device).float()

    def _lpips_metric(self, device: torch.device):
        if self._lpips is None:
            from dlas.metrics import LPIPSMetric

            self._lpips = LPIPSMetric(self.lpips_net, self.lpips_weights, device)
        return self._lpips

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        flow = self._flow(ctx)
        data = self.dataset(ctx, self.dataset_name)
        count = len(data) if self.max_images is None else min(len(data), self.max_images)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)  # sample metrics count only the samples that stayed finite
        per_image, done = {}, 0
        for index in ctx.shard(count):
            item = data[index]
            hq, lq = self._pair(item, flow, ctx.device)
            stem = Path(str(item.get("path", f"{index:05d}"))).stem
            if stem in per_image:  # e.g. a/001.png and b/001.png: one set of files and one entry each
                stem = f"{stem}_{index}"
            generator = torch.Generator(ctx.device).manual_seed((self.seed * 1_000_003 + index) % 2**63)
            values = self._score(flow, hq, lq, generator, ctx, stem)
            for name, value in values.items():
                sums[name] += value
                counts[name] += 1
            per_image[stem] = values
            done += 1
        means = {}
        for name in self.higher_is_better:
            total = done if name.startswith(("nll", "nonfinite")) else counts[name]
            means.update(ctx.global_mean({name: sums[name]}, total))
        suffix = f"_rank{ctx.rank}" if ctx.world_size > 1 else ""
        write_json(ctx.out_dir / f"per_image{suffix}.json", per_image)
        if ctx.rank == 0:
            write_json(ctx.out_dir / "metrics.json", {"step": ctx.step, **means, "convention": self.convention()})
        return means

    @torch.no_grad()
    def _score(self, flow: torch.nn.Module, hq: torch.Tensor, lq: torch.Tensor, generator: torch.Generator,
               ctx: EvalContext, stem: str) -> dict[str, float]:
        _, _, nll, nll_srflow = flow.encode(hq, lq, generator=generator)
        values = {"nll": nll.item(), "nll_srflow": nll_srflow.item()}
        hq_image, lq_image = tensor_to_uint8(hq[0]), tensor_to_uint8(lq[0])
        for t in self.temperatures:
            try:
                sr = flow.sample(lq, temperature=t, generator=generator)
            except NonFiniteError as exc:
                log.warning("srflow evaluator: %s at temperature %g: %s", stem, t, exc)
                values[f"nonfinite_t{t:g}"] = 1.0
                continue
            values[f"nonfinite_t{t:g}"] = 0.0
            sr_image = tensor_to_uint8(sr[0])
            values[f"psnr_t{t:g}"] = psnr(sr_image, hq_image, self.crop_border, self.y_channel)
            # Downscale the quantised sample, as a saved PNG would be, with the datasets' LQ degradation.
            quantised = torch.from_numpy(sr_image).permute(2, 0, 1)[None].float() / 255
            down = F.interpolate(quantised, size=lq.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
            values[f"lr_psnr_t{t:g}"] = psnr(tensor_to_uint8(down[0].clamp(0, 1)), lq_image)
            if "lpips" in self.metrics:
                values[f"lpips_t{t:g}"] = self._lpips_metric(ctx.device)(sr_image, hq_image)
            if self.save_images:
                save_image(ctx.out_dir / f"{stem}_t{t:g}.png", sr_image)
        return values

    def convention(self) -> str:
        """How the numbers were computed, written next to them."""
        crop = f"crop = {self.crop_border}" if self.crop_border else "whole image"
        lpips = f"; LPIPS {self.lpips_net}" if "lpips" in self.metrics else ""
        channel = "Y (BT.601)" if self.y_channel else "RGB"
        return (f"NLL in bits/dim (C·H·W) with 1/quant dequantisation; PSNR {channel}, "
                f"{crop}, uint8 samples; LR-PSNR: antialiased bicubic downscale vs LQ, RGB{lpips}")
