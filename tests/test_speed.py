"""precision: auto and channels_last: auto: measured at the start, then the run is the run its choice names."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dlas import checkpoint as ckpt
from dlas.config import load_config
from dlas.trainer import speed
from dlas.trainer.run import state_problems, train

CONFIG = """
name: {name}
seed: 5
precision: {precision}
imports: [trainer_components]
datasets:
  train: {{type: test_random_pairs, length: 6, size: 8, batch_size: 4, shuffle: true}}
networks:
  gen: {{type: {network}, nf: 4, channels_last: {channels_last}}}
steps:
  gen:
    training: [gen]
    optimizer: {{type: adam, lr: 1e-2}}
    injectors:
      noisy: {{type: noise, in: lq, out: lq_noisy, std: 0.05}}
      g: {{type: generator, network: gen, in: lq_noisy, out: fake}}
    losses:
      pix: {{type: pix, criterion: l1, real: hq, fake: fake}}
train:
  niter: {niter}
  ema: {{rate: 0.9}}
logger: {{print_freq: 1, save_checkpoint_freq: 3, keep_checkpoints: 5, tensorboard: false}}
path: {{root: {root}}}
"""


def run(tmp: Path, name: str, niter: int = 4, precision: str = "auto", channels_last: str = "auto",
        network: str = "test_conv") -> Path:
    path = tmp / f"{name}.yml"
    path.write_text(CONFIG.format(name=name, niter=niter, precision=precision, channels_last=channels_last,
                                  network=network, root=tmp / "experiments"))
    cfg = load_config(str(path))
    run_dir = Path(cfg["path"]["root"]) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    train(cfg, run_dir)
    return run_dir


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = ckpt.checkpoint_root(run_dir) / str(step)
    return {f"{f.stem}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def saved_choice(run_dir: Path, step: int) -> dict:
    return ckpt.load_state(ckpt.checkpoint_root(run_dir) / str(step))["speed"]


@pytest.fixture
def choose_last(monkeypatch):
    """Make the measurement take its last candidate (bf16 + channels_last) whatever the times, so that the test
    sees the rebuilt trainer depart from the defaults on every machine."""
    monkeypatch.setattr(speed, "pick", lambda times, choices: max(times))


def test_the_defaults_stay_unless_another_setting_is_clearly_faster():
    choices = [{"precision": "fp32"}, {"precision": "bf16"}]
    assert speed.pick({0: 1.00, 1: 0.97}, choices) == 0  # 3% faster: within the margin, fp32 stays
    assert speed.pick({0: 1.00, 1: 0.80}, choices) == 1
    both = speed.candidates({"precision": "auto", "networks": {"g": {"channels_last": "auto"}}}, torch.device("cpu"))
    assert [speed.label(c) for c in both] == ["fp32", "fp32+channels_last", "bf16", "bf16+channels_last"]
    # the fastest, bf16+channels_last, loses to bf16 alone within the margin (one departure fewer)
    assert speed.pick({0: 1.0, 1: 0.9, 2: 0.62, 3: 0.60}, both) == 2


def test_only_the_settings_left_to_auto_are_measured():
    cfg = {"precision": "bf16", "networks": {"g": {"channels_last": "auto"}, "d": {"channels_last": True}}}
    assert speed.candidates(cfg, torch.device("cpu")) == [{"channels_last": {"g": False}},
                                                          {"channels_last": {"g": True}}]
    applied = speed.apply_choice(cfg, {"channels_last": {"g": True}})
    assert applied["precision"] == "bf16" and applied["networks"]["g"]["channels_last"] is True
    assert cfg["networks"]["g"]["channels_last"] == "auto"  # the config itself is left as it was


def test_an_auto_run_trains_exactly_as_the_config_naming_its_choice(tmp_path, caplog_dlas_info, choose_last):
    auto = run(tmp_path, "auto")
    assert saved_choice(auto, 3) == {"precision": "bf16", "channels_last": {"gen": True}}
    assert any(m.startswith("auto: bf16, channels_last for gen; measured on a batch of 4") for m in caplog_dlas_info)
    named = run(tmp_path, "named", precision="bf16", channels_last="true")
    a, b = weights(auto, 4), weights(named, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = weights(run(tmp_path, "plain", precision="fp32", channels_last="false"), 4)
    assert not torch.equal(plain["gen/body.0.weight"], a["gen/body.0.weight"])  # the choice did change the run


def test_a_resumed_auto_run_reuses_its_choice_and_continues_bit_identically(tmp_path, caplog_dlas_info, monkeypatch,
                                                                            choose_last):
    full = run(tmp_path, "full", niter=6)
    run(tmp_path, "split", niter=3)

    def no_measuring(*args, **kwargs):
        raise AssertionError("a resume measured again")

    monkeypatch.setattr(speed, "measure", no_measuring)
    split = run(tmp_path, "split", niter=6)
    assert "auto: bf16, channels_last for gen, as measured when this run started" in caplog_dlas_info
    a, b = weights(full, 6), weights(split, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_combination_that_cannot_run_is_left_out_and_the_log_says_why(tmp_path, caplog_dlas_info):
    run_dir = run(tmp_path, "flat", precision="fp32", network="test_flattening")
    assert saved_choice(run_dir, 3) == {"channels_last": {"gen": False}}
    line = next(m for m in caplog_dlas_info if m.startswith("auto: contiguous memory"))
    assert "left out: channels_last (RuntimeError: view size is not compatible" in line


def test_a_precision_whose_losses_turn_non_finite_is_left_out(tmp_path, caplog_dlas_info):
    run_dir = run(tmp_path, "nan", channels_last="false", network="test_nan_under_autocast")
    assert saved_choice(run_dir, 3) == {"precision": "fp32"}
    line = next(m for m in caplog_dlas_info if m.startswith("auto: fp32; measured"))
    assert "left out: bf16 (FloatingPointError: non-finite losses or gradients)" in line


def test_the_measurement_leaves_every_random_generator_as_it_found_it(tmp_path):
    import random

    from dlas.trainer.trainer import ExtensibleTrainer

    path = tmp_path / "x.yml"
    path.write_text(CONFIG.format(name="x", niter=4, precision="auto", channels_last="auto", network="test_conv",
                                  root=tmp_path))
    cfg = load_config(str(path))
    batch = {"lq": torch.rand(4, 3, 8, 8), "hq": torch.rand(4, 3, 8, 8)}
    torch.manual_seed(0)
    random.seed(0)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    choice, _ = speed.measure(cfg, torch.device("cpu"), batch, lambda c: ExtensibleTrainer(c, torch.device("cpu")))
    assert choice in speed.candidates(cfg, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


@pytest.mark.parametrize("saved, fragment", [
    ({"precision": "fp16"}, "fp32 or bf16 expected"),
    ({"channels_last": {"gen": "yes"}}, "must map network names to true/false"),
    ("bf16", "must be a mapping"),
])
def test_a_malformed_saved_choice_makes_the_checkpoint_unusable(saved, fragment):
    state = {"step": 3, "steps": {}, "speed": saved}
    assert any(fragment in p for p in state_problems(state))
