"""ExtensibleTrainer: a config-driven run equals the hand-written PyTorch loop of the same math."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import trainer_components  # registers test_conv, test_critic, test_random_pairs

from dlas.config import resolve_config
from dlas.errors import ConfigError
from dlas.trainer.ema import EMA
from dlas.trainer.schedules import Gate
from dlas.trainer.trainer import ExtensibleTrainer

CPU = torch.device("cpu")


def base_cfg(**train):
    return {
        "name": "t",
        "networks": {"gen": {"type": "test_conv", "nf": 4}},
        "steps": {
            "gen": {
                "training": ["gen"],
                "optimizer": {"type": "adam", "lr": 1e-2, "betas": [0.9, 0.99]},
                "injectors": {"g": {"type": "generator", "network": "gen", "in": "lq", "out": "out"}},
                "losses": {"pix": {"type": "pix", "criterion": "l1", "real": "hq", "fake": "out", "weight": 1.0}},
            }
        },
        "train": {"niter": 10, "mega_batch_factor": 1, **train},
    }


def batches(n, batch_size=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lq = torch.rand(batch_size, 3, size, size, generator=g)
        out.append({"lq": lq, "hq": (lq * 0.5 + 0.25).flip(1)})
    return out


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return ExtensibleTrainer(resolve_config(cfg, training=False), CPU)


def reference_net(seed=0, nf=4):
    torch.manual_seed(seed)
    return trainer_components.TestConv(nf=nf)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol=1e-6):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=atol), f"{name} differs by {(p - q).abs().max()}"


def test_config_run_equals_hand_written_loop():
    trainer = build(base_cfg())
    net = reference_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for batch in batches(5):
        trainer.train_step(batch)
        opt.zero_grad()
        F.l1_loss(net(batch["lq"]), batch["hq"]).backward()
        opt.step()
    assert trainer.iteration == 5
    assert_same_weights(trainer.networks["gen"], net, atol=0)


def with_optimizer(cfg, optimizer):
    cfg["steps"]["gen"]["optimizer"] = optimizer
    return cfg


# Adam normalises the gradient's scale away, so only SGD sees a loss that is not divided by the micro-batch count.
@pytest.mark.parametrize("optimizer", [{"type": "adam", "lr": 1e-2, "betas": [0.9, 0.99]},
                                       {"type": "sgd", "lr": 0.05, "momentum": 0.0}], ids=["adam", "sgd"])
@pytest.mark.parametrize("factor", [2, 4])
def test_mega_batching_is_the_same_update_as_the_full_batch(factor, optimizer):
    full = build(with_optimizer(base_cfg(), optimizer))
    mega = build(with_optimizer(base_cfg(mega_batch_factor=factor), optimizer))
    for batch in batches(4):
        full.train_step(batch)
        mega.train_step(batch)
    assert_same_weights(full.networks["gen"], mega.networks["gen"], atol=1e-6)


def test_the_trainer_updates_the_ema_after_every_optimizer_step():
    trainer = build(base_cfg(ema={"rate": 0.9}))
    shadow = copy.deepcopy(trainer.networks["gen"].state_dict())
    for batch in batches(3):
        trainer.train_step(batch)
        for key, value in trainer.networks["gen"].state_dict().items():
            shadow[key] = 0.9 * shadow[key] + 0.1 * value
    for key, value in trainer.ema.primary("gen").state_dict().items():
        assert torch.allclose(value, shadow[key], atol=1e-6), key
    assert trainer.ema.updates == 3


def test_gates_and_weight_schedules_match_the_hand_written_math():
    cfg = base_cfg()
    losses = cfg["steps"]["gen"]["losses"]
    losses["pix"]["weight"] = {"schedule": "linear", "from": 0.0, "to": 1.0, "start": 1, "end": 4}
    losses["l2"] = {"type": "pix", "criterion": "l2", "real": "hq", "fake": "out", "weight": 2.0, "after": 2}
    trainer = build(cfg)
    net = reference_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for step, batch in enumerate(batches(6), start=1):
        trainer.train_step(batch)
        out = net(batch["lq"])
        w = min(max((step - 1) / 3, 0.0), 1.0)
        loss = w * F.l1_loss(out, batch["hq"])
        if step > 2:
            loss = loss + 2.0 * F.mse_loss(out, batch["hq"])
        if step == 1:  # every loss is zero-weighted or gated off: the step makes no update at all
            continue
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_same_weights(trainer.networks["gen"], net, atol=1e-6)


def gan_cfg():
    cfg = base_cfg()
    cfg["networks"]["critic"] = {"type": "test_critic"}
    cfg["steps"] = {
        "gen": {
            "training": ["gen"],
            "optimizer": {"type": "adam", "lr": 1e-2},
            "injectors": {"g": {"type": "generator", "network": "gen", "in": "lq", "out": "fake"}},
            "losses": {
                "pix": {"type": "pix", "criterion": "l1", "real": "hq", "fake": "fake"},
                # the critic's score of the fake, as a direct loss: gradients reach gen *through* the critic
                "adv": {"type": "direct", "key": "score"},
            },
        },
        "critic": {
            "training": ["critic"],
            "optimizer": {"type": "adam", "lr": 1e-2},
            "injectors": {
                "f": {"type": "generator", "network": "gen", "in": "lq", "out": "fake", "grad": False},
                "d": {"type": "generator", "network": "critic", "in": "fake", "out": "dfake"},
            },
            "losses": {"d": {"type": "direct", "key": "dfake", "weight": -1.0}},
        },
    }
    cfg["steps"]["gen"]["injectors"]["s"] = {"type": "generator", "network": "critic", "in": "fake", "out": "score"}
    return cfg


def test_each_gan_step_changes_only_its_own_networks():
    trainer = build(gan_cfg())
    batch = batches(1)[0]
    gen_step, critic_step = trainer.steps
    before = copy.deepcopy({n: net.state_dict() for n, net in trainer.networks.items()})
    critic_step.gate = Gate(after=10**9)  # only the generator step runs
    trainer.train_step(batch)
    assert all(torch.equal(v, trainer.networks["critic"].state_dict()[k]) for k, v in before["critic"].items())
    assert not all(torch.equal(v, trainer.networks["gen"].state_dict()[k]) for k, v in before["gen"].items())
    # the critic got no gradients while the generator step called it
    assert all(p.grad is None for p in trainer.networks["critic"].parameters())

    critic_step.gate = Gate()
    gen_step.gate = Gate(after=10**9)
    before = copy.deepcopy({n: net.state_dict() for n, net in trainer.networks.items()})
    trainer.train_step(batch)
    assert all(torch.equal(v, trainer.networks["gen"].state_dict()[k]) for k, v in before["gen"].items())
    assert not all(torch.equal(v, trainer.networks["critic"].state_dict()[k]) for k, v in before["critic"].items())


def test_networks_not_trained_by_a_step_build_no_graph_for_their_parameters():
    trainer = build(gan_cfg())
    trainer.steps[1].gate = Gate(after=10**9)
    trainer.train_step(batches(1)[0])
    assert all(p.requires_grad for p in trainer.networks["critic"].parameters()), "flags restored after the step"
    assert all(p.grad is None for p in trainer.networks["critic"].parameters())


def test_non_finite_loss_skips_the_update_and_counts_it():
    trainer = build(base_cfg())
    before = copy.deepcopy(trainer.networks["gen"].state_dict())
    batch = batches(1)[0]
    batch["hq"][0, 0, 0, 0] = float("nan")
    logs = trainer.train_step(batch)
    assert trainer.bad_steps == 1 and trainer.bad_total == 1
    assert not math.isfinite(float(logs["gen/pix"]))
    for k, v in before.items():
        assert torch.equal(v, trainer.networks["gen"].state_dict()[k])
    trainer.train_step(batches(1)[0])
    assert trainer.bad_steps == 0 and trainer.bad_total == 1


def test_a_fused_optimizer_skips_a_non_finite_update_on_the_device_and_the_ema_with_it():
    cfg = base_cfg(ema={"rate": 0.9})
    cfg["steps"]["gen"]["optimizer"] = {"type": "test_fused_adam", "lr": 1e-2}
    trainer = build(cfg)
    assert trainer.steps[0].optimizer.defaults["fused"]
    good, bad = batches(2)
    trainer.train_step(good)  # the shadow now lags the weights, so a wrong EMA update would move it
    before = copy.deepcopy(trainer.networks["gen"].state_dict())
    shadow = copy.deepcopy(trainer.ema.primary("gen").state_dict())
    bad["hq"][0, 0, 0, 0] = float("nan")
    logs = trainer.train_step(bad)
    assert trainer.bad_steps == 1 and float(logs["skipped/gen"]) == 1.0
    for k, v in trainer.networks["gen"].state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in trainer.ema.primary("gen").state_dict().items():
        assert torch.equal(v, shadow[k]), k
    assert all(float(s["step"]) == 1 for s in trainer.steps[0].optimizer.state.values())
    trainer.train_step(good)
    assert trainer.bad_steps == 0 and trainer.bad_total == 1
    assert any(not torch.equal(v, before[k]) for k, v in trainer.networks["gen"].state_dict().items())


def test_ema_follows_the_exponential_average():
    net = torch.nn.Linear(2, 2)
    ema = EMA({"n": net}, rates=[0.9, 0.5])
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema.update(0)  # first update at `start` copies
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(1)
    ema.update(2)
    assert torch.allclose(ema.shadows[0.9]["n"].weight, torch.full((2, 2), 1 - 0.9**2))
    assert torch.allclose(ema.shadows[0.5]["n"].weight, torch.full((2, 2), 1 - 0.5**2))
    assert set(ema.state_dicts()) == {"n_ema", "n_ema_0.5"}


def test_ema_warmup_uses_a_smaller_decay_early():
    ema = EMA({"n": torch.nn.Linear(1, 1)}, rates=[0.999], warmup=10)
    assert ema.decay(0.999) == pytest.approx(1 / 10)
    ema.updates = 10_000
    assert ema.decay(0.999) == pytest.approx(0.999)


def test_trainer_uses_ema_for_validation_networks():
    cfg = base_cfg(ema={"rate": 0.5, "networks": ["gen"]})
    trainer = build(cfg)
    for batch in batches(3):
        trainer.train_step(batch)
    nets = trainer.eval_networks()
    assert nets["gen"] is trainer.ema.primary("gen")
    assert not torch.equal(nets["gen"].body[0].weight, trainer.networks["gen"].body[0].weight)


def test_set_step_hook_receives_the_step_counter():
    trainer = build(base_cfg())
    for batch in batches(3):
        trainer.train_step(batch)
    assert trainer.networks["gen"].steps_seen == [1, 2, 3]


def test_static_check_reports_unproduced_keys_and_unreached_networks():
    cfg = gan_cfg()
    cfg["steps"]["gen"]["losses"]["pix"]["real"] = "hr"
    cfg["steps"]["critic"]["training"] = ["critic", "gen"]
    cfg["steps"]["critic"]["injectors"]["d"]["in"] = "lq"
    trainer = build(cfg)
    with pytest.raises(ConfigError) as info:
        trainer.check_graph(["lq", "hq"])
    paths = {p.path for p in info.value.problems}
    assert "steps.gen.losses.pix" in paths
    assert "steps.critic.training[1]" in paths
    assert any("'hr'" in p.message for p in info.value.problems)


def test_state_dict_round_trip_continues_identically():
    a = build(base_cfg(ema={"rate": 0.9}))
    data = batches(6)
    for batch in data[:3]:
        a.train_step(batch)
    b = build(base_cfg(ema={"rate": 0.9}), seed=99)
    b.load_state_dict(copy.deepcopy(a.state_dict()), copy.deepcopy(a.weights()))
    for batch in data[3:]:
        a.train_step(batch)
        b.train_step(batch)
    assert_same_weights(a.networks["gen"], b.networks["gen"], atol=0)
    assert_same_weights(a.ema.primary("gen"), b.ema.primary("gen"), atol=0)


def test_activation_checkpointing_gives_the_same_gradients():
    plain = build(base_cfg())
    cfg = base_cfg()
    cfg["networks"]["gen"]["checkpointing"] = True
    ckpt = build(cfg)
    for batch in batches(2):
        plain.train_step(batch)
        ckpt.train_step(batch)
    assert_same_weights(plain.networks["gen"], ckpt.networks["gen"], atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_under_autocast(precision):
    cfg = base_cfg()
    cfg["precision"] = precision
    trainer = build(cfg)
    before = copy.deepcopy(trainer.networks["gen"].state_dict())
    logs = {}
    for batch in batches(3):
        logs = trainer.train_step(batch)
    assert math.isfinite(float(logs["gen/pix"])) and trainer.bad_total == 0
    assert (trainer.steps[0].scaler is not None) == (precision == "fp16")
    assert all(v.dtype == torch.float32 for v in trainer.networks["gen"].state_dict().values())
    assert not torch.equal(before["body.0.weight"], trainer.networks["gen"].state_dict()["body.0.weight"])
    # the scaler's state is part of the step's checkpoint state
    assert ("scaler" in trainer.state_dict()["steps"]["gen"]) and \
        (trainer.state_dict()["steps"]["gen"]["scaler"] is not None) == (precision == "fp16")


def test_grad_clip_matches_clip_grad_norm_and_norms_are_logged_per_network():
    cfg = base_cfg()
    cfg["steps"]["gen"]["grad_clip"] = 0.01
    trainer = build(cfg)
    net = reference_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for batch in batches(3):
        logs = trainer.train_step(batch)
        opt.zero_grad()
        F.l1_loss(net(batch["lq"]), batch["hq"]).backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 0.01)
        opt.step()
        assert float(logs["grad_norm/gen"]) == pytest.approx(float(norm), rel=1e-5)
        assert float(logs["gen/grad_norm"]) == pytest.approx(float(norm), rel=1e-5)
    assert_same_weights(trainer.networks["gen"], net, atol=1e-6)


def test_debug_values_logged_by_losses_are_averaged_over_micro_batches():
    cfg = base_cfg(mega_batch_factor=2)
    trainer = build(cfg)
    pix = trainer.steps[0].losses[0].loss
    original = type(pix).forward

    def logging_forward(self, state, ctx):
        ctx.log("first_value", state["lq"].flatten()[0])
        return original(self, state, ctx)

    pix.forward = logging_forward.__get__(pix)
    batch = batches(1)[0]
    logs = trainer.train_step(batch)
    expected = (batch["lq"][0].flatten()[0] + batch["lq"][2].flatten()[0]) / 2
    assert float(logs["debug/first_value"]) == pytest.approx(float(expected))


def test_static_check_reports_visuals_nothing_produces():
    cfg = base_cfg()
    cfg["logger"] = {"visuals": ["lq", "out", "ouput"]}
    with pytest.raises(ConfigError) as info:
        build(cfg).check_graph(["lq", "hq"])
    assert [p.path for p in info.value.problems] == ["logger.visuals[2]"]
    assert "did you mean 'out'" in info.value.problems[0].message
