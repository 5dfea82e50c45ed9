"""options/srflow_x4.yml: it validates, and it trains from scratch (with a warning) when shrunk to test size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dlas.inference import save_image, tensor_to_uint8

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "options/srflow_x4.yml"
TINY_NETWORK = ["networks.generator.nf=8", "networks.generator.nb=2", "networks.generator.K=2",
                "networks.generator.hidden_channels=8", "networks.generator.encoder_blocks=[0,1]"]


@pytest.fixture
def data_overrides(tmp_path) -> list[str]:
    """The recipe pointed at scikit-image's sample photos (train) and one HQ/LQ pair named like DIV2K's (val)."""
    hq_dir, lq_dir = tmp_path / "hr", tmp_path / "lr"
    hq = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    lq = F.interpolate(hq[None], scale_factor=0.25, mode="bicubic", antialias=True)[0]
    save_image(hq_dir / "0801.png", tensor_to_uint8(hq))
    save_image(lq_dir / "0801x4.png", tensor_to_uint8(lq))
    return ["datasets.train.paths=[skimage:color]", f"datasets.val.hq_path={hq_dir}", f"datasets.val.lq_path={lq_dir}",
            "datasets.train.num_workers=0", f"path.root={tmp_path / 'runs'}", "device=cpu"]


def run_train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "codes"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "codes/train.py", "-opt", RECIPE, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_recipe_validates_and_warns_that_the_encoder_starts_from_scratch(data_overrides):
    result = run_train("--validate", *data_overrides)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout + result.stderr
    assert "starts from scratch" in result.stderr


def test_recipe_trains_and_validates_at_test_size(data_overrides, tmp_path):
    result = run_train(*data_overrides, *TINY_NETWORK, "datasets.train.target_size=32", "datasets.train.batch_size=2",
                       "networks.generator.train_encoder_after=1", "train.niter=2", "train.val_freq=2",
                       "eval.srflow.center_crop=32", "logger.save_checkpoint_freq=2")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "runs" / "srflow_x4" / "val" / "2" / "srflow" / "metrics.json").read_text())
    assert {"nll", "psnr_t0", "psnr_t0.9", "lr_psnr_t0.9"} <= set(metrics)
    assert all(isinstance(metrics[k], float) for k in ("nll", "psnr_t0"))
