"""What DLAS promises when a run is stopped, resumed, or fed careless input (docs/reliability.md).

Runs are tiny and in-process; signals are sent by the run's own components (a dataset, a network, an evaluator)
at the moment under test, so every test is deterministic.
"""
from __future__ import annotations

import hashlib
import json
import resource
import signal
import time
from pathlib import Path

import pytest

from dlas import checkpoint as ckpt
from dlas.cli.train import main
from dlas.config.resume import compare

CONFIG = """
name: {name}
seed: 3
imports: [trainer_components, {plugin}]
datasets:
  train: {{type: {dataset}, length: 8, size: 8, batch_size: 2}}
networks:
  gen: {{type: {network}, nf: 4}}
steps:
  gen:
    training: [gen]
    optimizer: {{type: adam, lr: 1e-2}}
    injectors:
      g: {{type: generator, network: gen, in: lq, out: fake}}
    losses:
      pix: {{type: pix, criterion: l1, real: hq, fake: fake}}
train:
  niter: {niter}
  ema: {{rate: 0.9}}
  lr_scheduler: {{type: multistep, milestones: [100]}}
  val_freq: 2
eval: {{{eval}}}
logger: {{print_freq: 1, save_checkpoint_freq: 2, tensorboard: false}}
path: {{root: {root}}}
"""

# Components that send this process a signal at the moment a test is about.
PLUGIN = '''
import os, signal, time
import torch
from dlas.registry import DATASETS, EVALUATORS, NETWORKS
from trainer_components import RandomPairs, TestConv


def send(sig=signal.SIGTERM):
    # never kill the test runner: only a run that handles the signal may get one
    assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN), "no handler installed"
    os.kill(os.getpid(), sig)


@DATASETS.register("signals_at_startup")
class SignalsAtStartup(RandomPairs):
    def __init__(self, length: int = 8, size: int = 8):
        super().__init__(length, size)
        send()


@NETWORKS.register("signals_twice_at_step_3")
class SignalsTwice(TestConv):
    def set_step(self, step: int) -> None:
        if step == 3:
            send()
            time.sleep(1.1)  # closer signals count as one request (torchrun forwards SIGINT and SIGTERM)
            send()


@EVALUATORS.register("signals_then_takes_forever")
class SignalsThenTakesForever:
    def __call__(self, ctx) -> dict:
        send()
        for _ in range(600):
            time.sleep(0.1)
        return {"psnr": 1.0}


@EVALUATORS.register("signals_in_its_summary")
class SignalsInItsSummary:
    def __call__(self, ctx) -> dict:
        return {"psnr": 1.0}

    def summary(self, metrics) -> list:
        send()
        return []
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "reliability_components.py"
    path.write_text(PLUGIN)
    return path


@pytest.fixture
def write(tmp_path, plugin, one_torch_thread):
    def write(name="run", niter=2, dataset="test_random_pairs", network="test_conv", eval="") -> Path:
        path = tmp_path / f"{name}.yml"
        path.write_text(CONFIG.format(name=name, plugin=plugin, dataset=dataset, network=network, niter=niter,
                                      eval=eval, root=tmp_path / "runs"))
        return path
    return write


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``, with a hash of each file's bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


# ---------------------------------------------------------------------- nothing changes until the run starts
def test_a_resume_that_fails_leaves_the_run_folder_byte_for_byte_as_it_was(write, tmp_path, capsys):
    config = write()
    assert main(["-opt", str(config)]) == 0
    run_dir = tmp_path / "runs" / "run"
    before = snapshot(run_dir)
    for _ in range(2):  # a second failed try must not rotate anything either
        assert main(["-opt", str(config), "networks.gen.nf=8", "train.niter=4"]) == 2
        (line,) = errors(capsys)
        assert line.startswith("error: networks.gen ") and "does not fit the weights of checkpoint" in line
    assert main(["-opt", str(config), "steps.gen.optimizer.lr=1e-3"]) == 2
    (line,) = errors(capsys)
    assert line.startswith("error: steps.gen.optimizer ") and "lr: 0.01 -> 0.001" in line
    assert snapshot(run_dir) == before


def test_a_resume_with_allowed_changes_reports_them_and_keeps_the_old_config(write, tmp_path, capsys):
    config = write()
    assert main(["-opt", str(config)]) == 0
    run_dir = tmp_path / "runs" / "run"
    original = (run_dir / "config.yml").read_text()
    dead = ckpt.checkpoint_root(run_dir) / ".tmp-3-4000000"  # an interrupted save of a process long gone
    dead.mkdir()
    capsys.readouterr()
    assert main(["-opt", str(config), "train.niter=4", "seed=5"]) == 0
    out = capsys.readouterr().out
    assert "the config differs from the one this run was trained with" in out and "train.niter: 2 -> 4" in out
    assert "seed: 3 -> 5" in out
    assert (run_dir / "config.previous.yml").read_text() == original
    assert "niter: 4" in (run_dir / "config.yml").read_text()
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [2, 4] and not dead.exists()


@pytest.mark.parametrize("change, part", [
    ("networks.gen.type=test_critic", "networks.gen.type"),
    ("+networks.d={type: test_critic}", "networks.d"),
    ("steps.gen.training=[gen, d]", "steps.gen.training"),
    ("steps.gen.optimizer.type=sgd", "steps.gen.optimizer"),
    ("steps.gen.optimizer.betas=[0.5, 0.9]", "steps.gen.optimizer"),
    ("train.lr_scheduler.milestones=[200]", "train.lr_scheduler"),
    ("+steps.gen.lr_scheduler={type: constant}", "steps.gen.lr_scheduler"),
])
def test_what_a_checkpoint_restores_cannot_change_on_resume(change, part):
    from dlas.config import apply_overrides

    old = json.loads(json.dumps(BASE))
    new = apply_overrides(json.loads(json.dumps(BASE)), [change])
    _, problems = compare(old, new)
    assert [p.path for p in problems] == [part]


@pytest.mark.parametrize("change", ["train.niter=10", "seed=4", "steps.gen.losses.pix.weight=0.5", "precision=bf16",
                                    "+steps.gen.grad_clip=1.0", "networks.gen.nf=8", "datasets.train.length=4",
                                    "+steps.d={training: [gen], optimizer: {type: sgd}, losses: {}}"])
def test_what_is_read_afresh_each_step_may_change_on_resume(change):
    from dlas.config import apply_overrides

    allowed, problems = compare(BASE, apply_overrides(json.loads(json.dumps(BASE)), [change]))
    assert problems == [] and allowed


BASE = {"name": "run", "seed": 3, "precision": "fp32",
        "datasets": {"train": {"type": "test_random_pairs", "length": 8}},
        "networks": {"gen": {"type": "test_conv", "nf": 4}},
        "steps": {"gen": {"training": ["gen"], "optimizer": {"type": "adam", "lr": 0.01, "betas": [0.9, 0.99]},
                          "lr_scheduler": None, "grad_clip": None,
                          "losses": {"pix": {"type": "pix", "weight": 1.0}}}},
        "train": {"niter": 2, "lr_scheduler": {"type": "multistep", "milestones": [100]}}}


def test_another_runs_checkpoint_that_does_not_fit_is_one_line_naming_the_option(write, tmp_path, capsys):
    assert main(["-opt", str(write(name="adam"))]) == 0
    other = tmp_path / "runs" / "adam" / "checkpoints" / "2"
    config = write(name="sgd")
    assert main(["-opt", str(config), "steps.gen.optimizer={type: sgd, lr: 0.1}", "train.niter=4",
                 f"path.resume_state={other}"]) == 2
    (line,) = errors(capsys)
    assert line.startswith("error: steps.gen.optimizer") and "trained with a torch.optim.adam.Adam" in line
    assert not (tmp_path / "runs" / "sgd").exists()


# ---------------------------------------------------------------------- falling back to the previous checkpoint
def test_an_unloadable_newest_checkpoint_falls_back_to_the_previous_one_naming_both(write, tmp_path, capsys):
    config = write(niter=4)
    assert main(["-opt", str(config)]) == 0
    root = ckpt.checkpoint_root(tmp_path / "runs" / "run")
    state = root / "4" / ckpt.STATE
    state.write_bytes(b"PK\x03\x04 truncated")
    manifest = json.loads((root / "4" / ckpt.MANIFEST).read_text())
    digest = hashlib.sha256(state.read_bytes()).hexdigest()
    manifest["files"]["state.pt"] = {"size": state.stat().st_size, "sha256": digest}
    (root / "4" / ckpt.MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["-opt", str(config), "train.niter=6"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from the previous complete checkpoint {root / '2'} instead of the newest, {root / '4'}" in out
    assert f"{state}: not a readable checkpoint state file" in out
    assert [step for step, _ in ckpt.list_checkpoints(root.parent)] == [2, 4, 6]
    assert ckpt.verify_checkpoint(root / "4") == []  # re-saved from the resumed run


def test_a_run_none_of_whose_checkpoints_loads_stops_instead_of_starting_over(write, tmp_path, capsys):
    config = write()
    assert main(["-opt", str(config)]) == 0
    run_dir = tmp_path / "runs" / "run"
    (ckpt.checkpoint_root(run_dir) / "2" / ckpt.MANIFEST).write_text("{}")
    before = snapshot(run_dir)
    assert main(["-opt", str(config), "train.niter=4"]) == 2
    (line,) = errors(capsys)
    assert "none of this run's checkpoints can be loaded" in line and "--fresh" in line
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------- signals
def test_a_signal_during_start_up_stops_at_once_and_writes_nothing(write, tmp_path, capsys):
    assert main(["-opt", str(write(dataset="signals_at_startup"))]) == 0
    assert "stopped by SIGTERM during start-up" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_signal_during_validation_saves_promptly_instead_of_finishing_it(write, tmp_path, capsys):
    config = write(niter=4, eval="slow: {type: signals_then_takes_forever}")
    start = time.monotonic()
    assert main(["-opt", str(config)]) == 0
    assert time.monotonic() - start < 30  # the evaluator alone would take a minute
    run_dir = tmp_path / "runs" / "run"
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [2]
    assert not (run_dir / "val" / "2" / "metrics.json").exists()
    assert "validation at step 2 left early (SIGTERM)" in (run_dir / "train.log").read_text()


def test_a_signal_after_the_last_save_stops_at_once_and_says_nothing_is_lost(write, tmp_path, capsys):
    assert main(["-opt", str(write(eval="done: {type: signals_in_its_summary}"))]) == 0
    assert "after the last checkpoint was saved: nothing is lost" in capsys.readouterr().err
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path / "runs" / "run")] == [2]


def test_a_second_signal_stops_at_once_and_says_what_was_not_saved(write, tmp_path, capsys):
    assert main(["-opt", str(write(niter=6, network="signals_twice_at_step_3"))]) == 130
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("interrupted: a second SIGTERM") and "not saved" in line
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path / "runs" / "run")] == [2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are the process's own again


# ---------------------------------------------------------------------- failures while saving
@pytest.fixture
def file_size_limit():
    """Make writes beyond ``limit`` bytes per file fail as a full disk does (EFBIG instead of ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old)


def test_a_full_disk_while_saving_is_one_line_and_leaves_earlier_checkpoints_intact(write, tmp_path, capsys,
                                                                                    file_size_limit):
    config = write()
    assert main(["-opt", str(config)]) == 0
    run_dir = tmp_path / "runs" / "run"
    file_size_limit(16 * 1024)  # the weights fit, torch's writer fails on state.pt (with a RuntimeError)
    assert main(["-opt", str(config), "train.niter=4"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    (line,) = [line for line in (run_dir / "train.log").read_text().splitlines() if "failed" in line]
    assert "saving checkpoint 4 under" in line and "MiB free there" in line and "Earlier checkpoints are intact" in line
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [2]
    assert ckpt.verify_checkpoint(ckpt.checkpoint_root(run_dir) / "2") == []
    assert not [p for p in ckpt.checkpoint_root(run_dir).iterdir() if p.name.startswith(".tmp-")]
