"""Optimizers built from config dicts with the framework's (name, parameter) pairs."""
import pytest
import torch

from dlas.errors import ConfigError
from dlas.registry import OPTIMIZERS
from dlas.trainer.optimizers import decays


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 4)
        self.conv = torch.nn.Conv2d(4, 4, 3)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.linear = torch.nn.Linear(4, 4)
        self.pos_emb = torch.nn.Parameter(torch.zeros(1, 16, 4))


def named(net: torch.nn.Module, prefix: str = "generator"):
    return [(f"{prefix}.{name}", p) for name, p in net.named_parameters()]


def build(params, **cfg):
    return OPTIMIZERS.build(cfg, "steps.gen.optimizer", params=params)


def test_adamw_decays_only_weight_matrices_and_kernels():
    net = Block()
    opt = build(named(net), type="adamw", weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net.conv.weight), id(net.linear.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(p) for p in (net.embedding.weight, net.conv.bias, net.norm.weight, net.norm.bias, net.linear.bias,
                        net.pos_emb)}


@pytest.mark.parametrize("name, shape, expected", [
    ("g.body.0.conv1.weight", (8, 8, 3, 3), True),
    ("g.body.0.conv1.bias", (8,), False),
    ("t.layers.3.ln_1.weight", (8,), False),
    ("t.norm_out.weight", (1, 8, 1, 1), False),
    ("t.tok_embedding.weight", (100, 8), False),
    ("t.wpe.weight", (100, 8), False),
    ("g.assembler.weight", (8, 8), True),  # "emb" inside a word is not an embedding
])
def test_decay_rule_by_dimensions_and_module_names(name, shape, expected):
    assert decays(name, torch.zeros(shape)) is expected


def test_adam_steps_exactly_like_torch_adam():
    torch.manual_seed(0)
    ours_net, ref_net = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    ref_net.load_state_dict(ours_net.state_dict())
    ours = build(named(ours_net), type="adam", lr=1e-2, betas=[0.9, 0.99], weight_decay=1e-3)
    ref = torch.optim.Adam(ref_net.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-3)
    for _ in range(5):
        x = torch.randn(4, 5)
        for net, opt in ((ours_net, ours), (ref_net, ref)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(ours_net.parameters(), ref_net.parameters()):
        assert torch.equal(a, b)


def test_cpu_parameters_use_the_foreach_implementation():
    opt = build(named(torch.nn.Linear(2, 2)), type="sgd")
    assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")


def test_sgd_takes_momentum_and_nesterov():
    opt = build(named(torch.nn.Linear(2, 2)), type="sgd", lr=0.1, momentum=0.8, nesterov=True)
    assert (opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["nesterov"]) == (0.1, 0.8, True)


def test_nesterov_without_momentum_is_a_config_error():
    with pytest.raises(ConfigError, match="nesterov"):
        build(named(torch.nn.Linear(2, 2)), type="sgd", momentum=0.0, nesterov=True)


def test_a_parameter_shared_by_two_trained_networks_is_optimized_once():
    shared = torch.nn.Linear(2, 2)
    opt = build(named(shared, "a") + named(shared, "b"), type="adam")
    assert len(opt.param_groups[0]["params"]) == 2


def test_betas_must_be_a_pair():
    with pytest.raises(ConfigError, match=r"steps\.gen\.optimizer\.betas"):
        build(named(torch.nn.Linear(2, 2)), type="adam", betas=[0.9])
