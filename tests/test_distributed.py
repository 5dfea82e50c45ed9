"""DDP on the CPU (gloo) under torchrun: 2 processes train like 1 with the same global batch."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from dlas import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
name: {name}
seed: 5
device: cpu
imports: [trainer_components]
datasets:
  train: {{type: test_random_pairs, length: 12, size: 8, batch_size: 4, shuffle: true}}
networks:
  gen: {{type: {gen_type}, checkpointing: {checkpointing}}}
  critic: {{type: test_critic}}
steps:
  gen:
    training: [gen]
    optimizer: {{type: adam, lr: 1e-2}}
    injectors:
      g: {{type: generator, network: gen, in: lq, out: fake}}
      s: {{type: generator, network: critic, in: fake, out: score}}
    losses:
      pix: {{type: pix, criterion: l1, real: hq, fake: fake}}
      adv: {{type: direct, key: score, weight: 0.1, after: 2}}
  critic:
    training: [critic]
    after: 2
    optimizer: {{type: adam, lr: 1e-2}}
    injectors:
      f: {{type: generator, network: gen, in: lq, out: fake, grad: false}}
      d: {{type: generator, network: critic, in: fake, out: dfake}}
    losses:
      d: {{type: direct, key: dfake, weight: -1}}
precision: {precision}
train: {{niter: {niter}, mega_batch_factor: 2, dist_timeout: 60, distributed: {distributed}, ema: {{rate: 0.9}}}}
logger: {{print_freq: 1, save_checkpoint_freq: 2, tensorboard: false}}
path: {{root: {root}}}
"""


def config(tmp: Path, name: str, niter: int, gen_type: str = "test_conv", distributed: str = "ddp",
           checkpointing: bool = False, precision: str = "fp32") -> Path:
    path = tmp / f"{name}-{niter}.yml"
    path.write_text(CONFIG.format(name=name, niter=niter, gen_type=gen_type, root=tmp / "experiments",
                                  distributed=distributed, checkpointing=str(checkpointing).lower(),
                                  precision=precision))
    return path




def launch(cfg: Path, nproc: int, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "codes" / "train.py"), "-opt", str(cfg)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "codes" / "train.py"), "-opt", str(cfg)]
    env = dict(env, OMP_NUM_THREADS="1")  # two ranks share two cores
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def weights(tmp: Path, name: str, step: int) -> dict[str, torch.Tensor]:
    folder = ckpt.checkpoint_root(tmp / "experiments" / name) / str(step)
    return {f"{f.stem}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, plugin_env):
    single = launch(config(tmp_path, "single", 4), 1, plugin_env)
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch(config(tmp_path, "double", 4), 2, plugin_env)
    assert double.returncode == 0, double.stderr[-3000:]
    a, b = weights(tmp_path, "single", 4), weights(tmp_path, "double", 4)
    assert a.keys() == b.keys() and {"gen/body.0.weight", "critic/conv.weight"} <= {k for k in a}
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), f"{key}: {(a[key] - b[key]).abs().max()}"
    # the critic step (after: 2) really trained under DDP
    first = weights(tmp_path, "double", 2)
    assert not torch.equal(first["critic/conv.weight"], b["critic/conv.weight"])
    # only rank 0 wrote the run folder's log
    log = (tmp_path / "experiments" / "double" / "train.log").read_text()
    assert log.count("step 4 ") == 1


def test_resume_under_two_processes_continues_exactly(tmp_path, plugin_env):
    assert launch(config(tmp_path, "whole", 4), 2, plugin_env).returncode == 0
    first = launch(config(tmp_path, "parts", 2), 2, plugin_env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch(config(tmp_path, "parts", 4), 2, plugin_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from checkpoint" in second.stdout + second.stderr
    a, b = weights(tmp_path, "whole", 4), weights(tmp_path, "parts", 4)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_rank_that_raises_ends_the_whole_job(tmp_path, plugin_env):
    start = time.time()
    result = launch(config(tmp_path, "fails", 4, gen_type="test_fails_on_rank"), 2, plugin_env, timeout=180)
    assert result.returncode != 0
    assert "deliberate failure on rank 1" in result.stdout + result.stderr
    assert time.time() - start < 120


def test_fsdp_on_two_processes_equals_one_process_resumes_and_loads_unsharded(tmp_path, plugin_env):
    single = launch(config(tmp_path, "single", 4), 1, plugin_env)
    assert single.returncode == 0, single.stderr[-3000:]
    # activation checkpointing recomputes the same numbers, so the sharded run with it must match as closely
    whole = launch(config(tmp_path, "sharded", 4, distributed="fsdp", checkpointing=True), 2, plugin_env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = weights(tmp_path, "single", 4), weights(tmp_path, "sharded", 4)
    assert a.keys() == b.keys() and {"gen_ema/body.0.weight", "critic/conv.weight"} <= set(a)
    for key in a:  # full, unsharded tensors in ordinary safetensors files
        assert a[key].shape == b[key].shape and torch.allclose(a[key], b[key], atol=1e-5), key
    assert launch(config(tmp_path, "halves", 2, distributed="fsdp"), 2, plugin_env).returncode == 0
    resumed = launch(config(tmp_path, "halves", 4, distributed="fsdp"), 2, plugin_env)
    assert resumed.returncode == 0 and "resuming from checkpoint" in resumed.stdout + resumed.stderr
    c = weights(tmp_path, "halves", 4)
    for key in b:
        assert torch.allclose(b[key], c[key], atol=1e-6), key
    from dlas.build import RunNetworks

    loaded = RunNetworks(tmp_path / "experiments" / "sharded")["gen"]  # strict load into a plain network
    assert torch.equal(loaded.body[0].weight, b["gen_ema/body.0.weight"])
    # bf16 under FSDP (bf16 compute, fp32 gradient reduction) trains, and saves fp32 weights like any run
    mixed = launch(config(tmp_path, "mixed", 2, distributed="fsdp", precision="bf16"), 2, plugin_env)
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    m = weights(tmp_path, "mixed", 2)
    assert m["gen/body.0.weight"].dtype == torch.float32 and all(torch.isfinite(v).all() for v in m.values())
    assert not torch.equal(m["gen/body.0.weight"], weights(tmp_path, "halves", 2)["gen/body.0.weight"])


def test_precision_auto_under_two_processes_trains_and_saves_the_choice_rank_0_logged(tmp_path, plugin_env):
    result = launch(config(tmp_path, "auto", 2, precision="auto"), 2, plugin_env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "experiments" / "auto" / "train.log").read_text()
    assert log.count("auto: fp32; measured") + log.count("auto: bf16; measured") == 1  # rank 0 logs it
    state = ckpt.load_state(ckpt.checkpoint_root(tmp_path / "experiments" / "auto") / "2")
    assert log.split("auto: ")[1].startswith(f"{state['speed']['precision']}; measured")
