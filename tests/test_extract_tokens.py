"""scripts/extract_tokens.py: a dVAE run's tokens of a dataset, resumable, and exit 2 for a wrong run folder."""
from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
import yaml

from dlas import checkpoint as ckpt
from dlas.data.shapes import ShapesDataset
from dlas.data.token_shards import TokenShards, read_manifest
from dlas.models.vqvae.dvae import DiscreteVAE
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")

spec = importlib.util.spec_from_file_location("extract_tokens", REPO / "scripts" / "extract_tokens.py")
extract_tokens = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extract_tokens)

DVAE = {"type": "dvae", "codebook_size": 16, "width": 8, "codebook_dim": 8, "downsample": 4}
SHAPES = {"type": "shapes", "resolution": 16, "count": 10, "batch_size": 4}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as training leaves it: config.yml and a complete checkpoint with raw and EMA weights."""
    folder = tmp_path_factory.mktemp("runs") / "dvae_run"
    config = {"name": "dvae_run", "seed": 3, "networks": {"dvae": DVAE}, "datasets": {"train": SHAPES}}
    folder.mkdir()
    (folder / "config.yml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    raw, ema = DiscreteVAE(**{k: v for k, v in DVAE.items() if k != "type"}), None
    ema = DiscreteVAE(**{k: v for k, v in DVAE.items() if k != "type"})
    ckpt.save_checkpoint(folder, 7, {"dvae": raw.state_dict(), "dvae_ema": ema.state_dict()}, {"step": 7})
    return folder, ema.eval()


def main(*args) -> int:
    return extract_tokens.main([str(a) for a in args])


def test_the_tokens_are_the_ema_dvaes_encoding_of_the_runs_dataset_with_captions(run, tmp_path):
    folder, ema = run
    out = tmp_path / "tokens"
    assert main("--run", folder, "--output", out, "--batch-size", 4, "--shard-size", 4) == 0
    shards = TokenShards(out)
    data = ShapesDataset(resolution=16, count=10)
    data.seed = 3  # the run's seed
    assert len(shards) == 10 and shards.grid == (4, 4) and shards.codebook_size == 16
    for i in (0, 5, 9):
        item = data[(0, i)]
        assert torch.equal(shards[i]["tokens"], ema.encode(item["hq"][None])[0])
        assert shards[i]["caption"] == item["caption"] and shards[i]["id"] == item["path"]
        assert shards[i]["color"] == item["color"]
    manifest = read_manifest(out)
    assert manifest["dvae"]["step"] == 7 and manifest["dvae"]["weights"] == "dvae_ema.safetensors"
    assert manifest["dvae"]["image_size"] == [16, 16] and manifest["source"]["seed"] == 3
    assert 1 <= manifest["stats"]["codes_used"] <= 16 and manifest["stats"]["perplexity"] >= 1


def test_options_of_the_dataset_and_several_epochs_can_be_set(run, tmp_path):
    folder, _ = run
    out = tmp_path / "tokens"
    assert main("--run", folder, "--output", out, "--set", "count=3", "--set", "holdout=[red circle]",
                "--epochs", 2, "--no-ema") == 0
    shards = TokenShards(out)
    assert len(shards) == 6 and shards[3]["id"].endswith("_e1_000000")
    assert read_manifest(out)["dvae"]["weights"] == "dvae.safetensors"


def test_an_interrupted_extraction_resumes_and_gives_what_one_run_gives(run, tmp_path):
    folder, _ = run
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main("--run", folder, "--output", whole, "--shard-size", 4, "--batch-size", 3) == 0
    assert main("--run", folder, "--output", resumed, "--shard-size", 4, "--batch-size", 3, "--limit", 6) == 0
    manifest = read_manifest(resumed)  # as if killed after the first shard: mark it unfinished
    manifest.update(complete=False, count=4, shards=manifest["shards"][:1], source=read_manifest(whole)["source"])
    (resumed / "manifest.json").write_text(__import__("json").dumps(manifest))
    assert main("--run", folder, "--output", resumed, "--shard-size", 4, "--batch-size", 3) == 0
    a, b = TokenShards(whole), TokenShards(resumed)
    assert len(a) == len(b) == 10
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) and a[i]["id"] == b[i]["id"] for i in range(10))


def test_a_complete_folder_is_left_alone(run, tmp_path, capsys):
    folder, _ = run
    out = tmp_path / "tokens"
    assert main("--run", folder, "--output", out) == 0
    assert main("--run", folder, "--output", out) == 0
    assert "already complete" in capsys.readouterr().out


def test_a_folder_of_another_checkpoint_or_data_is_refused(run, tmp_path, capsys):
    folder, _ = run
    out = tmp_path / "tokens"
    assert main("--run", folder, "--output", out, "--limit", 2) == 0
    assert main("--run", folder, "--output", out, "--limit", 3) == 2
    assert "another source" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["no_config", "no_checkpoint", "not_a_folder"])
def test_a_wrong_or_incomplete_run_folder_is_exit_2_naming_it(run, tmp_path, capsys, damage):
    folder, _ = run
    broken = tmp_path / "broken_run"
    if damage != "not_a_folder":
        shutil.copytree(folder, broken)
        if damage == "no_config":
            (broken / "config.yml").unlink()
        else:
            (broken / "checkpoints" / "7" / "manifest.json").unlink()  # an interrupted save
    assert main("--run", broken, "--output", tmp_path / "tokens") == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "Traceback" not in err


def test_a_run_without_a_dvae_is_exit_2(tmp_path, capsys):
    folder = tmp_path / "sr_run"
    folder.mkdir()
    (folder / "config.yml").write_text(yaml.safe_dump({"networks": {"generator": {"type": "compact_sr"}},
                                                       "datasets": {"train": SHAPES}}))
    ckpt.save_checkpoint(folder, 1, {"generator": {}}, {"step": 1})
    assert main("--run", folder, "--output", tmp_path / "tokens") == 2
    assert "no network of type dvae" in capsys.readouterr().err
