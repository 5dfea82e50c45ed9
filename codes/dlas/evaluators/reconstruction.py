"""Autoencoder validation: reconstruct each held-out image and score the reconstruction against it."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Literal, Optional

import torch

from dlas.errors import ConfigError, DataError
from dlas.evaluators.base import EvalContext, Evaluator, write_json
from dlas.inference.images import save_image, tensor_to_uint8
from dlas.inference.tasks import ReconstructTask, Request
from dlas.metrics.scoring import ImageScorer
from dlas.registry import EVALUATORS

Metric = Literal["psnr", "ssim", "lpips"]


@EVALUATORS.register("reconstruction")
class ReconstructionEvaluator(Evaluator):
    """Reconstructs every validation image with an autoencoder (the ``reconstruct`` task) and scores it.

    Reported: the mean of each metric between an image and its reconstruction, both quantised to uint8 as saved
    PNGs (RGB, no border crop by default: an autoencoder has no scale). Written: ``out_dir/<stem>.png`` (input
    and reconstruction side by side), ``metrics.json`` and ``per_image.json``; the first images' pairs also go to
    tensorboard as ``val/EVALNAME/pair_N``.

    Options:
      network: the autoencoder (name under ``networks:``).
      dataset: the dataset to evaluate on (name under ``datasets:``).
      key: the item key holding the image to reconstruct (``hq`` for the image datasets).
      metrics: any of ``psnr``, ``ssim``, ``lpips`` (LPIPS needs the AlexNet/VGG ImageNet weights locally).
      crop_border: pixels ignored at each edge (0: the whole image).
      y_channel: score the MATLAB BT.601 luma instead of RGB.
      max_images: evaluate only the first N images (null: all).
      save_images: write each input/reconstruction pair as a PNG.
      lpips_net / lpips_weights: as in the ``sr`` evaluator.
    """

    higher_is_better = {"psnr": True, "ssim": True, "lpips": False}

    def __init__(self, network: str = "generator", dataset: str = "val", key: str = "hq",
                 metrics: list[Metric] = ("psnr", "ssim"), crop_border: int = 0, y_channel: bool = False,
                 max_images: Optional[int] = None, save_images: bool = True,
                 lpips_net: Literal["alex", "vgg"] = "alex", lpips_weights: Optional[str] = None):
        if crop_border < 0:
            raise ConfigError(f"must be >= 0, got {crop_border}", "crop_border")
        if max_images is not None and max_images < 1:
            raise ConfigError(f"must be >= 1 or null (all images), got {max_images}", "max_images")
        if "lpips" in metrics:
            from dlas.metrics.lpips import backbone_weights_file

            backbone_weights_file(lpips_net, lpips_weights)
        self.network_name = network
        self.dataset_name = dataset
        self.key = key
        self.scorer = ImageScorer(metrics, crop_border, y_channel, lpips_net, lpips_weights)
        self.max_images = max_images
        self.save_images = save_images

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        data = self.dataset(ctx, self.dataset_name)
        self.network(ctx, self.network_name)
        task = ReconstructTask(ctx.networks, ctx.config, ctx.device, ctx.autocast, network=self.network_name)
        self.scorer.device = ctx.device
        count = len(data) if self.max_images is None else min(len(data), self.max_images)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        sums: dict[str, float] = defaultdict(float)
        per_image: dict[str, dict[str, float]] = {}
        shown: list[torch.Tensor] = []
        for index in ctx.shard(count):
            item = data[index]
            if not isinstance(item, dict) or not isinstance(item.get(self.key), torch.Tensor):
                keys = sorted(item) if isinstance(item, dict) else type(item).__name__
                raise DataError(f"the 'reconstruction' evaluator reads the image under key '{self.key}'; the items "
                                f"have {keys} (set the evaluator's key)", f"datasets.{self.dataset_name}")
            image = item[self.key]
            source = str(item.get("path", f"{index:05d}"))
            output = task(Request(source, image=image))[0]
            original, rebuilt = tensor_to_uint8(image), tensor_to_uint8(output)
            try:
                values = self.scorer(rebuilt, original, 1)
            except ValueError as exc:
                raise DataError(f"cannot score this image: {exc}", source) from exc
            for name, value in values.items():
                sums[name] += value
            stem = Path(source).stem
            if stem in per_image:
                stem = f"{stem}_{index}"
            per_image[stem] = values
            pair = torch.cat([image.float().cpu(), output.clamp(0, 1)], dim=-1)
            if self.save_images:
                save_image(ctx.out_dir / f"{stem}.png", pair)
            if len(shown) < 4:
                shown.append(pair)
        means = ctx.global_mean({name: sums[name] for name in self.scorer.metrics}, len(per_image))
        suffix = f"_rank{ctx.rank}" if ctx.world_size > 1 else ""
        write_json(ctx.out_dir / f"per_image{suffix}.json", per_image)
        if ctx.rank == 0:
            write_json(ctx.out_dir / "metrics.json", {"step": ctx.step, **means,
                                                      "convention": self.scorer.convention(1)})
            for i, pair in enumerate(shown):
                ctx.add_image(f"pair_{i}", pair)
        return means

    def summary(self, metrics) -> list[str]:
        """The held-out reconstruction quality."""
        parts = [f"{name} {metrics[name]:.4g}" for name in self.scorer.metrics if name in metrics]
        return [f"reconstruction {', '.join(parts)}"] if parts else []
