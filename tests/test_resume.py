"""Checkpoints and resume: a stopped and resumed run is the same run, bit for bit, on the CPU."""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlas import checkpoint as ckpt
from dlas.config import load_config
from dlas.trainer.run import train

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
name: {name}
seed: 3
imports: [trainer_components]
datasets:
  train: {{type: test_random_pairs, length: 10, size: 8, batch_size: 4, num_workers: {workers}, shuffle: true}}
networks:
  gen: {{type: test_conv, nf: 4}}
  critic: {{type: test_critic}}
steps:
  gen:
    training: [gen]
    optimizer: {{type: adam, lr: 1e-2}}
    injectors:
      noisy: {{type: noise, in: lq, out: lq_noisy, std: 0.05}}
      g: {{type: generator, network: gen, in: lq_noisy, out: fake}}
      s: {{type: generator, network: critic, in: fake, out: score}}
    losses:
      pix: {{type: pix, criterion: l1, real: hq, fake: fake}}
      adv: {{type: direct, key: score, weight: 0.1, after: {gan_after}}}
  critic:
    training: [critic]
    after: {gan_after}
    optimizer: {{type: adam, lr: 1e-2}}
    injectors:
      d: {{type: generator, network: critic, in: fake, out: dfake}}
    losses:
      d: {{type: direct, key: dfake, weight: -1}}
train:
  niter: {niter}
  mega_batch_factor: 2
  ema: {{rate: 0.9, networks: [gen]}}
  lr_scheduler: {{type: multistep, milestones: [4], gamma: 0.5}}
logger: {{print_freq: 1, save_checkpoint_freq: {save_freq}, keep_checkpoints: 10, tensorboard: false}}
path: {{root: {root}}}
"""


def write_config(tmp: Path, name: str, niter: int, workers: int = 0, save_freq: int = 3, gan_after: int = 4) -> Path:
    path = tmp / f"{name}-{niter}.yml"
    path.write_text(CONFIG.format(name=name, niter=niter, workers=workers, save_freq=save_freq,
                                  gan_after=gan_after, root=tmp / "experiments"))
    return path


def run(tmp: Path, name: str, niter: int, **kw) -> Path:
    cfg = load_config(str(write_config(tmp, name, niter, **kw)))
    run_dir = Path(cfg["path"]["root"]) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    train(cfg, run_dir)
    return run_dir


def logged_losses(run_dir: Path) -> dict[int, str]:
    """``step -> 'key=value ...'`` of the loss lines in train.log (``step N/NITER (speed, eta) key=value ...``;
    timing values left out)."""
    lines = {}
    for line in (run_dir / "train.log").read_text().splitlines() if (run_dir / "train.log").exists() else []:
        match = re.search(r"step (\d+)/\d+ \([^)]*\) (.*)", line)
        if match:
            kept = [kv for kv in match.group(2).split() if not kv.startswith(("perf/", "train/", "data/"))]
            lines[int(match.group(1))] = " ".join(kept)
    return lines


def checkpoint_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = ckpt.checkpoint_root(run_dir) / str(step)
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update({f"{file.stem}/{k}": v for k, v in load_file(str(file)).items()})
    state = ckpt.load_state(folder)
    for step_name, sd in state["steps"].items():
        for pid, pstate in sd["optimizer"]["state"].items():
            for key, value in pstate.items():
                tensors[f"opt/{step_name}/{pid}/{key}"] = torch.as_tensor(value)
    return tensors


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.mark.parametrize("workers", [0, 2])
def test_stopped_and_resumed_run_equals_an_uninterrupted_run(tmp_path, workers):
    from dlas.logging.console import setup_logging

    full_dir = tmp_path / "experiments" / "full"
    setup_logging(full_dir)
    run(tmp_path, "full", 6, workers=workers)
    split_dir = tmp_path / "experiments" / "split"
    setup_logging(split_dir)
    run(tmp_path, "split", 3, workers=workers)  # stops at 3 (the GAN switches on after 4) ...
    assert [s for s, _ in ckpt.list_checkpoints(split_dir)] == [3]
    run(tmp_path, "split", 6, workers=workers)  # ... and resumes from its checkpoint to 6
    assert_identical(checkpoint_tensors(full_dir, 6), checkpoint_tensors(split_dir, 6))
    full_logs, split_logs = logged_losses(full_dir), logged_losses(split_dir)
    assert set(full_logs) >= {1, 2, 3, 4, 5, 6}
    assert "critic/d" in full_logs[5]
    assert all(full_logs[s] == split_logs[s] for s in range(1, 7)), (full_logs, split_logs)


def test_a_corrupt_checkpoint_is_skipped_with_a_message(tmp_path, caplog_dlas):
    run_dir = run(tmp_path, "corrupt", 4, save_freq=2)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 4]
    newest = ckpt.checkpoint_root(run_dir) / "4" / "gen.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated
    caplog_dlas.clear()  # only what finding the checkpoint says
    found = ckpt.latest_valid_checkpoint(run_dir)
    assert found is not None and found[0] == 2
    text = "\n".join(caplog_dlas)
    assert "gen.safetensors" in text and "manifest" in text
    # an incomplete folder (no manifest) is not a checkpoint at all
    (ckpt.checkpoint_root(run_dir) / "4" / ckpt.MANIFEST).unlink()
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2]


def test_checkpoint_state_refuses_a_pickle_that_executes_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "ckpt"
    folder.mkdir()
    with open(folder / ckpt.STATE, "wb") as f:
        pickle.dump({"step": Exploit()}, f)
    from dlas.errors import DataError

    with pytest.raises(DataError):
        ckpt.load_state(folder)
    assert not marker.exists()


def test_retention_keeps_newest_milestones_and_best(tmp_path):
    run_dir = tmp_path / "r"
    for step in range(1, 9):
        ckpt.save_checkpoint(run_dir, step, {"n": {"w": torch.zeros(1)}}, {"step": step})
    deleted = ckpt.prune_checkpoints(run_dir, keep_last=2, keep_every=4, protect=[3])
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [3, 4, 7, 8]
    assert deleted == [1, 2, 5, 6]


def test_a_failed_save_raises_and_leaves_no_checkpoint(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(AttributeError):  # a str has no .detach(): any failure mid-save
        ckpt.save_checkpoint(run_dir, 1, {"n": {"w": "not a tensor"}}, {"step": 1})
    assert ckpt.list_checkpoints(run_dir) == []
    assert not any(ckpt.checkpoint_root(run_dir).iterdir())


# ---------------------------------------------------------------------- crash safety (subprocesses)
CRASH_NITER = 100


def _train_command(config: Path) -> list[str]:
    return [sys.executable, str(REPO / "codes" / "train.py"), "-opt", str(config)]




def test_sigkill_at_random_moments_never_loses_a_complete_checkpoint(tmp_path, plugin_env):
    reference = write_config(tmp_path, "reference", CRASH_NITER, save_freq=1, gan_after=10)
    subprocess.run(_train_command(reference), env=plugin_env, check=True, capture_output=True, timeout=300)
    victim = write_config(tmp_path, "victim", CRASH_NITER, save_freq=1, gan_after=10)
    rng = random.Random(0)
    kills = 0
    run_dir = tmp_path / "experiments" / "victim"
    while kills < 10:
        proc = subprocess.Popen(_train_command(victim), env=plugin_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        before = [s for s, _ in ckpt.list_checkpoints(run_dir)]
        # wait until training is under way (a new checkpoint appears), then kill at a random moment
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            now = [s for s, _ in ckpt.list_checkpoints(run_dir)]
            if now and now != before:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.05))  # a step (with its save) takes ~10-50 ms: kills land mid-step and mid-save
        if proc.poll() is not None:
            break  # finished before we could kill it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        found = ckpt.latest_valid_checkpoint(run_dir)
        assert found is not None, "a kill left no complete checkpoint behind"
    assert kills >= 10, f"training finished after only {kills} kills; make it longer"
    subprocess.run(_train_command(victim), env=plugin_env, check=True, capture_output=True, timeout=300)
    assert_identical(checkpoint_tensors(tmp_path / "experiments" / "reference", CRASH_NITER),
                     checkpoint_tensors(run_dir, CRASH_NITER))


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_to_the_process_group_saves_and_exits_zero(tmp_path, workers, plugin_env):
    # SLURM and torchrun signal the whole process group, loader workers included
    config = write_config(tmp_path, "term", 10**6, save_freq=10**6, workers=workers)
    run_dir = tmp_path / "experiments" / "term"
    proc = subprocess.Popen(_train_command(config), env=plugin_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    log_file = run_dir / "train.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log_file.exists() and "step 3 " in log_file.read_text()):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    steps = [s for s, _ in ckpt.list_checkpoints(run_dir)]
    assert len(steps) == 1 and steps[0] >= 3
    assert not ckpt.verify_checkpoint(ckpt.checkpoint_root(run_dir) / str(steps[0]))


def test_an_error_while_loader_workers_run_ends_the_process_instead_of_hanging(tmp_path, plugin_env):
    # workers ignore SIGTERM, so the interpreter's exit-time terminate-and-join would wait for them forever
    config = write_config(tmp_path, "raises", 6, workers=2)
    config.write_text(config.read_text().replace("gen: {type: test_conv, nf: 4}",
                                                 "gen: {type: test_fails_on_rank, fail_rank: 0, fail_step: 2}"))
    result = subprocess.run(_train_command(config), env=plugin_env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 1 and "deliberate failure on rank 0 at step 2" in result.stderr


def test_a_run_that_keeps_producing_nan_saves_and_stops_with_a_message(tmp_path, capsys):
    from dlas.cli.train import main

    config = write_config(tmp_path, "diverged", 20, save_freq=100)
    text = config.read_text().replace(
        "      noisy: {type: noise, in: lq, out: lq_noisy, std: 0.05}",
        "      noisy: {type: scale, in: lq, out: lq_noisy, factor: 1e39}  # inf in float32: every loss overflows")
    text = text.replace("  mega_batch_factor: 2", "  mega_batch_factor: 2\n  max_bad_steps: 3")
    config.write_text(text)
    assert main(["-opt", str(config)]) == 1
    run_dir = tmp_path / "experiments" / "diverged"
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [3]
    log = (run_dir / "train.log").read_text()
    assert "3 steps in a row had non-finite losses" in log and "gen/pix" in log


def test_pretrained_weights_load_strictly_or_report_what_did_not_fit(tmp_path):
    from safetensors.torch import save_file

    from dlas.cli.train import main

    source = run(tmp_path, "source", 2, save_freq=2)
    weights = ckpt.checkpoint_root(source) / "2" / "gen.safetensors"
    config = write_config(tmp_path, "target", 1)
    assert main(["-opt", str(config), f"+path.pretrain_model_gen={weights}"]) == 0
    loaded = load_file(str(ckpt.checkpoint_root(tmp_path / "experiments" / "target") / "1" / "gen.safetensors"))
    assert loaded.keys() == load_file(str(weights)).keys()

    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("body.2")}, str(partial))
    assert main(["-opt", str(config), "name=strict", f"+path.pretrain_model_gen={partial}"]) == 2
    assert main(["-opt", str(config), "name=lenient", f"+path.pretrain_model_gen={partial}",
                 "path.strict_load=false"]) == 0
    log = (tmp_path / "experiments" / "lenient" / "train.log").read_text()
    assert "did not match completely" in log and "2 missing" in log


def test_keep_best_keeps_the_best_validated_checkpoint_besides_the_newest(tmp_path):
    config = write_config(tmp_path, "best", 8, save_freq=2)
    text = config.read_text().replace("logger: {print_freq: 1, save_checkpoint_freq: 2, keep_checkpoints: 10,",
                                      "logger: {print_freq: 1, save_checkpoint_freq: 2, keep_checkpoints: 1, "
                                      "keep_best: scripted/psnr,")
    text = text.replace("  niter: 8\n", "  niter: 8\n  val_freq: 2\n")
    text += "eval:\n  scripted: {type: test_scripted_metric, values: {2: 10.0, 4: 30.0, 6: 20.0, 8: 5.0}}\n"
    config.write_text(text)
    cfg = load_config(str(config))
    run_dir = Path(cfg["path"]["root"]) / "best"
    train(cfg, run_dir)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [4, 8]
    assert ckpt.read_best(run_dir) == {"metric": "scripted/psnr", "value": 30.0, "step": 4}
    assert json.loads((run_dir / "val" / "6" / "metrics.json").read_text()) == {"scripted/psnr": 20.0}


def test_a_batch_that_mega_batching_cannot_split_is_a_config_error_before_training(tmp_path):
    from dlas.errors import ConfigError

    cfg = load_config(str(write_config(tmp_path, "split", 2)), ["datasets.train.batch_size=3"])
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path / "experiments" / "split")
    assert info.value.problems[0].path == "datasets.train.batch_size"
    assert ckpt.list_checkpoints(tmp_path / "experiments" / "split") == []
