"""Generative validation: sample fixed inputs with a fixed seed at every validation, so runs show progress."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal, Optional

import torch

from dlas.errors import ConfigError, DataError
from dlas.evaluators.base import EvalContext, Evaluator, write_json
from dlas.inference.images import save_image, tensor_to_uint8
from dlas.inference.tasks import Request, build_task, default_task
from dlas.metrics.scoring import ImageScorer
from dlas.registry import EVALUATORS

Metric = Literal["psnr", "ssim", "lpips"]


@EVALUATORS.register("samples")
class SamplesEvaluator(Evaluator):
    """Runs an inference task (``sample`` or a family's own) on fixed inputs with a fixed seed and shows the result.

    The inputs are the fixed ``captions`` and/or the first ``max_items`` items of ``dataset`` (their
    ``image_key`` image and ``caption_key`` caption, where present). Each input is sampled ``count`` times from
    a generator seeded by ``seed`` and the input's position, so the same weights give the same pictures and a
    run's grids are comparable from one validation to the next. Written: ``out_dir/grid.png`` (one row per
    input), ``out_dir/NNN_k.png`` with ``save_images``, the grid to tensorboard (``val/EVALNAME/grid``).

    Where an item has a reference image (``reference_key``) of the samples' size, the samples are scored
    against it with ``metrics`` (means over every sample); otherwise nothing is reported but the pictures. Where
    the input is an image smaller than the reference (an upsampler), ``psnr_bicubic`` is reported too: the PSNR
    of bicubic upscaling of the same inputs, the baseline a sampler has to beat.

    Options:
      task: the inference task (null: the network's own, see ``dlas-train --list task``).
      network: the network to sample from (name under ``networks:``).
      dataset: a dataset giving the inputs (null: only ``captions``, or unconditional samples).
      captions: fixed captions to sample for.
      count: samples per input.
      seed: the seed of the first input (input i uses seed + i).
      max_items: how many dataset items to sample for.
      image_key / caption_key / reference_key: where an item keeps its conditioning image, caption and reference;
        ``caption_key: null`` ignores the items' captions (an upsampler of captioned images).
      metrics: any of ``psnr``, ``ssim``, ``lpips`` (RGB, whole image), against the reference.
      options: the task's own options (e.g. ``{steps: 50}`` for a diffusion sampler).
      save_images: write every sample as a PNG as well as the grid.
    """

    higher_is_better = {"psnr": True, "ssim": True, "lpips": False, "psnr_bicubic": True}

    def __init__(self, task: Optional[str] = None, network: str = "generator", dataset: Optional[str] = None,
                 captions: list[str] = (), count: int = 4, seed: int = 0, max_items: int = 8,
                 image_key: str = "lq", caption_key: Optional[str] = "caption", reference_key: str = "hq",
                 metrics: list[Metric] = ("psnr",), options: Optional[dict[str, Any]] = None,
                 save_images: bool = False):
        if count < 1:
            raise ConfigError(f"must be >= 1, got {count}", "count")
        if max_items < 1:
            raise ConfigError(f"must be >= 1, got {max_items}", "max_items")
        if any(not isinstance(c, str) or not c.strip() for c in captions):
            raise ConfigError("captions must be non-empty strings", "captions")
        self.task_name = task
        self.network_name = network
        self.dataset_name = dataset
        self.captions = list(captions)
        self.count = count
        self.seed = seed
        self.max_items = max_items
        self.image_key, self.caption_key, self.reference_key = image_key, caption_key, reference_key
        self.scorer = ImageScorer(metrics, 0, False)
        self.options = dict(options or {})
        self.save_images = save_images

    def requests(self, ctx: EvalContext) -> list[tuple[Request, Optional[torch.Tensor]]]:
        """The fixed inputs as requests, each with its reference image (or ``None``)."""
        inputs: list[tuple[Optional[torch.Tensor], Optional[str], Optional[torch.Tensor]]] = [
            (None, caption, None) for caption in self.captions]
        if self.dataset_name is not None:
            data = self.dataset(ctx, self.dataset_name)
            for index in range(min(len(data), self.max_items)):
                item = data[index]
                if not isinstance(item, dict):
                    raise DataError(f"the 'samples' evaluator needs dict items, got {type(item).__name__}",
                                    f"datasets.{self.dataset_name}")
                inputs.append((item.get(self.image_key), item.get(self.caption_key) if self.caption_key else None,
                               item.get(self.reference_key)))
        if not inputs:
            inputs = [(None, None, None)]
        return [(Request(f"{i:03d}", image=image, caption=caption, seed=self.seed + i, count=self.count), reference)
                for i, (image, caption, reference) in enumerate(inputs)]

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        self.network(ctx, self.network_name)
        name = self.task_name or default_task(ctx.config, self.network_name)
        task = build_task(name, ctx.networks, ctx.config, ctx.device, ctx.autocast,
                          {"network": self.network_name, **self.options}, "task")
        self.scorer.device = ctx.device
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        rows, sums, scored, baseline, inputs_scored = [], defaultdict(float), 0, 0.0, 0
        # Every rank draws the same samples (seeded per input), so every rank reports the same numbers without a
        # collective; only rank 0 writes them.
        for request, reference in self.requests(ctx):
            images = task(request).clamp(0, 1)
            rows.append(images)
            if self.save_images and ctx.rank == 0:
                for k, image in enumerate(images):
                    save_image(ctx.out_dir / f"{request.name}_{k}.png", image)
            if reference is not None and tuple(reference.shape[-2:]) == tuple(images.shape[-2:]):
                target = tensor_to_uint8(reference)
                for image in images:
                    for metric, value in self.scorer(tensor_to_uint8(image), target, 1).items():
                        sums[metric] += value
                    scored += 1
                if request.image is not None and request.image.shape[-1] < images.shape[-1]:
                    baseline += self.scorer.baseline_psnr(request.image, target, 1)  # scored as the samples are
                    inputs_scored += 1
        means = {metric: total / scored for metric, total in sums.items()} if scored else {}
        if inputs_scored:
            means["psnr_bicubic"] = baseline / inputs_scored
        if ctx.rank == 0:
            grid = _grid(rows)
            save_image(ctx.out_dir / "grid.png", grid)
            ctx.add_image("grid", grid)
            write_json(ctx.out_dir / "metrics.json", {"step": ctx.step, **means, "task": name,
                                                      "inputs": len(rows), "samples_per_input": self.count})
        return means


def _grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """One CHW image: row i holds the samples of input i, left to right, on a white background."""
    height = max(r.shape[-2] for r in rows)
    width = max(r.shape[-1] for r in rows)
    columns = max(r.shape[0] for r in rows)
    channels = rows[0].shape[1]
    grid = torch.ones(channels, len(rows) * (height + pad) + pad, columns * (width + pad) + pad)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (height + pad), pad + j * (width + pad)
            grid[:, top:top + image.shape[-2], left:left + image.shape[-1]] = image[:channels]
    return grid
