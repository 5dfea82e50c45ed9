"""Specification of the built-in evaluators: 'sr' (images + PSNR/SSIM) and 'loss' (validation losses)."""
import contextlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlas.errors import ConfigError, DataError
from dlas.evaluators.base import EvalContext
from dlas.inference import load_image, tensor_to_uint8
from dlas.metrics import psnr, ssim
from dlas.registry import EVALUATORS


class PairDataset(torch.utils.data.Dataset):
    """Items like paired_folder's: lq/hq CHW float in [0, 1] (uint8-exact), plus a path."""

    def __init__(self, count=3, size=16, scale=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(count):
            hq = (torch.rand(3, size * scale, size * scale, generator=g) * 255).round() / 255
            lq = (F.avg_pool2d(hq[None], scale)[0] * 255).round() / 255
            self.items.append({"lq": lq, "hq": hq, "path": f"/data/val/img{i}.png"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


class Nearest(torch.nn.Module):
    def __init__(self, scale=2):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


class Oracle(torch.nn.Module):
    """Returns the HQ image of the dataset item whose LQ it is given (a perfect model)."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def forward(self, x):
        for item in self.data.items:
            if item["lq"].shape == x.shape[1:] and torch.equal(item["lq"], x[0]):
                return item["hq"][None]
        raise AssertionError("unknown input")


def context(tmp_path, net, data, **kw):
    return EvalContext(networks={"generator": net}, datasets={"val": data}, out_dir=tmp_path / "val" / "10" / "sr",
                       step=10, device=torch.device("cpu"), autocast=contextlib.nullcontext, **kw)


def build(**options):
    return EVALUATORS.build({"type": "sr", **options}, "eval.sr")


def test_sr_on_a_perfect_model_reports_infinite_psnr_and_ssim_one(tmp_path):
    data = PairDataset()
    metrics = build()(context(tmp_path, Oracle(data), data))
    assert metrics["psnr"] == math.inf and metrics["ssim"] == pytest.approx(1.0)


def test_sr_saves_every_output_as_png_named_by_the_source_stem(tmp_path):
    data = PairDataset()
    ctx = context(tmp_path, Nearest(), data)
    build()(ctx)
    for i, item in enumerate(data.items):
        saved = load_image(ctx.out_dir / f"img{i}.png")
        assert np.array_equal(tensor_to_uint8(saved), tensor_to_uint8(Nearest()(item["lq"][None])[0]))


def test_sr_metrics_are_those_of_the_saved_images_with_crop_scale_and_y_channel(tmp_path):
    data = PairDataset()
    ctx = context(tmp_path, Nearest(), data)
    metrics = build()(ctx)
    expected_psnr, expected_ssim = [], []
    for i, item in enumerate(data.items):
        out = tensor_to_uint8(load_image(ctx.out_dir / f"img{i}.png"))
        hq = tensor_to_uint8(item["hq"])
        expected_psnr.append(psnr(out, hq, crop_border=2, y_channel=True))
        expected_ssim.append(ssim(out, hq, crop_border=2, y_channel=True))
    assert metrics["psnr"] == pytest.approx(np.mean(expected_psnr), abs=1e-9)
    assert metrics["ssim"] == pytest.approx(np.mean(expected_ssim), abs=1e-9)
    assert build(y_channel=False, crop_border=0)(ctx)["psnr"] != pytest.approx(metrics["psnr"])


def test_sr_writes_metrics_json_and_per_image_numbers(tmp_path):
    data = PairDataset()
    ctx = context(tmp_path, Nearest(), data)
    metrics = build()(ctx)
    written = json.loads((ctx.out_dir / "metrics.json").read_text())
    assert written["psnr"] == pytest.approx(metrics["psnr"]) and written["step"] == 10
    assert "Y (BT.601)" in written["convention"]
    per_image = json.loads((ctx.out_dir / "per_image.json").read_text())
    assert sorted(per_image) == ["img0", "img1", "img2"]
    assert np.mean([v["psnr"] for v in per_image.values()]) == pytest.approx(metrics["psnr"])


def test_sr_reports_the_bicubic_baseline_psnr(tmp_path):
    data = PairDataset()
    metrics = build()(context(tmp_path, Nearest(), data))
    values = []
    for item in data.items:
        bicubic = F.interpolate(item["lq"][None], scale_factor=2, mode="bicubic", align_corners=False)[0]
        values.append(psnr(tensor_to_uint8(bicubic), tensor_to_uint8(item["hq"]), 2, True))
    assert metrics["psnr_bicubic"] == pytest.approx(np.mean(values), abs=1e-9)


def test_sr_tiled_validation_gives_the_same_numbers(tmp_path):
    data = PairDataset(size=40)
    whole = build(save_images=False)(context(tmp_path, Nearest(), data))
    tiled = build(save_images=False, tile=16, tile_overlap=8)(context(tmp_path, Nearest(), data))
    assert tiled == pytest.approx(whole, abs=1e-9)


def test_sr_max_images_limits_the_evaluated_images(tmp_path):
    ctx = context(tmp_path, Nearest(), PairDataset(count=4))
    build(max_images=2)(ctx)
    assert sorted(p.name for p in ctx.out_dir.glob("*.png")) == ["img0.png", "img1.png"]


def test_sr_on_rank_1_of_2_takes_every_other_item_and_reduces_sums(tmp_path):
    reduced = []
    ctx = context(tmp_path, Nearest(), PairDataset(count=5), rank=1, world_size=2,
                  all_reduce_sum=lambda t: reduced.append(t.clone()) or t)
    build()(ctx)
    assert sorted(json.loads((ctx.out_dir / "per_image_rank1.json").read_text())) == ["img1", "img3"]
    assert reduced[0][-1] == 2  # the item count travels with the sums
    assert not (ctx.out_dir / "metrics.json").exists()  # only rank 0 writes the means


def test_sr_directions_of_its_metrics():
    evaluator = build()
    assert evaluator.is_higher_better("psnr") is True and evaluator.is_higher_better("ssim") is True
    assert evaluator.is_higher_better("lpips") is False and evaluator.is_higher_better("psnr_bicubic") is True
    with pytest.raises(ConfigError, match="no metric 'fid'"):
        evaluator.is_higher_better("fid")


def test_sr_lpips_without_backbone_weights_fails_when_built(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(DataError, match="alexnet-owt-7be5be79.pth"):
        build(metrics=["psnr", "lpips"])


def test_sr_lpips_scores_outputs_with_local_backbone_weights(tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(0)
    file = tmp_path / "alex.pth"
    torch.save({f"features.{k}": v for k, v in alexnet(weights=None).features.state_dict().items()}, file)
    data = PairDataset()
    metrics = build(metrics=["lpips"], lpips_weights=str(file))(context(tmp_path, Oracle(data), data))
    assert metrics["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert build(metrics=["lpips"], lpips_weights=str(file))(context(tmp_path, Nearest(), data))["lpips"] > 0


def test_sr_rejects_an_unknown_metric_naming_the_item():
    with pytest.raises(ConfigError, match=r"eval\.sr\.metrics.*item 1"):
        build(metrics=["psnr", "fid"])


def test_sr_rejects_an_overlap_over_half_the_tile():
    with pytest.raises(ConfigError, match="tile_overlap"):
        build(tile=32, tile_overlap=20)


def test_sr_names_a_missing_network(tmp_path):
    with pytest.raises(ConfigError, match="no network 'enhancer'"):
        build(network="enhancer")(context(tmp_path, Nearest(), PairDataset()))


def test_sr_images_sharing_a_stem_get_distinct_files_whose_psnr_is_the_reported_one(tmp_path):
    data = PairDataset(count=3)
    data.items[0]["path"], data.items[2]["path"] = "/data/set_a/img.png", "/data/set_b/img.png"
    ctx = context(tmp_path, Nearest(), data)
    build(y_channel=False, metrics=["psnr"])(ctx)
    per_image = json.loads((ctx.out_dir / "per_image.json").read_text())
    assert len(per_image) == 3
    for name, values in per_image.items():
        saved = tensor_to_uint8(load_image(ctx.out_dir / f"{name}.png"))
        hq = next(tensor_to_uint8(item["hq"]) for item in data.items
                  if np.array_equal(tensor_to_uint8(Nearest()(item["lq"][None])[0]), saved))
        assert values["psnr"] == pytest.approx(psnr(saved, hq, crop_border=2), abs=1e-12)


def test_sr_images_too_small_for_the_crop_are_a_data_error_naming_the_image(tmp_path):
    data = PairDataset(count=1, size=4)  # 8x8 HQ: SSIM's 11x11 window does not fit
    with pytest.raises(DataError, match="img0.png"):
        build()(context(tmp_path, Nearest(), data))


def test_sr_a_network_of_another_scale_than_the_dataset_is_named_as_such(tmp_path):
    with pytest.raises(DataError, match=r"x4.*x2"):
        build()(context(tmp_path, Nearest(scale=4), PairDataset(scale=2)))
    with pytest.raises(DataError, match="dataset's scale"):  # tiled: the first tile already shows it
        build(tile=8, tile_overlap=2)(context(tmp_path, Nearest(scale=4), PairDataset(scale=2)))


def test_sr_non_finite_outputs_are_warned_about_naming_the_image(tmp_path, caplog):
    class Diverged(Nearest):
        def forward(self, x):
            return super().forward(x) * float("nan")

    with caplog.at_level("WARNING", logger="dlas"):
        build(metrics=["psnr"])(context(tmp_path, Diverged(), PairDataset(count=2)))
    assert "img0" in caplog.text and "img1" in caplog.text and "non-finite" in caplog.text


def test_loss_evaluator_averages_each_loss_over_items_whatever_the_batch_size(tmp_path):
    data = PairDataset(count=5)
    seen = []

    def compute_losses(batch):
        seen.append(len(batch["path"]))
        return {"pix": float(batch["hq"].mean(dim=(1, 2, 3)).sum() / len(batch["path"])), "one": 1.0}

    expected = float(np.mean([item["hq"].mean() for item in data.items]))
    for batch_size in (1, 2):
        ctx = context(tmp_path, Nearest(), data, compute_losses=compute_losses)
        metrics = EVALUATORS.build({"type": "loss", "batch_size": batch_size}, "eval.val_loss")(ctx)
        assert metrics["pix"] == pytest.approx(expected, abs=1e-6) and metrics["one"] == pytest.approx(1.0)
    assert seen == [1, 1, 1, 1, 1, 2, 2, 1]


def test_loss_evaluator_batches_images_of_different_sizes_one_by_one(tmp_path):
    data = PairDataset(count=3)
    data.items[1] = PairDataset(count=1, size=12, seed=1).items[0]  # whole validation images differ in size

    def compute_losses(batch):
        return {"pix": float(batch["hq"].mean(dim=(1, 2, 3)).mean())}

    expected = float(np.mean([item["hq"].mean() for item in data.items]))
    ctx = context(tmp_path, Nearest(), data, compute_losses=compute_losses)
    metrics = EVALUATORS.build({"type": "loss", "batch_size": 4}, "eval.val_loss")(ctx)
    assert metrics["pix"] == pytest.approx(expected, abs=1e-6)


def test_loss_evaluator_metrics_are_lower_is_better():
    assert EVALUATORS.build({"type": "loss"}).is_higher_better("pix") is False
