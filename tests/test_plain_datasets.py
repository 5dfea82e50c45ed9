"""An ordinary PyTorch dataset (int indices, the global RNG, tuples) works as a plugin unchanged."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import plain_datasets
import pytest
import torch

from dlas import checkpoint as ckpt
from dlas.config import load_config
from dlas.data.collate import ItemCollator
from dlas.errors import DataError
from dlas.trainer.run import train

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
name: {name}
seed: 3
imports: [plain_datasets]
datasets:
  train: {dataset}
networks:
  gen: {{type: plain_identity_conv}}
steps:
  gen:
    training: [gen]
    optimizer: {{type: adam, lr: 1e-2}}
    injectors:
      noisy: {{type: noise, in: lq, out: lq_noisy, std: 0.05}}
      g: {{type: generator, network: gen, in: lq_noisy, out: fake}}
    losses:
      pix: {{type: pix, criterion: l1, real: hq, fake: fake}}
train: {{niter: {niter}, ema: {{rate: 0.9}}}}
logger: {{print_freq: 1, save_checkpoint_freq: 3, tensorboard: false}}
path: {{root: {root}}}
"""
NOISY = "{type: plain_noisy_pairs, batch_size: 2, num_workers: 0, shuffle: true}"


def write(tmp: Path, name: str, niter: int = 3, dataset: str = NOISY) -> Path:
    file = tmp / f"{name}-{niter}.yml"
    file.write_text(CONFIG.format(name=name, niter=niter, dataset=dataset, root=tmp / "experiments"))
    return file


def train_in_process(config: Path) -> Path:
    cfg = load_config(str(config))
    run_dir = Path(cfg["path"]["root"]) / cfg["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    train(cfg, run_dir)
    return run_dir


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = ckpt.checkpoint_root(run_dir) / str(step)
    return {stem: ckpt.load_weights(folder, stem) for stem in ("gen", "gen_ema")}


def test_a_dataset_of_int_indices_trains(tmp_path):
    run_dir = train_in_process(write(tmp_path, "plain"))  # the dataset raises on any key but an int
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [3]


def test_a_plain_dataset_drawing_from_the_global_rng_resumes_bit_identically(tmp_path):
    full = train_in_process(write(tmp_path, "full", niter=6))
    train_in_process(write(tmp_path, "split", niter=3))
    split = train_in_process(write(tmp_path, "split", niter=6))
    for stem, tensors in weights(full, 6).items():
        for key, value in tensors.items():
            assert torch.equal(value, weights(split, 6)[stem][key]), f"{stem}.{key}"


def test_tuple_items_train_once_item_keys_names_their_parts(tmp_path):
    dataset = "{type: plain_tuple_pairs, batch_size: 2, item_keys: [lq, hq]}"
    run_dir = train_in_process(write(tmp_path, "tuples", dataset=dataset))
    assert ckpt.list_checkpoints(run_dir)


def cli(config: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "codes" / "train.py"), "-opt", str(config)],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("dataset, expected", [
    ("{type: plain_tuple_pairs, batch_size: 2}", ["datasets.train.item_keys", "tuple of 2 values"]),
    ("{type: plain_odd_items, problem: mixed, batch_size: 2}", ["datasets.train", "'hq'", "(3, 8, 8)", "(3, 10, 10)"]),
    ("{type: plain_odd_items, problem: none, batch_size: 2}", ["datasets.train", "'extra'", "None"]),
])
def test_items_that_cannot_be_batched_are_one_line_naming_dataset_and_key(tmp_path, plugin_env, dataset, expected):
    result = cli(write(tmp_path, "odd", dataset=dataset), plugin_env)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert all(fragment in errors[0] for fragment in expected), errors[0]
    assert not (tmp_path / "experiments" / "odd" / "checkpoints").exists()


def test_the_collate_error_names_the_key_when_a_loader_worker_batches(tmp_path, plugin_env):
    # the first batch (items 0 and 1) passes the start-up check; a later one fails inside the worker
    dataset = "{type: plain_odd_items, problem: mixed_late, batch_size: 2, num_workers: 1, shuffle: false}"
    collate = ItemCollator("train")
    with pytest.raises(DataError, match="'hq'"):
        collate([plain_datasets.PlainOddItems("mixed")[i] for i in range(2)])
    result = cli(write(tmp_path, "odd_workers", dataset=dataset), plugin_env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and "datasets.train" in errors[0] and "'hq'" in errors[0], errors
