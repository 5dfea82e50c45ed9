"""Text-to-image validation on the shapes world: do the sampled images show what their captions say?"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Optional

from dlas.data.shapes import ATTRIBUTES, classify_image, parse_caption
from dlas.errors import ConfigError, DataError
from dlas.evaluators.base import EvalContext, Evaluator, write_json
from dlas.evaluators.samples import _grid
from dlas.inference.images import save_image
from dlas.inference.tasks import Request, build_task, default_task
from dlas.registry import EVALUATORS


@EVALUATORS.register("shapes_accuracy")
class ShapesAccuracyEvaluator(Evaluator):
    """Samples images for shapes captions and reads back from their pixels what they show.

    For each caption (the fixed ``captions`` and those of the first ``max_items`` items of ``dataset``: the
    shapes dataset, or token shards extracted from it), ``count`` images are sampled with a fixed seed (caption
    i uses ``seed + i``) and classified by :func:`dlas.data.shapes.classify_image`. Reported, as fractions of
    the samples: ``background``, ``color``, ``shape``, ``size``, ``position`` (each scored where the caption
    states it) and ``all`` (every stated attribute right at once). Chance is 1/12, 1/11, 1/4, 1/2 (two
    sizes), 1/9 and their product; a caption with several shapes is skipped (the classifier reads one).
    Written: ``grid.png`` (one row per caption) and ``results.json`` (per caption: what it says, what each
    sample shows), the grid to tensorboard.

    Options:
      network: the text-to-image network (its ``inference_task``, e.g. ``dalle``, unless ``task`` is given).
      task: the inference task (null: the network's own).
      dataset: a dataset whose items carry captions (null: only ``captions``).
      captions: fixed captions.
      caption_key: where an item keeps its caption.
      count: samples per caption.
      seed: the seed of the first caption.
      max_items: dataset captions to use.
      options: the task's options (``{guidance_scale: 3}``).
    """

    higher_is_better = {**{name: True for name in ATTRIBUTES}, "all": True}

    def __init__(self, network: str = "dalle", task: Optional[str] = None, dataset: Optional[str] = "val",
                 captions: list[str] = (), caption_key: str = "caption", count: int = 4, seed: int = 0,
                 max_items: int = 32, options: Optional[dict[str, Any]] = None):
        if count < 1:
            raise ConfigError(f"must be >= 1, got {count}", "count")
        if max_items < 1:
            raise ConfigError(f"must be >= 1, got {max_items}", "max_items")
        for i, caption in enumerate(captions):
            try:
                parse_caption(caption)
            except ValueError as exc:
                raise ConfigError(f"not a shapes caption: {exc}", f"captions[{i}]") from exc
        self.network_name, self.task_name, self.dataset_name = network, task, dataset
        self.captions, self.caption_key = list(captions), caption_key
        self.count, self.seed, self.max_items = count, seed, max_items
        self.options = dict(options or {})

    def all_captions(self, ctx: EvalContext) -> list[str]:
        captions = list(self.captions)
        if self.dataset_name is not None:
            data = self.dataset(ctx, self.dataset_name)
            for index in range(min(len(data), self.max_items)):
                item = data[index]
                if not isinstance(item, dict) or not isinstance(item.get(self.caption_key), str):
                    raise DataError(f"item {index} has no '{self.caption_key}' caption",
                                    f"datasets.{self.dataset_name}")
                captions.append(item[self.caption_key])
        return captions

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        self.network(ctx, self.network_name)
        name = self.task_name or default_task(ctx.config, self.network_name)
        task = build_task(name, ctx.networks, ctx.config, ctx.device, ctx.autocast,
                          {"network": self.network_name, **self.options}, "task")
        right: dict[str, float] = defaultdict(float)
        stated: dict[str, int] = defaultdict(int)
        rows, results = [], []
        for i, caption in enumerate(self.all_captions(ctx)):
            expected = parse_caption(caption)
            if any(" and " in value for value in expected.values()):
                continue  # several shapes: classify_image reads one
            images = task(Request(f"{i:03d}", caption=caption, seed=self.seed + i, count=self.count)).clamp(0, 1)
            rows.append(images)
            shown = [classify_image(image) for image in images]
            for reading in shown:
                hits = {key: reading[key] == value for key, value in expected.items()}
                for key, hit in hits.items():
                    right[key] += hit
                    stated[key] += 1
                right["all"] += all(hits.values())
                stated["all"] += 1
            results.append({"caption": caption, "expected": expected, "shown": shown})
        if not rows:
            raise ConfigError("no single-shape captions to score (give captions or a shapes dataset)", "captions")
        metrics = {key: right[key] / stated[key] for key in stated}
        if ctx.rank == 0:  # every rank samples the same (seeded) images; one writes them
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            grid = _grid(rows)
            save_image(ctx.out_dir / "grid.png", grid)
            ctx.add_image("grid", grid)
            write_json(ctx.out_dir / "results.json", {"step": ctx.step, "task": name, **metrics,
                                                      "captions": results})
        return metrics

    def summary(self, metrics: Mapping[str, float]) -> list[str]:
        shown = ", ".join(f"{key} {100 * metrics[key]:.0f}%" for key in (*ATTRIBUTES, "all") if key in metrics)
        return [f"samples show their caption's {shown} (shapes_accuracy)"]
