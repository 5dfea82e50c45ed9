"""scripts/triforce_sample.py: caption -> transformer tokens -> dVAE decode -> diffusion upsampling -> PNG, on tiny
untrained runs (the pipeline, not the quality: scripts/bench/triforce_colors.py measures that)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from dlas import checkpoint as ckpt
from dlas.inference import load_image
from dlas.registry import NETWORKS
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")

spec = importlib.util.spec_from_file_location("triforce_sample", REPO / "scripts" / "triforce_sample.py")
triforce_sample = importlib.util.module_from_spec(spec)
spec.loader.exec_module(triforce_sample)

DVAE = {"type": "dvae", "codebook_size": 16, "width": 8, "codebook_dim": 8, "downsample": 4}
DALLE = {"type": "dalle", "tokenizer": "bytes", "text_vocab_size": 258, "text_length": 64, "image_vocab_size": 16,
         "image_grid": 4, "width": 16, "depth": 1, "heads": 2}
UNET = {"type": "diffusion_unet", "scale": 2, "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
        "attention_at": [2], "norm_groups": 4, "num_heads": 2}
DIFFUSION_STEPS = {"upsample": {"training": ["generator"], "optimizer": {"type": "adam"}, "injectors": {
    "diffusion": {"type": "gaussian_diffusion", "network": "generator", "timesteps": 50, "sampling_steps": 3}},
    "losses": {"mse": {"type": "direct", "key": "mse"}}}}
CAPTION = "a large red circle in the center on a blue background"


RECIPE_SAMPLING = {"samples": {"type": "samples", "network": "dalle", "captions": [CAPTION],
                               "options": {"guidance_scale": 1.5, "temperature": 0.5}}}


def make_run(folder: Path, networks: dict, steps: dict | None = None, evaluators: dict | None = None) -> Path:
    """A run folder as training leaves it: config.yml and one complete checkpoint (random weights, EMA too)."""
    folder.mkdir(parents=True)
    (folder / "config.yml").write_text(yaml.safe_dump({"name": folder.name, "networks": networks,
                                                       "steps": steps or {}, "eval": evaluators or {}}))
    torch.manual_seed(len(folder.name))
    weights = {}
    for name, entry in networks.items():
        state = NETWORKS.build(dict(entry), f"networks.{name}").state_dict()
        weights.update({name: state, f"{name}_ema": state})
    ckpt.save_checkpoint(folder, 5, weights, {"step": 5})
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("triforce")
    return {"dvae": make_run(root / "dvae", {"dvae": DVAE}),
            "dalle": make_run(root / "dalle", {"dalle": DALLE, "dvae": DVAE}, evaluators=RECIPE_SAMPLING),
            "diffusion": make_run(root / "diffusion", {"generator": UNET}, DIFFUSION_STEPS)}


def sample(runs: dict[str, Path], output: Path, *extra) -> int:
    args = ["--dvae", runs["dvae"], "--dalle", runs["dalle"], "--diffusion", runs["diffusion"], "--output", output,
            "--device", "cpu", *extra]
    return triforce_sample.main([str(a) for a in args])


def test_a_caption_becomes_n_upsampled_pngs_named_by_caption_and_seed_and_a_grid(runs, tmp_path):
    assert sample(runs, tmp_path / "out", "--caption", CAPTION, "--n", 3, "--seed", 4, "--save-decodes") == 0
    stem = "a_large_red_circle_in_the_center_on_a_blue_background_seed4"
    for k in range(3):
        assert load_image(tmp_path / "out" / f"{stem}_{k}.png").shape == (3, 32, 32)  # 16 px decode x 2
        assert load_image(tmp_path / "out" / f"{stem}_{k}_decode.png").shape == (3, 16, 16)
    assert load_image(tmp_path / "out" / "grid.png").shape == (3, 32 + 4, 3 * 34 + 2)


def test_the_same_seed_gives_the_same_pictures_and_another_seed_others(runs, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert sample(runs, tmp_path / name, "--caption", "red circle", "--n", 2, "--seed", seed, "--steps", 2) == 0
    first = load_image(tmp_path / "a" / "red_circle_seed1_1.png")
    assert torch.equal(first, load_image(tmp_path / "b" / "red_circle_seed1_1.png"))
    assert not torch.equal(first, load_image(tmp_path / "c" / "red_circle_seed2_1.png"))


def test_captions_are_read_from_a_file_one_per_line(runs, tmp_path):
    (tmp_path / "captions.txt").write_text("# shapes\nred circle\n\nsmall blue square\n")
    assert sample(runs, tmp_path / "out", "--captions", tmp_path / "captions.txt", "--n", 1, "--steps", 2) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grid.png", "red_circle_seed0_0.png",
                                                                    "small_blue_square_seed0_0.png"]
    assert load_image(tmp_path / "out" / "grid.png").shape == (3, 2 * 34 + 2, 34 + 2)


@pytest.mark.parametrize("flag, broken, message", [
    ("--dalle", "missing", "does not exist"),
    ("--diffusion", "no_checkpoint", "no complete checkpoint"),
    ("--dvae", "wrong_kind", "has no dvae network"),
])
def test_a_wrong_or_incomplete_run_folder_is_exit_2_naming_it(runs, tmp_path, capsys, flag, broken, message):
    folder = tmp_path / broken
    if broken == "no_checkpoint":
        folder.mkdir()
        (folder / "config.yml").write_text((runs["diffusion"] / "config.yml").read_text())
    elif broken == "wrong_kind":
        folder = runs["diffusion"]
    bad = {**runs, flag[2:]: folder}
    assert sample(bad, tmp_path / "out", "--caption", CAPTION) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}: {folder}" in err and message in err and "Traceback" not in err


def pipeline_sampling(runs: dict[str, Path], *flags) -> dict:
    args = triforce_sample.parse_args([str(a) for a in ["--dvae", runs["dvae"], "--dalle", runs["dalle"],
                                                        "--diffusion", runs["diffusion"], "--output", "x", *flags]])
    return triforce_sample.Pipeline(args, torch.device("cpu")).sampling


def test_the_transformer_samples_as_its_run_s_evaluators_do_unless_a_flag_says_otherwise(runs, tmp_path):
    assert pipeline_sampling(runs) == {"temperature": 0.5, "top_k": None, "guidance_scale": 1.5}
    assert pipeline_sampling(runs, "--temperature", 1, "--top-k", 3) == \
        {"temperature": 1.0, "top_k": 3, "guidance_scale": 1.5}
    plain = {**runs, "dalle": make_run(tmp_path / "plain", {"dalle": DALLE, "dvae": DVAE})}
    assert pipeline_sampling(plain) == {"temperature": 1.0, "top_k": None, "guidance_scale": None}


def test_dlas_test_samples_a_dalle_run_with_its_recipe_s_options_and_the_temperature_flag_replaces_one(
        runs, tmp_path, capsys):
    from dlas.cli.test import main as dlas_test

    assert dlas_test(["--run", str(runs["dalle"]), "--caption", CAPTION, "--n", "1", "--device", "cpu",
                      "--output", str(tmp_path / "a")]) == 0
    assert "dalle options from the run's eval.samples: guidance_scale=1.5, temperature=0.5" in capsys.readouterr().out
    assert dlas_test(["--run", str(runs["dalle"]), "--caption", CAPTION, "--n", "1", "--device", "cpu",
                      "--temperature", "0.7", "1.0", "--output", str(tmp_path / "b")]) == 0
    assert "from the run's eval.samples: guidance_scale=1.5 (" in capsys.readouterr().out
    assert len(list((tmp_path / "b").glob("*_seed0_*.png"))) == 2  # one sample at each flag temperature


def test_no_caption_is_exit_2(runs, tmp_path, capsys):
    assert sample(runs, tmp_path / "out") == 2
    assert "error: --caption" in capsys.readouterr().err


bench_spec = importlib.util.spec_from_file_location("triforce_colors", REPO / "scripts/bench/triforce_colors.py")
triforce_colors = importlib.util.module_from_spec(bench_spec)
bench_spec.loader.exec_module(triforce_colors)


def colors_bench(runs: dict[str, Path], *extra) -> int:
    args = ["--dvae", runs["dvae"], "--dalle", runs["dalle"], "--diffusion", runs["diffusion"], "--device", "cpu",
            "--captions", 2, "--steps", 2, "--holdout", "red circle", *extra]
    return triforce_colors.main([str(a) for a in args])


def test_the_colours_bench_rates_seen_and_held_out_captions_with_the_sampling_options_it_was_given(runs, tmp_path):
    assert colors_bench(runs, "--temperature", 0.8, "--top-k", 4, "--json", tmp_path / "c.json") == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert (report["temperature"], report["top_k"], report["holdout"]) == (0.8, 4, ["red circle"])
    assert report["guidance_scale"] == 1.5  # the dalle run's own sampling, unless told otherwise
    assert set(report["rates"]) == {"seen", "held-out"}
    for kinds in report["rates"].values():
        assert all(0 <= rate <= 1 for rates in kinds.values() for rate in rates.values())
    assert [(r["group"], len(r["upsampled"]), len(r["decode"])) for r in report["captions"]] == \
        [("seen", 1, 1)] * 2 + [("held-out", 1, 1)] * 2  # every caption, kept with what its pictures show
    assert set(report["rates_by_size"]) == {"seen", "held-out"}


def test_the_colours_bench_rates_are_shares_of_pictures_per_group_and_size():
    def record(group, size, shown_colors, kind="circle"):
        readings = [{"color": c, "background": "blue", "shape": kind} for c in shown_colors]
        return {"group": group, "caption": "", "color": "red", "background": "blue", "shape": "circle",
                "size": size, "upsampled": readings, "decode": readings[:1]}

    records = [record("seen", "small", ["red", "green"]), record("seen", "large", ["red", "red"], "square"),
               record("held-out", "large", ["green", "green"])]
    results, by_size = triforce_colors.summarize(records)
    assert results["seen"]["upsampled"] == {"background": 1.0, "shape colour": 0.75, "both colours": 0.75,
                                            "shape kind": 0.5}
    assert results["seen"]["decode"]["shape colour"] == 1.0 and results["held-out"]["upsampled"]["shape colour"] == 0
    assert by_size["seen"]["small"]["shape colour"] == 0.5 and by_size["seen"]["large"]["shape colour"] == 1.0
    assert by_size["seen"]["large"]["shape kind"] == 0.0 and set(by_size["held-out"]) == {"large"}


@pytest.mark.parametrize("flag, option", [("--temperature", "temperature"), ("--top-k", "top_k")])
def test_the_colours_bench_names_a_bad_sampling_option_with_exit_2(runs, capsys, flag, option):
    assert colors_bench(runs, flag, 0) == 2
    assert option in capsys.readouterr().err
