"""Super-resolution validation: upscale each validation image, score it against its HQ image, save it."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Literal, Mapping, Optional

from dlas.errors import ConfigError, DataError
from dlas.evaluators.base import EvalContext, Evaluator, write_json
from dlas.inference.images import save_image, tensor_to_uint8
from dlas.inference.tasks import Request, UpscaleTask
from dlas.inference.tiling import check_tiling
from dlas.metrics.scoring import ImageScorer
from dlas.registry import EVALUATORS

Metric = Literal["psnr", "ssim", "lpips"]


@EVALUATORS.register("sr")
class SREvaluator(Evaluator):
    """Runs an SR network over every validation image (full size) and reports PSNR / SSIM (/ LPIPS).

    Each item of the dataset gives ``lq`` and ``hq`` (CHW in [0, 1]) and ``path``. The output is quantised to
    uint8 exactly like the saved PNG, so the numbers are those of the files in ``out_dir/<stem>.png``
    (``<stem>_<index>.png`` for a stem met before, e.g. ``a/001.png`` and ``b/001.png``).
    Reported: the mean of each metric, plus ``psnr_bicubic``, the PSNR of plain bicubic upscaling under the
    same convention (the baseline to beat: a model below it has not learnt anything yet).
    Also written: ``out_dir/metrics.json`` (means) and ``out_dir/per_image.json`` (every image's numbers;
    ``per_image_rankR.json`` per rank when distributed).

    Options:
      network: the network to run (name under ``networks:``).
      dataset: the dataset to evaluate on (name under ``datasets:``).
      metrics: any of ``psnr``, ``ssim``, ``lpips``. LPIPS needs the AlexNet/VGG ImageNet weights locally.
      crop_border: pixels ignored at each edge; default: the scale (4 for x4), as published tables do.
      y_channel: score the MATLAB BT.601 luma (papers' convention, ~2 dB above RGB) instead of RGB.
      tile: run the network on tiles of this many LQ pixels (for images too large for memory); null: whole.
      tile_overlap: LQ pixels shared by neighbouring tiles (at most tile / 2); exact when the network's
        receptive-field radius is at most tile_overlap / 4.
      save_images: write each output as a PNG.
      max_images: evaluate only the first N images (null: all).
      lpips_net: ``alex`` (SRFlow/SPSR tables) or ``vgg`` (BasicSR's script); not comparable with each other.
      lpips_weights: the backbone weights file; default torchvision's cache ($TORCH_HOME/hub/checkpoints).
    """

    higher_is_better = {"psnr": True, "ssim": True, "lpips": False, "psnr_bicubic": True}

    def __init__(
        self,
        network: str = "generator",
        dataset: str = "val",
        metrics: list[Metric] = ("psnr", "ssim"),
        crop_border: Optional[int] = None,
        y_channel: bool = True,
        tile: Optional[int] = None,
        tile_overlap: int = 16,
        save_images: bool = True,
        max_images: Optional[int] = None,
        lpips_net: Literal["alex", "vgg"] = "alex",
        lpips_weights: Optional[str] = None,
    ):
        if crop_border is not None and crop_border < 0:
            raise ConfigError(f"must be >= 0, got {crop_border}", "crop_border")
        check_tiling(tile, tile_overlap)
        if max_images is not None and max_images < 1:
            raise ConfigError(f"must be >= 1 or null (all images), got {max_images}", "max_images")
        if "lpips" in metrics:  # a missing weights file should stop `--validate`, not the first validation hours later
            from dlas.metrics.lpips import backbone_weights_file

            backbone_weights_file(lpips_net, lpips_weights)
        self.network_name = network
        self.dataset_name = dataset
        self.scorer = ImageScorer(metrics, crop_border, y_channel, lpips_net, lpips_weights)
        self.metrics = self.scorer.metrics
        self.tile = tile
        self.tile_overlap = tile_overlap
        self.save_images = save_images
        self.max_images = max_images
        self._bicubic: Optional[tuple[float, int]] = None  # this rank's (sum, count): the baseline never changes

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        data = self.dataset(ctx, self.dataset_name)
        self.network(ctx, self.network_name)
        task = UpscaleTask(ctx.networks, ctx.config, ctx.device, ctx.autocast, network=self.network_name,
                           tile=self.tile, tile_overlap=self.tile_overlap)
        self.scorer.device = ctx.device
        count = len(data) if self.max_images is None else min(len(data), self.max_images)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        sums: dict[str, float] = defaultdict(float)
        bicubic_sum, per_image, done = 0.0, {}, 0
        shown = []
        for index in ctx.shard(count):
            item = data[index]
            if not isinstance(item, dict) or "lq" not in item or "hq" not in item:
                keys = sorted(item) if isinstance(item, dict) else type(item).__name__
                raise DataError(f"the 'sr' evaluator needs items with 'lq' and 'hq', got {keys}",
                                f"datasets.{self.dataset_name}")
            lq, hq = item["lq"], item["hq"]
            scale = hq.shape[-1] // lq.shape[-1]
            source = str(item.get("path", f"{index:05d}"))
            try:
                output = task(Request(source, image=lq))[0]
            except ValueError as exc:  # tiled_forward: a tile's output is not `scale` x the tile
                raise DataError(f"{exc}; the HQ images are x{scale} their LQ: set the dataset's scale to the "
                                "network's", source) from exc
            if output.shape[-2:] != hq.shape[-2:]:
                net_scale = output.shape[-1] / lq.shape[-1]
                hint = (f"the network upscales x{net_scale:g} but the dataset's HQ is x{scale} its LQ: set the "
                        "dataset's scale to the network's" if net_scale != scale else
                        "crop HQ images to a multiple of the scale")
                raise DataError(f"network output {tuple(output.shape[-2:])} differs from the HQ image "
                                f"{tuple(hq.shape[-2:])}; {hint}", source)
            sr_image, hq_image = tensor_to_uint8(output), tensor_to_uint8(hq)
            try:
                values = self.scorer(sr_image, hq_image, scale)
            except ValueError as exc:  # too small for crop_border (or SSIM's 11x11 window)
                raise DataError(f"cannot score this image: {exc}", source) from exc
            if self._bicubic is None:
                bicubic_sum += self.scorer.baseline_psnr(lq, hq_image, scale)
            for name, value in values.items():
                sums[name] += value
            stem = Path(source).stem
            if stem in per_image:  # e.g. a/001.png and b/001.png: one file and one entry each
                stem = f"{stem}_{index}"
            per_image[stem] = values
            if self.save_images:
                save_image(ctx.out_dir / f"{stem}.png", sr_image)
            if len(shown) < 4:
                shown.append(output.clamp(0, 1))
            done += 1
        if self._bicubic is None:
            self._bicubic = (bicubic_sum, done)
        sums["psnr_bicubic"] = self._bicubic[0]
        means = ctx.global_mean({name: sums[name] for name in [*self.metrics, "psnr_bicubic"]}, done)
        suffix = f"_rank{ctx.rank}" if ctx.world_size > 1 else ""
        write_json(ctx.out_dir / f"per_image{suffix}.json", per_image)
        if ctx.rank == 0:
            write_json(ctx.out_dir / "metrics.json", {"step": ctx.step, **means, "convention": self.convention()})
            for i, image in enumerate(shown):
                ctx.add_image(f"output_{i}", image)
        return means

    def summary(self, metrics: Mapping[str, float]) -> list[str]:
        """PSNR next to bicubic upscaling's: the baseline a model must beat to have learnt anything."""
        if "psnr" not in metrics or "psnr_bicubic" not in metrics:
            return []
        return [f"PSNR {metrics['psnr']:.2f} dB, bicubic upscaling {metrics['psnr_bicubic']:.2f} dB "
                f"({metrics['psnr'] - metrics['psnr_bicubic']:+.2f} dB)"]

    def convention(self) -> str:
        """How PSNR/SSIM were computed, to be written next to the numbers."""
        crop = "crop = scale" if self.scorer.crop_border is None else f"crop = {self.scorer.crop_border}"
        lpips = f"; LPIPS {self.scorer.lpips_net}, RGB, no crop" if "lpips" in self.metrics else ""
        return f"{'Y (BT.601)' if self.scorer.y_channel else 'RGB'}, {crop}, uint8 output{lpips}"
