"""A diffusion upsampler trained through a config: resume, precision, validation samples and dlas-test."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from dlas import checkpoint as ckpt
from dlas.cli.test import main as dlas_test
from dlas.cli.train import main as dlas_train
from dlas.inference import load_image, save_image

UNET = {"type": "diffusion_unet", "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
        "attention_at": [2], "norm_groups": 4, "num_heads": 2, "learn_sigma": True}


def config(root: Path, name: str, niter: int, batch: int = 4, **injector) -> dict:
    return {
        "name": name, "seed": 1,
        "datasets": {"train": {"type": "image_folder", "paths": ["skimage:astronaut"], "target_size": 16,
                               "scale": 4, "batch_size": batch, "num_workers": 0},
                     "val": {"type": "image_folder", "paths": ["skimage:coffee"], "target_size": 16, "scale": 4,
                             "use_flip": False, "use_rot": False}},
        "networks": {"generator": UNET},
        "steps": {"generator": {
            "training": ["generator"], "optimizer": {"type": "adam", "lr": 1e-3},
            "injectors": {"diffusion": {"type": "gaussian_diffusion", "network": "generator", "timesteps": 40,
                                        "variance": "learned_range", "sampling_steps": 4, **injector}},
            "losses": {"mse": {"type": "direct", "key": "mse"}, "vb": {"type": "direct", "key": "vb",
                                                                      "weight": 0.001}}}},
        "train": {"niter": niter, "ema": {"rate": 0.9, "networks": ["generator"]}, "val_freq": niter},
        "eval": {"samples": {"type": "samples", "network": "generator", "dataset": "val", "count": 2,
                             "max_items": 1, "metrics": ["psnr"]}},
        "logger": {"print_freq": 1, "save_checkpoint_freq": 3, "tensorboard": False},
        "path": {"root": str(root)},
    }


def run(root: Path, name: str, niter: int, batch: int = 4, **injector) -> Path:
    file = root / f"{name}-{niter}.yml"
    file.write_text(yaml.safe_dump(config(root, name, niter, batch, **injector)))
    assert dlas_train(["-opt", str(file)]) == 0
    return root / name


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = ckpt.checkpoint_root(run_dir) / str(step)
    return {f"{f.stem}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, one_torch_thread) -> Path:
    return run(tmp_path_factory.mktemp("diffusion"), "upsampler", 3)


def test_a_resumed_run_with_loss_aware_timesteps_equals_an_uninterrupted_one(tmp_path, one_torch_thread):
    # T = 2 with 10 losses per step: after 4 iterations of 8 samples the sampler has left its uniform warm-up
    short = {"batch": 8, "timesteps": 2, "schedule": "cosine", "sampling_steps": 2, "timestep_sampler": "loss_aware"}
    full = run(tmp_path, "full", 5, **short)
    run(tmp_path, "split", 4, **short)
    split = run(tmp_path, "split", 5, **short)
    sampler = ckpt.load_state(ckpt.checkpoint_root(split) / "4")["steps"]["generator"]["injectors"]["diffusion"]
    assert sampler["timestep_sampler"]["counts"].min() >= 10  # warmed up: the history decides the next draws
    a, b = weights(full, 5), weights(split, 5)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_samples_fixed_inputs_and_scores_them_against_the_reference(trained_run):
    metrics = json.loads((trained_run / "val" / "3" / "metrics.json").read_text())
    assert 0 < metrics["samples/psnr"] < 60
    grid = load_image(trained_run / "val" / "3" / "samples" / "grid.png")
    assert grid.shape[-2:] == (16 + 4, 2 * 16 + 6)  # one input, two samples, 2px padding
    # beside the samples' score, bicubic upscaling's of the same input under the same convention
    import torch.nn.functional as F

    from dlas.build import build_datasets, read_run_config
    from dlas.metrics import psnr
    from dlas.metrics.convention import tensor_to_uint8

    cfg = read_run_config(trained_run)
    item = build_datasets({**cfg, "datasets": {"val": cfg["datasets"]["val"]}})["val"][0]
    bicubic = F.interpolate(item["lq"][None].float(), size=item["hq"].shape[-2:], mode="bicubic", align_corners=False)
    expected = psnr(tensor_to_uint8(bicubic[0]), tensor_to_uint8(item["hq"]), 0, False)
    assert metrics["samples/psnr_bicubic"] == pytest.approx(expected, abs=1e-9)


def test_dlas_test_upsamples_images_with_the_runs_schedule_and_scores_them(trained_run, tmp_path, capsys):
    image = torch.rand(3, 32, 40)
    save_image(tmp_path / "hr" / "im.png", image)
    save_image(tmp_path / "lr" / "im.png", F.avg_pool2d(image[None], 4)[0])
    code = dlas_test(["--run", str(trained_run), "--input", str(tmp_path / "lr"), "--output", str(tmp_path / "out"),
                      "--reference", str(tmp_path / "hr"), "--metrics", "psnr", "--task-option", "steps=2"])
    assert code == 0, capsys.readouterr().err
    assert load_image(tmp_path / "out" / "im.png").shape == (3, 32, 40)
    assert "psnr" in json.loads((tmp_path / "out" / "metrics.json").read_text())["mean"]


def test_the_run_config_records_the_injector_the_task_reads(trained_run):
    entry = yaml.safe_load((trained_run / "config.yml").read_text())["steps"]["generator"]["injectors"]["diffusion"]
    assert entry["type"] == "gaussian_diffusion" and entry["timesteps"] == 40


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_gives_finite_float32_losses(tmp_path, precision, one_torch_thread):
    from dlas.context import Context
    from dlas.injectors.diffusion import GaussianDiffusionInjector
    from dlas.models.diffusion.unet import DiffusionUNet

    net = DiffusionUNet(**{k: v for k, v in UNET.items() if k != "type"})
    injector = GaussianDiffusionInjector(network="g", timesteps=100, variance="learned_range")
    hq = torch.rand(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16" else torch.float16):
        out = injector({"hq": hq, "lq": F.avg_pool2d(hq, 4)}, Context(networks={"g": net}))
    for key in ("mse", "vb"):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key])
