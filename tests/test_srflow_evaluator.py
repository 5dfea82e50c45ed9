"""The `srflow` evaluator: NLL, sample PSNR at each temperature and LR-consistency, reproducibly."""
from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError
from dlas.evaluators.base import EvalContext
from dlas.inference import tensor_to_uint8
from dlas.metrics import psnr
from dlas.models.srflow.srflow import SRFlow
from dlas.registry import EVALUATORS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _items(count: int = 2, size: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(count):
        hq = torch.rand(3, size, size, generator=g)
        lq = F.interpolate(hq[None], scale_factor=0.25, mode="bicubic", antialias=True)[0].clamp(0, 1)
        items.append({"hq": hq, "lq": lq, "path": f"/data/img{i}.png"})
    return items


def _net() -> SRFlow:
    torch.manual_seed(0)
    net = SRFlow(nf=8, nb=1, gc=8, K=2, L=2, hidden_channels=8, encoder_blocks=[0], scale=4)
    items = _items()
    net.train()
    net(torch.stack([i["hq"] for i in items]), torch.stack([i["lq"] for i in items]))
    return net.eval()


def _ctx(tmp_path, net: nn.Module, data: list[dict]) -> EvalContext:
    return EvalContext(networks={"generator": net}, datasets={"val": data}, out_dir=tmp_path / "val" / "1" / "srflow",
                       step=1, device=torch.device("cpu"), autocast=contextlib.nullcontext)


def _build(**options):
    return EVALUATORS.build({"type": "srflow", **options}, "eval.srflow")


def test_reports_nll_and_per_temperature_psnr_and_lr_psnr(tmp_path):
    metrics = _build(temperatures=[0, 0.9])(_ctx(tmp_path, _net(), _items()))
    assert set(metrics) == {"nll", "nll_srflow", "psnr_t0", "psnr_t0.9", "lr_psnr_t0", "lr_psnr_t0.9",
                            "nonfinite_t0", "nonfinite_t0.9"}
    assert metrics["nonfinite_t0"] == 0 and metrics["nonfinite_t0.9"] == 0
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 < metrics["nll"] < 20
    assert metrics["nll_srflow"] == pytest.approx(3 * (metrics["nll"] - 8) + 8, rel=1e-4)


def test_temperature_zero_psnr_is_that_of_the_deterministic_sample(tmp_path):
    net, items = _net(), _items()
    metrics = _build(temperatures=[0])(_ctx(tmp_path, net, items))
    expected = []
    for item in items:
        sr = net.sample(item["lq"][None], temperature=0.0)
        expected.append(psnr(tensor_to_uint8(sr[0]), tensor_to_uint8(item["hq"])))
    assert metrics["psnr_t0"] == pytest.approx(sum(expected) / len(expected))


def test_lr_psnr_compares_the_downscaled_sample_with_the_lq_input(tmp_path):
    net, items = _net(), _items(count=1)
    metrics = _build(temperatures=[0])(_ctx(tmp_path, net, items))
    sr = tensor_to_uint8(net.sample(items[0]["lq"][None], temperature=0.0)[0])
    sr = torch.from_numpy(sr).permute(2, 0, 1)[None].float() / 255
    down = F.interpolate(sr, size=(4, 4), mode="bicubic", align_corners=False, antialias=True)
    expected = psnr(tensor_to_uint8(down[0]), tensor_to_uint8(items[0]["lq"]))
    assert metrics["lr_psnr_t0"] == pytest.approx(expected)


def test_numbers_are_reproducible_and_leave_the_global_rng_alone(tmp_path):
    net, items = _net(), _items()
    evaluator = _build(temperatures=[0.9])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = evaluator(_ctx(tmp_path, net, items))
    assert torch.equal(torch.get_rng_state(), state)
    assert evaluator(_ctx(tmp_path, net, items)) == first


def test_writes_metrics_and_one_image_per_temperature(tmp_path):
    ctx = _ctx(tmp_path, _net(), _items())
    _build(temperatures=[0, 0.5])(ctx)
    saved = json.loads((ctx.out_dir / "metrics.json").read_text())
    assert saved["step"] == 1 and "psnr_t0.5" in saved and "convention" in saved
    assert sorted(p.name for p in ctx.out_dir.glob("*.png")) == ["img0_t0.5.png", "img0_t0.png", "img1_t0.5.png",
                                                                  "img1_t0.png"]


def test_centre_crop_bounds_the_evaluated_size(tmp_path):
    net, items = _net(), _items(count=1, size=32)
    metrics = _build(temperatures=[0], center_crop=16, save_images=True)(_ctx(tmp_path, net, items))
    from PIL import Image

    assert Image.open(tmp_path / "val" / "1" / "srflow" / "img0_t0.png").size == (16, 16)
    assert math.isfinite(metrics["nll"])


def test_nll_and_psnr_directions_for_keep_best():
    evaluator = _build(temperatures=[0.9])
    assert evaluator.is_higher_better("psnr_t0.9") and evaluator.is_higher_better("lr_psnr_t0.9")
    assert not evaluator.is_higher_better("nll")


def test_a_network_that_is_not_srflow_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not an srflow network"):
        _build()(_ctx(tmp_path, nn.Conv2d(3, 3, 1), _items()))


def test_negative_temperature_is_a_config_error():
    with pytest.raises(ConfigError, match="temperatures"):
        _build(temperatures=[-0.1])


def test_a_sample_that_diverges_is_counted_and_does_not_stop_evaluation(tmp_path, caplog):
    net = _net()
    with torch.no_grad():
        net.levels[1].steps[0].coupling.net[-1].bias.fill_(float("inf"))
    metrics = _build(temperatures=[0.9])(_ctx(tmp_path, net, _items()))
    assert metrics["nonfinite_t0.9"] == 1.0
    assert "level 2/2, step 1/2 coupling" in caplog.text


def test_images_sharing_a_stem_keep_their_own_files_and_numbers(tmp_path):
    items = _items(count=2)
    items[0]["path"], items[1]["path"] = "/data/a/img.png", "/data/b/img.png"
    ctx = _ctx(tmp_path, _net(), items)
    _build(temperatures=[0])(ctx)
    per_image = json.loads((ctx.out_dir / "per_image.json").read_text())
    assert len(per_image) == 2 and len(list(ctx.out_dir.glob("*.png"))) == 2


def test_a_large_seed_works(tmp_path):
    metrics = _build(temperatures=[0.5], seed=2**62)(_ctx(tmp_path, _net(), _items(count=1)))
    assert math.isfinite(metrics["psnr_t0.5"])
