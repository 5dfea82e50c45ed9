"""LR schedulers: values at chosen steps and resuming from a state_dict."""
import io
import math

import pytest
import torch

from dlas.errors import ConfigError
from dlas.registry import OPTIMIZERS, SCHEDULERS


def make(cfg: dict, lr: float = 1.0):
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = OPTIMIZERS.build({"type": "sgd", "lr": lr, "momentum": 0.0}, params=[("net.w", param)])
    return optimizer, SCHEDULERS.build(cfg, "train.lr_scheduler", optimizer=optimizer)


def lrs(optimizer, scheduler, steps: int) -> list[float]:
    """The lr each of the next ``steps`` training steps uses, stepping as the trainer does."""
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def test_constant_keeps_the_lr():
    assert lrs(*make({"type": "constant"}, lr=3e-4), 5) == [3e-4] * 5


def test_multistep_halves_after_each_milestone():
    used = lrs(*make({"type": "multistep", "milestones": [2, 4], "gamma": 0.5}), 6)
    assert used == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_multistep_milestones_must_increase():
    with pytest.raises(ConfigError, match="milestones"):
        make({"type": "multistep", "milestones": [4, 2]})


def test_cosine_falls_to_eta_min_at_the_period_end_then_restarts_at_its_weight():
    used = lrs(*make({"type": "cosine", "periods": [4, 4], "restart_weights": [1.0, 0.5], "eta_min": 0.1}), 10)
    assert used[0] == pytest.approx(1.0)
    assert used[2] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the first period
    assert used[4] == pytest.approx(0.1)  # end of the first period
    assert used[5] == pytest.approx(0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi / 4)) / 2)  # restarted at half height
    assert used[8] == pytest.approx(0.1)


def test_cosine_holds_eta_min_after_the_last_period():
    used = lrs(*make({"type": "cosine", "periods": [3], "eta_min": 1e-7}), 8)
    assert used[3:] == pytest.approx([1e-7] * 5)


def test_cosine_needs_one_restart_weight_per_period():
    with pytest.raises(ConfigError, match="restart_weights"):
        make({"type": "cosine", "periods": [4, 4], "restart_weights": [1.0]})


def test_linear_warmup_ramps_then_defers_to_the_wrapped_scheduler():
    cfg = {"type": "linear_warmup", "warmup_steps": 4, "start_factor": 0.0,
           "scheduler": {"type": "multistep", "milestones": [2, 6], "gamma": 0.5}}
    used = lrs(*make(cfg), 8)
    # Warm-up factors 0, 1/4, 2/4, 3/4 times the multistep lr 1, 1, 0.5, 0.5; then multistep alone.
    assert used == pytest.approx([0.0, 0.25, 0.25, 0.375, 0.5, 0.5, 0.25, 0.25])


def test_linear_warmup_defaults_to_a_constant_lr_after_the_ramp():
    used = lrs(*make({"type": "linear_warmup", "warmup_steps": 2, "start_factor": 0.5}, lr=2.0), 4)
    assert used == pytest.approx([1.0, 1.5, 2.0, 2.0])


def test_linear_warmup_reports_errors_of_the_wrapped_scheduler():
    with pytest.raises(ConfigError, match=r"scheduler\.gama"):
        make({"type": "linear_warmup", "scheduler": {"type": "multistep", "milestones": [1], "gama": 0.5}})


@pytest.mark.parametrize("inner,where", [
    ({"type": "multistep", "milestones": [1], "gama": 0.5}, "train.lr_scheduler.scheduler.gama"),
    ({"type": "multistep", "milestones": [5, 3]}, "train.lr_scheduler.scheduler.milestones"),
    ({"type": "cosin"}, "train.lr_scheduler.scheduler.type"),
])
def test_linear_warmup_names_the_wrapped_schedulers_dotted_path_once(inner, where):
    with pytest.raises(ConfigError) as error:
        make({"type": "linear_warmup", "scheduler": inner})
    assert [problem.path for problem in error.value.problems] == [where]


@pytest.mark.parametrize("cfg", [
    {"type": "multistep", "milestones": [3, 5], "gamma": 0.5},
    {"type": "cosine", "periods": [4, 3], "restart_weights": [1.0, 0.7], "eta_min": 0.01},
    {"type": "linear_warmup", "warmup_steps": 5,
     "scheduler": {"type": "cosine", "periods": [6, 6], "restart_weights": [1.0, 0.5]}},
    {"type": "linear_warmup", "warmup_steps": 5, "scheduler": {"type": "multistep", "milestones": [3, 7]}},
])
def test_resuming_from_state_dicts_continues_identically(cfg):
    uninterrupted = lrs(*make(cfg), 12)
    optimizer, scheduler = make(cfg)
    first = lrs(optimizer, scheduler, 4)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as checkpoints are loaded
    # A fresh process: build everything again from the config, then load the saved states.
    optimizer, scheduler = make(cfg)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    assert first + lrs(optimizer, scheduler, 8) == uninterrupted
