"""Inference tasks for every family: dlas-test and the evaluators sample, reconstruct and upscale through them."""
from __future__ import annotations

import json
from pathlib import Path

import eval_nets  # noqa: F401  (registers the toy networks)
import numpy as np
import pytest
import torch
import yaml

from dlas.build import RunNetworks, autocast
from dlas.checkpoint import save_checkpoint
from dlas.cli.test import main
from dlas.errors import ConfigError
from dlas.inference import load_image, save_image, tensor_to_uint8
from dlas.inference.tasks import Request, build_task, default_task, recipe_task_options

CPU = torch.device("cpu")


def make_run(root: Path, network_type: str, bias: float = 0.0, evaluators: dict = None) -> Path:
    run = root / "experiments" / network_type
    run.mkdir(parents=True)
    cfg = {"name": network_type, "imports": ["eval_nets"], "networks": {"generator": {"type": network_type}},
           "eval": evaluators or {}}
    (run / "config.yml").write_text(yaml.safe_dump(cfg))
    weights = {"conv.weight": torch.zeros(3, 3, 3, 3), "conv.bias": torch.full((3,), bias)}
    save_checkpoint(run, 10, {"generator": weights}, {"step": 10})
    return run


def pixels(file: Path) -> np.ndarray:
    return tensor_to_uint8(load_image(file)).astype(int)


@pytest.fixture
def sampler(tmp_path) -> Path:
    return make_run(tmp_path, "eval_tiny_sampler")


def test_a_network_names_its_default_task():
    assert default_task({"networks": {"generator": {"type": "eval_tiny_sampler"}}}) == "sample"
    assert default_task({"networks": {"generator": {"type": "eval_tiny_sr"}}}) == "upscale"


def test_unconditional_samples_are_seeded_one_file_each_plus_a_grid(sampler, tmp_path):
    out = tmp_path / "out"
    assert main(["--run", str(sampler), "--output", str(out), "--n", "3", "--seed", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", *(f"sample_seed5_{k}.png" for k in range(3))]
    assert main(["--run", str(sampler), "--output", str(tmp_path / "again"), "--n", "1", "--seed", "5"]) == 0
    assert np.array_equal(pixels(out / "sample_seed5_0.png"), pixels(tmp_path / "again" / "sample_seed5_0.png"))
    assert main(["--run", str(sampler), "--output", str(tmp_path / "other"), "--seed", "6"]) == 0
    assert not np.array_equal(pixels(out / "sample_seed5_0.png"), pixels(tmp_path / "other" / "sample_seed6_0.png"))


def test_captions_from_the_command_line_and_a_file_each_get_their_samples(sampler, tmp_path):
    (tmp_path / "captions.txt").write_text("a red circle\n\nabc\n")
    out = tmp_path / "out"
    assert main(["--run", str(sampler), "--output", str(out), "--caption", "x", "--captions",
                 str(tmp_path / "captions.txt"), "--task-option", "temperature=0"]) == 0
    names = {"x_seed0_0.png", "a_red_circle_seed0_0.png", "abc_seed0_0.png", "grid.png"}
    assert {p.name for p in out.iterdir()} == names
    # temperature 0: each image is its caption's grey level (length mod 10, in tenths)
    assert pixels(out / "a_red_circle_seed0_0.png").mean() == pytest.approx(0.2 * 255, abs=1)
    assert pixels(out / "abc_seed0_0.png").mean() == pytest.approx(0.3 * 255, abs=1)


def test_a_run_samples_with_its_own_evaluator_s_options_unless_a_flag_says_otherwise(tmp_path, capsys):
    still = {"samples": {"type": "samples", "network": "generator", "options": {"temperature": 0}}}
    run = make_run(tmp_path, "eval_tiny_sampler", evaluators=still)
    assert main(["--run", str(run), "--output", str(tmp_path / "recipe"), "--caption", "abc", "--n", "2"]) == 0
    assert "sample options from the run's eval.samples: temperature=0" in capsys.readouterr().out
    recipe = pixels(tmp_path / "recipe" / "abc_seed0_0.png")
    assert recipe.min() == recipe.max() == pytest.approx(0.3 * 255, abs=1)  # temperature 0: no noise at all
    out = tmp_path / "flag"
    assert main(["--run", str(run), "--output", str(out), "--caption", "abc", "--task-option", "temperature=1"]) == 0
    assert "options from the run's" not in capsys.readouterr().out
    assert pixels(out / "abc_seed0_0.png").std() > 5  # the flag's temperature, not the recipe's


def test_a_recipe_s_options_for_another_network_or_task_are_not_inherited():
    config = {"networks": {"generator": {"type": "eval_tiny_sampler"}, "other": {"type": "eval_tiny_sampler"}},
              "eval": {"a": {"type": "samples", "network": "other", "options": {"temperature": 0}},
                       "b": {"type": "samples", "network": "generator", "task": "upscale", "options": {"tile": 8}},
                       "c": {"type": "samples", "network": "generator", "options": {"network": "x", "temperature": 2}}}}
    assert recipe_task_options(config, "sample", "generator") == ("eval.c", {"temperature": 2})
    assert recipe_task_options(config, "sample", "other") == ("eval.a", {"temperature": 0})
    assert recipe_task_options(config, "reconstruct", "generator") == ("", {})
    assert recipe_task_options({"networks": config["networks"]}, "sample") == ("", {})


@pytest.mark.parametrize("extra, flag, message", [
    (["--input", "IMAGES"], "--input", "takes no input images"),
    (["--tile", "32"], "--tile", "does not apply to this task"),
    (["--task", "smaple"], "--task", "did you mean 'sample'"),
    (["--task-option", "temprature=1"], "--task-option temprature", "did you mean 'temperature'"),
    (["--task-option", "temperature=hot"], "--task-option temperature", "expected"),
    (["--n", "0"], "--n", "at least 1"),
])
def test_a_wrong_option_for_the_task_is_one_line_naming_the_flag(sampler, tmp_path, capsys, extra, flag, message):
    save_image(tmp_path / "img.png", np.zeros((8, 8, 3), np.uint8))
    extra = [str(tmp_path / "img.png") if x == "IMAGES" else x for x in extra]
    assert main(["--run", str(sampler), "--output", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}") and message in err[0], err


def test_reconstruct_pads_to_the_networks_multiple_and_returns_the_input_size():
    net = eval_nets.EvalTinyAutoencoder()
    task = build_task("reconstruct", {"generator": net}, {}, CPU, autocast("fp32", CPU))
    image = torch.rand(3, 10, 14)
    (output,) = task(Request("x", image=image))
    assert output.shape == (3, 10, 14) and torch.allclose(output, image, atol=1e-6)


def test_a_network_that_does_not_reconstruct_is_a_config_error_naming_it():
    task = build_task("reconstruct", {"generator": eval_nets.EvalTinySR(scale=2)}, {}, CPU, autocast("fp32", CPU))
    with pytest.raises(ConfigError, match="does not reconstruct images"):
        task(Request("x", image=torch.rand(3, 8, 8)))


def test_dlas_test_reconstructs_and_scores_against_references(tmp_path, capsys):
    run = make_run(tmp_path, "eval_tiny_autoencoder", bias=0.1)
    image = np.random.default_rng(0).integers(0, 200, (10, 14, 3), dtype=np.uint8)
    save_image(tmp_path / "in" / "a.png", image)
    out = tmp_path / "out"
    assert main(["--run", str(run), "--task", "reconstruct", "--input", str(tmp_path / "in"), "--output", str(out),
                 "--metrics", "psnr", "--reference", str(tmp_path / "in"), "--crop-border", "0",
                 "--channel", "rgb"]) == 0
    assert pixels(out / "a.png").shape == (10, 14, 3)
    assert (pixels(out / "a.png") - image).mean() == pytest.approx(25.5, abs=1)  # + the 0.1 bias
    assert json.loads((out / "metrics.json").read_text())["mean"]["psnr"] == pytest.approx(20 * np.log10(255 / 25.5),
                                                                                           abs=0.3)


def test_run_networks_build_and_load_only_what_is_asked_for(tmp_path):
    run = make_run(tmp_path, "eval_tiny_sr", bias=0.25)
    networks = RunNetworks(run, ema=False)
    assert networks.step == 10 and list(networks) == ["generator"] and not networks._loaded
    assert float(networks["generator"].conv.bias[0]) == 0.25


def opt_config(tmp_path: Path, evaluators: dict, network: str) -> Path:
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(3, 3, 3, 3), "conv.bias": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    images = np.random.default_rng(1).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        save_image(tmp_path / "photos" / f"p{i}.png", image)
    cfg = {"imports": ["eval_nets"], "networks": {"generator": {"type": network}},
           "datasets": {"val": {"type": "image_folder", "paths": [str(tmp_path / "photos")], "target_size": 16,
                                "scale": 1, "use_flip": False, "use_rot": False}},
           "eval": evaluators, "path": {"pretrain_model_generator": str(tmp_path / "w.safetensors")}}
    file = tmp_path / "check.yml"
    file.write_text(yaml.safe_dump(cfg))
    return file


def test_the_samples_evaluator_writes_a_grid_of_fixed_seeded_samples(tmp_path, capsys):
    config = opt_config(tmp_path, {"show": {"type": "samples", "captions": ["ab", "abcd"], "count": 2}},
                        "eval_tiny_sampler")
    assert main(["-opt", str(config), "--output", str(tmp_path / "res")]) == 0, capsys.readouterr().err
    grid = pixels(tmp_path / "res" / "show" / "grid.png")
    assert grid.shape == (2 * 10 + 2, 2 * 10 + 2, 3)  # two rows (captions) of two 8x8 samples, 2 px apart
    assert main(["-opt", str(config), "--output", str(tmp_path / "again")]) == 0
    assert np.array_equal(grid, pixels(tmp_path / "again" / "show" / "grid.png"))


def test_the_reconstruction_evaluator_scores_held_out_images(tmp_path, capsys):
    config = opt_config(tmp_path, {"rec": {"type": "reconstruction", "metrics": ["psnr"]}}, "eval_tiny_autoencoder")
    assert main(["-opt", str(config), "--output", str(tmp_path / "res")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "rec/psnr: inf" in out and "reconstruction psnr inf" in out  # zero-initialised: exact reconstruction
    assert (tmp_path / "res" / "rec" / "p0.png").is_file()


def test_a_test_config_is_validated_like_a_training_config(tmp_path, capsys):
    config = opt_config(tmp_path, {"rec": {"type": "reconstruction", "metrcs": ["psnr"]}}, "eval_tiny_autoencoder")
    assert main(["-opt", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.rec.metrcs" in err[0] and "did you mean 'metrics'" in err[0]
    assert "check.yml:" in err[0]  # file:line of the typo


def test_a_test_config_without_a_name_writes_results_under_its_file_name(tmp_path, capsys, monkeypatch):
    config = opt_config(tmp_path, {"rec": {"type": "reconstruction", "metrics": ["psnr"]}}, "eval_tiny_autoencoder")
    monkeypatch.chdir(tmp_path)
    assert main(["-opt", str(config)]) == 0, capsys.readouterr().err
    assert (tmp_path / "results" / "check" / "metrics.json").is_file()
