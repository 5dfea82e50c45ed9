"""shapes_accuracy: sampled images are read back with the shapes classifier and scored against their captions."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from dlas.data.shapes import PALETTE, POSITIONS, SIZES, Scene, ShapeSpec, parse_caption, render
from dlas.errors import ConfigError
from dlas.evaluators.base import EvalContext
from dlas.inference.tasks import Request, Task
from dlas.registry import EVALUATORS, TASKS

CAPTIONS = ["a large red circle in the center on a blue background",
            "a small yellow square in the top left on a black background"]


def draw(caption: str) -> torch.Tensor:
    """The scene a caption describes, rendered at 32 px (CHW in [0, 1])."""
    attributes = parse_caption(caption)
    x, y = POSITIONS[attributes["position"]]
    spec = ShapeSpec(attributes["shape"], attributes["color"], attributes["size"], attributes["position"], x, y,
                     SIZES[attributes["size"]], PALETTE[attributes["color"]])
    scene = Scene(attributes["background"], PALETTE[attributes["background"]], (spec,))
    return torch.from_numpy(render(scene, 32)).permute(2, 0, 1)


@TASKS.register("test_draw_caption")
class DrawCaption(Task):
    """Draws exactly what the caption says, always the first caption's scene, or a picture the shapes classifier
    cannot read (a bright spot inside a darker square on gray: its coverage sums below zero) (test only)."""

    accepts = frozenset({"caption"})

    def __init__(self, networks, config, device, autocast, network: str = "painter",
                 draws: str = "caption"):
        super().__init__(networks, config, device, autocast)
        self.draws = draws

    def __call__(self, request: Request) -> torch.Tensor:
        if self.draws == "unreadable":
            image = torch.full((3, 32, 32), 128 / 255)
            image[:, 8:24, 8:24] = 70 / 255
            image[:, 14:18, 14:18] = 1.0
        else:
            image = draw(CAPTIONS[0] if self.draws == "fixed" else request.caption)
        return image[None].repeat(request.count, 1, 1, 1)


def evaluate(tmp_path, **options) -> dict[str, float]:
    evaluator = EVALUATORS.build({"type": "shapes_accuracy", "network": "painter", "task": "test_draw_caption",
                                  "dataset": None, "captions": CAPTIONS, "count": 2, **options})
    ctx = EvalContext(networks={"painter": torch.nn.Identity()}, datasets={}, out_dir=tmp_path, step=5,
                      device=torch.device("cpu"), autocast=contextlib.nullcontext)
    return evaluator(ctx)


def test_images_showing_their_captions_score_one_on_every_attribute(tmp_path):
    metrics = evaluate(tmp_path)
    assert metrics == {"background": 1.0, "color": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0, "all": 1.0}
    results = json.loads((tmp_path / "results.json").read_text())
    assert [c["caption"] for c in results["captions"]] == CAPTIONS and (tmp_path / "grid.png").is_file()


def test_images_ignoring_their_captions_score_what_they_share(tmp_path):
    # always the first caption's scene: right for the first caption's samples, wrong on every attribute for the
    # second (which differs in all five)
    metrics = evaluate(tmp_path, options={"draws": "fixed"})
    assert metrics == {"background": 0.5, "color": 0.5, "shape": 0.5, "size": 0.5, "position": 0.5, "all": 0.5}


def test_a_caption_the_shapes_world_cannot_read_is_a_config_error():
    with pytest.raises(ConfigError) as error:
        EVALUATORS.build({"type": "shapes_accuracy", "captions": ["a photo of a cat"]})
    assert error.value.problems[0].path == "captions[0]"


def test_a_sample_the_classifier_cannot_read_counts_as_wrong_instead_of_stopping_validation(tmp_path):
    metrics = evaluate(tmp_path, options={"draws": "unreadable"})
    assert metrics["all"] == 0.0 and metrics["background"] == 0.0
