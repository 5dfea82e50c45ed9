"""The pix and direct losses against hand-computed values."""
import math

import pytest
import torch

from dlas.context import Context
from dlas.errors import ConfigError
from dlas.registry import LOSSES

CTX = Context(networks={})
# Errors of 0, 1, -2 and 3 (fake - real).
STATE = {"gen": torch.tensor([[1.0, 2.0], [0.0, 3.0]]), "hq": torch.tensor([[1.0, 1.0], [2.0, 0.0]])}


def pix(**cfg):
    return LOSSES.build({"type": "pix", **cfg}, "steps.gen.losses.pix")


def test_l1_is_the_mean_absolute_error():
    assert pix(criterion="l1")(STATE, CTX).item() == pytest.approx((0 + 1 + 2 + 3) / 4)


def test_l2_is_the_mean_squared_error():
    assert pix(criterion="l2")(STATE, CTX).item() == pytest.approx((0 + 1 + 4 + 9) / 4)


def test_charbonnier_is_the_mean_of_sqrt_of_squared_error_plus_eps_squared():
    expected = sum(math.sqrt(e * e + 0.1 ** 2) for e in (0, 1, 2, 3)) / 4
    assert pix(criterion="charbonnier", eps=0.1)(STATE, CTX).item() == pytest.approx(expected)


def test_charbonnier_is_close_to_l1_for_errors_much_larger_than_eps():
    torch.manual_seed(0)
    state = {"gen": torch.rand(2, 3, 16, 16) * 0.5 + 0.1, "hq": torch.zeros(2, 3, 16, 16)}
    charbonnier = pix(criterion="charbonnier")(state, CTX).item()
    l1 = pix(criterion="l1")(state, CTX).item()
    # sqrt(e^2 + eps^2) - |e| is about eps^2 / (2|e|) <= 1e-6 / 0.2 here.
    assert l1 < charbonnier < l1 + 5e-6


def test_charbonnier_default_eps_is_1e_3():
    zero = {"gen": torch.zeros(4), "hq": torch.zeros(4)}
    assert pix(criterion="charbonnier")(zero, CTX).item() == pytest.approx(1e-3)


def test_pix_reads_the_configured_keys():
    loss = pix(real="target", fake="pred")
    assert sorted(loss.reads) == ["pred", "target"]
    assert loss({"pred": torch.ones(3), "target": torch.zeros(3)}, CTX).item() == 1.0


def test_pix_loss_gradient_flows_to_fake_only():
    fake = STATE["gen"].clone().requires_grad_()
    pix()({"gen": fake, "hq": STATE["hq"]}, CTX).backward()
    assert torch.equal(fake.grad, torch.tensor([[0.0, 0.25], [-0.25, 0.25]]))


def test_shape_mismatch_names_both_keys_and_shapes():
    with pytest.raises(ValueError, match=r"'gen' has shape \(1, 3, 8, 8\) but 'hq' has shape \(1, 3, 16, 16\)"):
        pix()({"gen": torch.zeros(1, 3, 8, 8), "hq": torch.zeros(1, 3, 16, 16)}, CTX)


def test_unknown_criterion_is_a_config_error_naming_the_option():
    with pytest.raises(ConfigError, match=r"steps\.gen\.losses\.pix\.criterion.*did you mean 'charbonnier'"):
        pix(criterion="charbonier")


def test_pix_computes_in_float32_for_half_inputs():
    state = {"gen": torch.full((4,), 1000.0, dtype=torch.bfloat16), "hq": torch.full((4,), 999.0)}
    value = pix(criterion="l2")(state, CTX)
    assert value.dtype == torch.float32 and value.item() == 1.0


def test_direct_returns_a_scalar_key_as_it_is():
    nll = torch.tensor(3.5, requires_grad=True)
    loss = LOSSES.build({"type": "direct", "key": "nll"})
    assert loss.reads == ["nll"] and loss({"nll": nll}, CTX) is nll


def test_direct_averages_a_per_sample_loss():
    value = LOSSES.build({"type": "direct", "key": "nll"})({"nll": torch.tensor([1.0, 2.0, 6.0])}, CTX)
    assert value.dim() == 0 and value.item() == 3.0
