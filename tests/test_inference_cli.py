"""Specification of dlas-test (``codes/test.py``) on tiny run folders made here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dlas.checkpoint import save_checkpoint, write_best
from dlas.cli.test import main
from dlas.inference import load_image, save_image, tensor_to_uint8

REPO = Path(__file__).resolve().parents[1]


def make_run(root: Path, network_type="eval_tiny_sr", steps=(100, 200), bias_of_step=lambda s: s / 1000) -> Path:
    """A run folder: config.yml + complete checkpoints whose conv bias is step/1000 (EMA: +0.5 of that)."""
    run = root / "experiments" / "tiny"
    run.mkdir(parents=True)
    cfg = {"name": "tiny", "imports": ["eval_nets"],
           "networks": {"generator": {"type": network_type, "scale": 2, "ema": True}},
           "eval": {"val": {"type": "sr", "network": "generator"}}}
    (run / "config.yml").write_text(yaml.safe_dump(cfg))
    for step in steps:
        raw = {"conv.weight": torch.zeros(3, 3, 3, 3), "conv.bias": torch.full((3,), bias_of_step(step))}
        ema = {"conv.weight": torch.zeros(3, 3, 3, 3), "conv.bias": torch.full((3,), 1.5 * bias_of_step(step))}
        save_checkpoint(run, step, {"generator": raw, "generator_ema": ema}, {"step": step})
    return run


def make_images(folder: Path, count=2, size=12, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(30, 150, (size, size + 2, 3), dtype=np.uint8) for _ in range(count)]
    for i, image in enumerate(images):
        save_image(folder / f"im{i}.png", image)
    return images


def output_bias(file: Path, lq: np.ndarray) -> float:
    """The constant the network added to the nearest-upscaled input, read back from the saved output."""
    out = tensor_to_uint8(load_image(file)).astype(float)
    up = np.repeat(np.repeat(lq, 2, axis=0), 2, axis=1).astype(float)
    return float(np.mean(out - up)) / 255


@pytest.fixture
def run_and_inputs(tmp_path):
    run = make_run(tmp_path)
    images = make_images(tmp_path / "lq")
    return run, images, tmp_path


def test_upscales_every_input_with_the_newest_checkpoint_and_ema_weights(run_and_inputs):
    run, images, tmp = run_and_inputs
    assert main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "out"), "--device", "cpu"]) == 0
    for i, lq in enumerate(images):
        file = tmp / "out" / f"im{i}.png"
        assert load_image(file).shape == (3, 24, 28)
        assert output_bias(file, lq) == pytest.approx(0.3, abs=1 / 255)  # step 200, EMA: 1.5 * 0.2


def test_no_ema_step_and_best_pick_the_weights(run_and_inputs):
    run, images, tmp = run_and_inputs
    out = tmp / "out"
    main(["--run", str(run), "--input", str(tmp / "lq" / "im0.png"), "--output", str(out), "--no-ema", "--step", "100"])
    assert output_bias(out / "im0.png", images[0]) == pytest.approx(0.1, abs=1 / 255)
    write_best(run, "val/psnr", 30.0, 100)
    main(["--run", str(run), "--input", str(tmp / "lq" / "im0.png"), "--output", str(out), "--best"])
    assert output_bias(out / "im0.png", images[0]) == pytest.approx(0.15, abs=1 / 255)


def test_a_checkpoint_folder_without_manifest_is_ignored(run_and_inputs):
    run, images, tmp = run_and_inputs
    (run / "checkpoints" / "300").mkdir()
    torch.save({}, run / "checkpoints" / "300" / "state.pt")
    main(["--run", str(run), "--input", str(tmp / "lq" / "im0.png"), "--output", str(tmp / "out")])
    assert output_bias(tmp / "out" / "im0.png", images[0]) == pytest.approx(0.3, abs=1 / 255)


def test_tiled_output_equals_whole_image_output(tmp_path):
    run = make_run(tmp_path)
    make_images(tmp_path / "lq", count=1, size=40)
    # raw weights (bias 0.2 = 51 levels): no output lands on a rounding tie that float noise could flip
    main(["--run", str(run), "--no-ema", "--input", str(tmp_path / "lq"), "--output", str(tmp_path / "whole")])
    main(["--run", str(run), "--no-ema", "--input", str(tmp_path / "lq"), "--output", str(tmp_path / "tiled"),
          "--tile", "16", "--tile-overlap", "8"])
    assert np.array_equal(tensor_to_uint8(load_image(tmp_path / "whole" / "im0.png")),
                          tensor_to_uint8(load_image(tmp_path / "tiled" / "im0.png")))


def test_metrics_against_references_print_a_table_and_write_metrics_json(run_and_inputs, capsys):
    run, images, tmp = run_and_inputs
    # references = exactly what the step-100 raw weights produce, so that checkpoint scores inf
    main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "ref"), "--no-ema", "--step", "100"])
    code = main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "out"),
                 "--metrics", "--reference", str(tmp / "ref")])
    assert code == 0
    table = capsys.readouterr().out
    assert "im0" in table and "im1" in table and "mean" in table and "Y (BT.601)" in table
    written = json.loads((tmp / "out" / "metrics.json").read_text())
    assert set(written["images"]) == {"im0", "im1"}
    # EMA step 200 adds 0.3 where the references have 0.1: a uniform error of 0.2*255 = 51 levels
    assert 10 < written["mean"]["psnr"] < 20 and written["mean"]["ssim"] < 1
    main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "same"), "--no-ema", "--step", "100",
          "--metrics", "psnr", "--reference", str(tmp / "ref")])
    assert json.loads((tmp / "same" / "metrics.json").read_text())["mean"]["psnr"] == float("inf")


def test_several_temperatures_give_one_grid_per_input(tmp_path):
    run = make_run(tmp_path, network_type="eval_tiny_flow", bias_of_step=lambda s: 0.0)
    images = make_images(tmp_path / "lq", count=1)
    assert main(["--run", str(run), "--input", str(tmp_path / "lq"), "--output", str(tmp_path / "out"),
                 "--temperature", "0", "1"]) == 0
    grid = tensor_to_uint8(load_image(tmp_path / "out" / "im0.png")).astype(float)
    assert grid.shape == (24, 56, 3)
    up = np.repeat(np.repeat(images[0], 2, axis=0), 2, axis=1).astype(float)
    assert np.abs(grid[:, :28] - up).max() <= 1
    assert np.abs(grid[:, 28:] - (up + 25.5)).max() <= 1  # temperature 1 brightens by 0.1


def test_temperature_on_a_deterministic_network_is_an_error(run_and_inputs, capsys):
    run, _, tmp = run_and_inputs
    argv = ["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "o"), "--temperature", "0.9"]
    assert main(argv) == 2
    assert "sample" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda run, tmp: ["--input", str(tmp / "missing")], "no such file or folder"),
    (lambda run, tmp: ["--network", "discriminator"], "no network 'discriminator'"),
    (lambda run, tmp: ["--step", "150"], "no complete checkpoint for step 150"),
    (lambda run, tmp: ["--best"], "best.json"),
    (lambda run, tmp: ["--metrics"], "--reference"),
    (lambda run, tmp: ["--tile", "0"], "--tile: must be at least 1"),
    (lambda run, tmp: ["--output", str(tmp / "result.png")], "--output is a folder"),
])
def test_bad_input_is_one_clear_line_and_exit_2(run_and_inputs, capsys, change, message):
    run, _, tmp = run_and_inputs
    args = {"--run": str(run), "--input": str(tmp / "lq"), "--output": str(tmp / "out")}
    extra = change(run, tmp)
    if extra[0] in args:
        args[extra[0]] = extra[1]
        extra = []
    argv = [x for pair in args.items() for x in pair] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_an_unreadable_input_image_is_exit_2_naming_it(run_and_inputs, capsys):
    run, _, tmp = run_and_inputs
    (tmp / "lq" / "zz.png").write_bytes(b"garbage")
    assert main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "out")]) == 2
    assert "zz.png" in capsys.readouterr().err


def test_an_unreadable_image_does_not_stop_the_others_from_being_upscaled(run_and_inputs, capsys):
    run, _, tmp = run_and_inputs
    (tmp / "lq" / "a_broken.png").write_bytes(b"garbage")  # sorted first
    assert main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "out")]) == 2
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["im0.png", "im1.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "a_broken.png" in err[0]


def test_a_run_without_checkpoints_is_exit_2(tmp_path, capsys):
    run = make_run(tmp_path, steps=())
    make_images(tmp_path / "lq", count=1)
    assert main(["--run", str(run), "--input", str(tmp_path / "lq"), "--output", str(tmp_path / "o")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_opt_mode_runs_the_evaluators_of_a_test_config(tmp_path, capsys):
    make_run(tmp_path)
    hq = make_images(tmp_path / "hq", count=2, size=24)
    for i, image in enumerate(hq):  # LQ = every other pixel, so nearest x2 is close to HQ
        save_image(tmp_path / "lqp" / f"im{i}.png", image[::2, ::2])
    weights = tmp_path / "g.safetensors"
    from safetensors.torch import save_file
    save_file({"conv.weight": torch.zeros(3, 3, 3, 3), "conv.bias": torch.zeros(3)}, str(weights))
    cfg = {"name": "t", "imports": ["eval_nets"], "networks": {"generator": {"type": "eval_tiny_sr", "scale": 2}},
           "datasets": {"val": {"type": "paired_folder", "lq_path": str(tmp_path / "lqp"),
                                "hq_path": str(tmp_path / "hq"), "scale": 2, "target_size": None,
                                "use_flip": False, "use_rot": False}},
           "eval": {"sr": {"type": "sr"}}, "path": {"pretrain_model_generator": str(weights)}}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(cfg))
    assert main(["-opt", str(tmp_path / "test.yml"), "--output", str(tmp_path / "res")]) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert {"sr/psnr", "sr/ssim", "sr/psnr_bicubic"} <= set(metrics)
    assert (tmp_path / "res" / "sr" / "im0.png").is_file()
    assert "sr/psnr" in capsys.readouterr().out


def opt_mode_files(tmp_path) -> dict:
    """Paired images, generator weights and the sections of a test config using them."""
    hq = make_images(tmp_path / "hq", count=2, size=24)
    for i, image in enumerate(hq):
        save_image(tmp_path / "lqp" / f"im{i}.png", image[::2, ::2])
    from safetensors.torch import save_file
    save_file({"conv.weight": torch.zeros(3, 3, 3, 3), "conv.bias": torch.zeros(3)}, str(tmp_path / "g.safetensors"))
    return {"name": "t", "imports": ["eval_nets"], "networks": {"generator": {"type": "eval_tiny_sr", "scale": 2}},
            "datasets": {"val": {"type": "paired_folder", "lq_path": str(tmp_path / "lqp"),
                                 "hq_path": str(tmp_path / "hq"), "scale": 2, "target_size": None,
                                 "use_flip": False, "use_rot": False}},
            "eval": {"sr": {"type": "sr", "metrics": ["psnr"]}},
            "path": {"pretrain_model_generator": str(tmp_path / "g.safetensors")}}


def test_opt_mode_follows_base_files(tmp_path, capsys):
    cfg = opt_mode_files(tmp_path)
    evals = cfg.pop("eval")
    (tmp_path / "base.yml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "test.yml").write_text(yaml.safe_dump({"base": "base.yml", "eval": evals}))
    assert main(["-opt", str(tmp_path / "test.yml"), "--output", str(tmp_path / "res")]) == 0, capsys.readouterr().err
    assert "sr/psnr" in json.loads((tmp_path / "res" / "metrics.json").read_text())


def test_opt_mode_evaluates_a_precision_auto_config_exactly_in_fp32(tmp_path, capsys):
    cfg = opt_mode_files(tmp_path)
    scores = {}
    for precision in ("auto", "fp32"):
        (tmp_path / "test.yml").write_text(yaml.safe_dump({**cfg, "precision": precision}))
        out = tmp_path / f"res-{precision}"
        assert main(["-opt", str(tmp_path / "test.yml"), "--output", str(out)]) == 0, capsys.readouterr().err
        scores[precision] = json.loads((out / "metrics.json").read_text())
    assert scores["auto"] == scores["fp32"]


def test_opt_mode_needs_weights_only_for_the_networks_its_evaluators_run(tmp_path, capsys):
    cfg = opt_mode_files(tmp_path)  # a training config reused: its discriminator has no weights and isn't evaluated
    cfg["networks"]["discriminator"] = {"type": "eval_tiny_sr", "scale": 1}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(cfg))
    assert main(["-opt", str(tmp_path / "test.yml"), "--output", str(tmp_path / "res")]) == 0, capsys.readouterr().err
    cfg["eval"]["sr"]["network"] = "discriminator"
    (tmp_path / "test.yml").write_text(yaml.safe_dump(cfg))
    assert main(["-opt", str(tmp_path / "test.yml"), "--output", str(tmp_path / "res")]) == 2
    assert "path.pretrain_model_discriminator" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--input", "x"], ["--tile", "64"], ["--reference", "x"], ["--step", "5"]])
def test_opt_mode_rejects_options_that_only_the_run_mode_uses(tmp_path, capsys, option):
    cfg = opt_mode_files(tmp_path)
    (tmp_path / "test.yml").write_text(yaml.safe_dump(cfg))
    assert main(["-opt", str(tmp_path / "test.yml"), *option]) == 2
    assert option[0] in capsys.readouterr().err


def test_codes_test_py_runs_from_a_checkout_and_exits_2_on_bad_input(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "plugins")}
    result = subprocess.run([sys.executable, str(REPO / "codes" / "test.py"), "--run", str(tmp_path / "nope"),
                             "--input", str(tmp_path), "--output", str(tmp_path / "o")],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr


def test_bf16_and_fp16_outputs_are_close_to_fp32_on_the_cpu_as_in_training(run_and_inputs, capsys):
    run, _, tmp = run_and_inputs
    base = ["--run", str(run), "--input", str(tmp / "lq"), "--device", "cpu"]
    assert main(base + ["--output", str(tmp / "fp32")]) == 0
    assert main(base + ["--output", str(tmp / "bf16"), "--precision", "bf16"]) == 0
    fp32 = tensor_to_uint8(load_image(tmp / "fp32" / "im0.png")).astype(int)
    bf16 = tensor_to_uint8(load_image(tmp / "bf16" / "im0.png")).astype(int)
    assert np.abs(fp32 - bf16).max() <= 2  # bf16 keeps 8 bits of mantissa: about one 8-bit level
    assert main(base + ["--output", str(tmp / "fp16"), "--precision", "fp16"]) == 0
    fp16 = tensor_to_uint8(load_image(tmp / "fp16" / "im0.png")).astype(int)
    assert np.abs(fp32 - fp16).max() <= 1  # fp16 keeps 11 bits of mantissa


def test_real_world_inputs_grayscale_rgba_16_bit_and_odd_sizes_all_come_out_rgb(tmp_path):
    import cv2
    from PIL import Image

    run = make_run(tmp_path, bias_of_step=lambda s: 0.0)  # nearest x2, exactly
    lq = tmp_path / "lq"
    lq.mkdir()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (13, 17), dtype=np.uint8)
    Image.fromarray(gray, "L").save(lq / "gray.png")
    Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)]), "RGBA").save(lq / "rgba.png")
    cv2.imwrite(str(lq / "deep.png"), rng.integers(0, 65536, (9, 1, 3), dtype=np.uint16))
    (lq / "notes.txt").write_text("not an image")
    (lq / "._gray.png").write_bytes(b"\x00\x05\x16\x07 macOS stub")
    assert main(["--run", str(run), "--input", str(lq), "--output", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["deep.png", "gray.png", "rgba.png"]
    up = np.repeat(np.repeat(gray, 2, axis=0), 2, axis=1)
    for name in ("gray.png", "rgba.png"):  # opaque RGBA: the gray values themselves
        assert np.array_equal(tensor_to_uint8(load_image(tmp_path / "out" / name)), np.dstack([up] * 3))
    assert load_image(tmp_path / "out" / "deep.png").shape == (3, 18, 2)


@pytest.mark.parametrize("output", ["afile/out", "afile", "taken"])
def test_an_output_folder_that_cannot_be_written_is_exit_2_naming_it(run_and_inputs, capsys, output):
    run, _, tmp = run_and_inputs
    (tmp / "afile").write_text("a file")
    (tmp / "taken" / "im0.png").mkdir(parents=True)  # a folder where an output image should go
    assert main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert (str(tmp / "afile") if output.startswith("afile") else "im0.png") in err[0]


def test_writing_outputs_over_the_inputs_is_refused(run_and_inputs, capsys):
    run, _, tmp = run_and_inputs
    before = (tmp / "lq" / "im0.png").read_bytes()
    assert main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "lq")]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert (tmp / "lq" / "im0.png").read_bytes() == before


def test_two_inputs_with_the_same_stem_are_refused_before_any_work(run_and_inputs, capsys):
    run, _, tmp = run_and_inputs
    (tmp / "lq" / "im0.jpg").write_bytes((tmp / "lq" / "im0.png").read_bytes())
    assert main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "out")]) == 2
    err = capsys.readouterr().err
    assert "im0.jpg" in err and "im0.png" in err
    assert not (tmp / "out").exists()


def test_an_image_too_small_to_score_is_exit_2_naming_it(tmp_path, capsys):
    run = make_run(tmp_path)
    make_images(tmp_path / "lq", count=1, size=3)  # 6x10 outputs: nothing left after cropping 2 px for SSIM
    main(["--run", str(run), "--input", str(tmp_path / "lq"), "--output", str(tmp_path / "ref")])
    capsys.readouterr()
    assert main(["--run", str(run), "--input", str(tmp_path / "lq"), "--output", str(tmp_path / "out"),
                 "--metrics", "--reference", str(tmp_path / "ref")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "im0.png" in err[0] and "--crop-border" in err[0]


def test_references_up_to_scale_minus_one_pixels_larger_are_cropped_like_basicsr_mod_crop(run_and_inputs):
    run, images, tmp = run_and_inputs
    rng = np.random.default_rng(5)
    refs = [rng.integers(0, 256, (25, 29, 3), dtype=np.uint8) for _ in images]  # LQ 12x14, x2: 24x28 + 1 px
    for i, ref in enumerate(refs):
        save_image(tmp / "hr" / f"im{i}.png", ref)
    assert main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "out"),
                 "--metrics", "psnr", "--reference", str(tmp / "hr")]) == 0
    scores = json.loads((tmp / "out" / "metrics.json").read_text())["images"]
    for i, ref in enumerate(refs):
        out = tensor_to_uint8(load_image(tmp / "out" / f"im{i}.png"))
        assert scores[f"im{i}"]["psnr"] == pytest.approx(psnr_of(out, ref[:24, :28]), abs=1e-9)
    save_image(tmp / "hr" / "im0.png", np.zeros((26, 28, 3), np.uint8))  # a whole scale step larger: wrong pair
    assert main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "out"),
                 "--metrics", "psnr", "--reference", str(tmp / "hr")]) == 2


def test_metrics_of_an_upscaler_come_with_the_bicubic_baseline_of_the_same_inputs(run_and_inputs, capsys):
    import torch.nn.functional as F

    run, images, tmp = run_and_inputs
    rng = np.random.default_rng(6)
    refs = [rng.integers(0, 256, (24, 28, 3), dtype=np.uint8) for _ in images]
    for i, ref in enumerate(refs):
        save_image(tmp / "hr" / f"im{i}.png", ref)
    assert main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "out"),
                 "--metrics", "psnr", "--reference", str(tmp / "hr")]) == 0
    assert "psnr_bicubic" in capsys.readouterr().out.splitlines()[-5]  # a column of the table
    written = json.loads((tmp / "out" / "metrics.json").read_text())
    for i, (lq, ref) in enumerate(zip(images, refs)):
        lq_tensor = torch.from_numpy(lq).permute(2, 0, 1)[None].float() / 255
        bicubic = F.interpolate(lq_tensor, size=(24, 28), mode="bicubic", align_corners=False)[0]
        expected = psnr_of(tensor_to_uint8(bicubic), ref)
        assert written["images"][f"im{i}"]["psnr_bicubic"] == pytest.approx(expected, abs=1e-9)
    assert written["mean"]["psnr_bicubic"] == pytest.approx(np.mean(
        [written["images"][f"im{i}"]["psnr_bicubic"] for i in range(len(images))]))


def psnr_of(out, ref):
    from dlas.metrics import psnr

    return psnr(out, ref, crop_border=2, y_channel=True)


def test_non_finite_outputs_are_warned_about_naming_the_image(tmp_path, capsys):
    run = make_run(tmp_path, bias_of_step=lambda s: float("nan"))  # e.g. an fp16 overflow
    make_images(tmp_path / "lq", count=1)
    assert main(["--run", str(run), "--input", str(tmp_path / "lq"), "--output", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "im0" in err and "non-finite" in err


def test_two_references_with_the_same_stem_are_an_error_not_a_silent_pick(run_and_inputs, capsys):
    run, images, tmp = run_and_inputs
    for i, image in enumerate(images):
        save_image(tmp / "hr" / f"im{i}.png", np.repeat(np.repeat(image, 2, axis=0), 2, axis=1))
    save_image(tmp / "hr" / "im0.jpg", np.zeros((24, 28, 3), np.uint8))
    assert main(["--run", str(run), "--input", str(tmp / "lq"), "--output", str(tmp / "out"),
                 "--metrics", "psnr", "--reference", str(tmp / "hr")]) == 2
    err = capsys.readouterr().err
    assert "im0.jpg" in err and "im0.png" in err


FILE_PLUGIN = '''
import torch
import torch.nn.functional as F
from dlas.registry import NETWORKS


@NETWORKS.register("file_plugin_sr")
class FilePluginSR(torch.nn.Module):
    def __init__(self, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        up = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return up + self.conv(up)
'''


def test_a_run_whose_plugin_file_was_recorded_relative_to_the_training_folder_loads_from_elsewhere(
        tmp_path, monkeypatch):
    run = make_run(tmp_path)  # tmp/experiments/tiny, as `dlas-train` run in tmp writes it
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "my_nets.py").write_text(FILE_PLUGIN)
    cfg = yaml.safe_load((run / "config.yml").read_text())
    cfg["imports"], cfg["networks"]["generator"]["type"] = ["plugins/my_nets.py"], "file_plugin_sr"
    (run / "config.yml").write_text(yaml.safe_dump(cfg))
    make_images(tmp_path / "lq", count=1)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["--run", str(run), "--input", str(tmp_path / "lq"), "--output", str(tmp_path / "out")]) == 0


def test_opt_mode_finds_a_plugin_file_next_to_the_config(tmp_path, monkeypatch):
    cfg = opt_mode_files(tmp_path)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "my_nets.py").write_text(FILE_PLUGIN)
    cfg["imports"], cfg["networks"]["generator"]["type"] = ["my_nets.py"], "file_plugin_sr"
    (tmp_path / "cfg" / "test.yml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["-opt", str(tmp_path / "cfg" / "test.yml"), "--output", str(tmp_path / "res")]) == 0


def test_a_network_that_does_not_output_an_image_is_exit_2_naming_network(tmp_path, capsys):
    run = make_run(tmp_path, network_type="eval_tiny_critic")
    make_images(tmp_path / "lq", count=1)
    assert main(["--run", str(run), "--input", str(tmp_path / "lq"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--network" in err[0]


def test_a_checkpoint_whose_weights_do_not_match_their_manifest_is_refused_naming_it(tmp_path, capsys):
    run = make_run(tmp_path, steps=(100,))
    make_images(tmp_path / "lq", count=1)
    weights = run / "checkpoints" / "100" / "generator_ema.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in a tensor: same size, another sha256
    weights.write_bytes(bytes(data))
    assert main(["--run", str(run), "--input", str(tmp_path / "lq"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint 100 is damaged" in err[0] and "generator_ema.safetensors" in err[0]
    assert not (tmp_path / "out").exists()
