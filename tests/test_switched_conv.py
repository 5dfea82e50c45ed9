"""SwitchedConv: equivalences with Conv2d, the fast hard path against the all-experts reference, the selector's
gradient, balancing, dropout, temperature."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError
from dlas.models.switched import (
    SwitchedConv,
    TemperatureSchedule,
    advance_switches,
    balance_loss,
    convert_to_switched,
    expand_state_dict,
    switch_debug_info,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_conv(c_in=3, c_out=5, k=3, stride=1, padding=1, dilation=1, bias=True, padding_mode="zeros"):
    torch.manual_seed(0)
    return nn.Conv2d(c_in, c_out, k, stride, padding, dilation, bias=bias, padding_mode=padding_mode)


@pytest.mark.parametrize("stride,padding,dilation,bias", [(1, 1, 1, True), (2, 1, 1, False), (1, 2, 2, True),
                                                          (2, 0, 1, True)])
def test_soft_mode_with_one_expert_equals_conv2d_with_the_same_weights(stride, padding, dilation, bias):
    conv = make_conv(stride=stride, padding=padding, dilation=dilation, bias=bias)
    switched = SwitchedConv(3, 5, 3, 1, stride=stride, padding=padding, dilation=dilation, bias=bias, mode="soft")
    with torch.no_grad():
        switched.weight.copy_(conv.weight[None])
        if bias:
            switched.bias.copy_(conv.bias[None])
    x = torch.randn(2, 3, 11, 9)
    torch.testing.assert_close(switched(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_from_conv_reproduces_the_trained_convs_output(mode, padding_mode):
    conv = make_conv(stride=2, padding_mode=padding_mode)
    switched = SwitchedConv.from_conv(conv, 4, mode=mode).train()
    x = torch.randn(2, 3, 10, 12)
    out = switched(x)
    assert switched.last_map.unique().numel() > 1  # routed between several experts, yet the same output
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)


def test_a_switched_conv_can_replace_a_conv_of_any_network_in_place():
    net = nn.Sequential(make_conv(), nn.ReLU(), make_conv(5, 2))
    x = torch.randn(1, 3, 8, 8)
    expected = net(x)
    assert convert_to_switched(net, ["0"], 3) == ["0"]
    assert isinstance(net[0], SwitchedConv) and isinstance(net[2], nn.Conv2d)
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- the fast hard path
FAST_CASES = [  # (in, out, kernel, experts, stride, padding, dilation, height, width)
    (3, 4, 3, 4, 1, 1, 1, 9, 7),
    (4, 6, 3, 8, 2, 1, 1, 10, 9),
    (5, 3, 1, 3, 1, 0, 1, 6, 6),
    (2, 5, 5, 2, 2, 2, 1, 11, 8),
    (3, 4, 3, 5, 1, 2, 2, 9, 9),
    (6, 2, 3, 16, 1, 0, 1, 8, 10),
]


def fast_and_reference(c_in, c_out, k, experts, stride, padding, dilation, dtype=torch.float32):
    torch.manual_seed(1)
    fast = SwitchedConv(c_in, c_out, k, experts, stride=stride, padding=padding, dilation=dilation).to(dtype)
    reference = SwitchedConv(c_in, c_out, k, experts, stride=stride, padding=padding, dilation=dilation,
                             implementation="reference").to(dtype)
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def outputs_and_gradients(layer, x, grad):
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(grad)
    grads = {"input": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return out, grads


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: "in{}-out{}-k{}-K{}-s{}-p{}-d{}".format(*c[:7]))
def test_fast_hard_path_equals_the_all_experts_reference_in_outputs_and_gradients(case):
    *layer_args, height, width = case
    fast, reference = fast_and_reference(*layer_args)
    x = torch.randn(3, layer_args[0], height, width)
    with torch.no_grad():
        grad = torch.randn_like(reference(x))
    out_ref, grads_ref = outputs_and_gradients(reference.train(), x, grad)
    out_fast, grads_fast = outputs_and_gradients(fast.train(), x, grad)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-5)
    assert grads_fast.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fast_hard_path_matches_the_reference_in_double_precision_and_under_gradcheck():
    fast, reference = fast_and_reference(2, 3, 3, 3, 2, 1, 1, dtype=torch.float64)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    fast.eval()
    reference.eval()
    torch.testing.assert_close(fast(x), reference(x), rtol=1e-12, atol=1e-12)
    # gradcheck through the routed conv alone: the routing is piecewise constant in the input
    from dlas.models.switched.routed import routed_conv

    winner = torch.randint(3, (2, 4, 3))
    weight = fast.weight.detach().clone().requires_grad_()
    bias = fast.bias.detach().clone().requires_grad_()
    gate = torch.rand(2, 4, 3, dtype=torch.float64, requires_grad=True)
    padded_inside = lambda t, w, b, g: routed_conv(t, winner, w, b, (2, 2), (1, 1), padding=(1, 1), gate=g)
    assert torch.autograd.gradcheck(padded_inside, (x, weight, bias, gate))
    padded_outside = lambda t, w: routed_conv(F.pad(t, (1, 1, 1, 1)), winner, w, None, (2, 2), (1, 1))
    assert torch.autograd.gradcheck(padded_outside, (x, weight))


def test_fast_hard_path_runs_under_bf16_autocast_close_to_float32():
    fast, _ = fast_and_reference(8, 8, 3, 4, 1, 1, 1)
    x = torch.randn(2, 8, 8, 8)
    expected = fast(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------- learning the routing
def test_gradients_reach_the_selector_and_every_chosen_expert_only():
    torch.manual_seed(2)
    layer = SwitchedConv(3, 4, 3, 6, usage_history=0).train()
    x = torch.randn(1, 3, 3, 3)  # 9 pixels, 6 experts: some experts are not chosen
    layer(x).square().sum().backward()
    chosen = set(layer.last_map.flatten().tolist())
    assert 1 < len(chosen) < 6
    assert layer.selector.weight.grad.abs().sum() > 0
    for expert in range(6):
        used = layer.weight.grad[expert].abs().sum() > 0
        assert bool(used) == (expert in chosen), expert


def test_straight_through_gives_the_log_prob_gradient_scaled_by_the_winners_probability():
    torch.manual_seed(3)
    x = torch.randn(1, 3, 4, 4)
    grads = {}
    for rule in ("log_prob", "straight_through"):
        torch.manual_seed(4)
        layer = SwitchedConv(3, 2, 3, 4, usage_history=0, route_gradient=rule).train()
        logits = layer.selector(x).detach().requires_grad_()
        layer.selector = nn.Identity()
        layer(x, guide=logits).sum().backward()
        grads[rule] = logits.grad
        probs = torch.softmax(logits.detach(), dim=1)
    p_winner = probs.max(dim=1, keepdim=True).values
    torch.testing.assert_close(grads["straight_through"], grads["log_prob"] * p_winner, rtol=1e-5, atol=1e-7)


def test_a_guide_tensor_and_not_the_input_decides_the_routing():
    torch.manual_seed(5)
    layer = SwitchedConv(3, 2, 3, 4, selector_channels=6, usage_history=0).train()
    guide = torch.randn(1, 6, 8, 8)
    layer(torch.randn(1, 3, 8, 8), guide)
    first = layer.last_map.clone()
    layer(torch.randn(1, 3, 8, 8), guide)
    assert torch.equal(layer.last_map, first)
    layer(torch.randn(1, 3, 8, 8), torch.randn(1, 6, 8, 8))
    assert not torch.equal(layer.last_map, first)


def test_a_guide_of_another_resolution_is_resized_to_the_output():
    layer = SwitchedConv(3, 2, 3, 4, stride=2, selector_channels=5)
    assert layer(torch.randn(2, 3, 16, 16), torch.randn(2, 5, 4, 4)).shape == (2, 2, 8, 8)


def skewed_layer(usage_history: int) -> SwitchedConv:
    torch.manual_seed(6)
    layer = SwitchedConv(4, 4, 3, 4, usage_history=usage_history).train()
    with torch.no_grad():
        layer.selector.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # expert 0 wins almost everywhere
    return layer


def usage_entropy(layer: SwitchedConv) -> float:
    return float(switch_debug_info(layer)["switch/usage_entropy"])


def test_rolling_usage_balancing_evens_out_a_selector_that_favours_one_expert():
    entropies = {}
    for history in (0, 8):
        layer = skewed_layer(history)
        for _ in range(10):
            advance_switches(layer)
            layer(torch.randn(4, 4, 8, 8))
        layer.take_routed_pixels()
        layer(torch.randn(4, 4, 8, 8))
        entropies[history] = usage_entropy(layer)
    assert entropies[0] < 0.5
    assert entropies[8] > 0.9


def test_the_auxiliary_balance_loss_evens_out_a_selector_that_favours_one_expert():
    layer = skewed_layer(0)
    x = torch.randn(2, 4, 6, 6)
    optimizer = torch.optim.SGD(layer.selector.parameters(), lr=2.0)
    layer(x)
    before = usage_entropy(layer)
    first_loss = None
    for _ in range(15):
        layer(x)
        loss = balance_loss(layer)
        first_loss = first_loss or float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layer.take_routed_pixels()
    layer(x)
    assert before < 0.5 < usage_entropy(layer)
    assert float(balance_loss(layer).detach()) < first_loss


def test_usage_is_recorded_once_per_iteration_and_only_from_training_forwards():
    layer = skewed_layer(4)
    layer(torch.randn(2, 4, 6, 6))
    layer(torch.randn(2, 4, 6, 6))
    with torch.no_grad():
        layer(torch.randn(2, 4, 6, 6))
    assert float(layer.usage_pending_count) == 2
    advance_switches(layer)
    assert int(layer.usage_slot) == 1 and float(layer.usage_pending_count) == 0
    assert float(layer.usage_record[0, 0]) > 2  # expert 0's relative usage: far above the mean of 1
    torch.testing.assert_close(layer.usage_record[1:], torch.ones(3, 4))
    advance_switches(layer)  # an iteration without a forward records nothing
    assert int(layer.usage_slot) == 1


def test_usage_record_and_temperature_are_saved_with_the_weights():
    layer = skewed_layer(4)
    layer(torch.randn(2, 4, 6, 6))
    advance_switches(layer, temperature=3.5)
    keys = set(layer.state_dict())
    assert {"temperature", "usage_record", "usage_slot", "usage_pending", "usage_pending_count"} <= keys
    assert "routed_pixels" not in keys  # a debug counter, not state
    fresh = skewed_layer(4)
    fresh.load_state_dict(layer.state_dict())
    assert float(fresh.temperature) == 3.5
    assert torch.equal(fresh.usage_record, layer.usage_record)


def test_expert_dropout_drops_whole_experts_per_sample_and_keeps_at_least_one():
    torch.manual_seed(7)
    layer = SwitchedConv(3, 2, 3, 4, mode="soft", usage_history=0, dropout=0.9).train()
    probs = layer.probabilities(layer.selector(torch.randn(64, 3, 5, 5)))
    kept = probs.amax(dim=(2, 3)) > 0  # [samples, experts]
    assert kept.any(dim=1).all()
    assert (kept.sum(dim=1) < 4).all()
    assert 0.1 < kept.float().mean() < 0.4  # about 1 - 0.9, plus the one always kept
    assert (probs.sum(dim=1) - 1).abs().max() < 1e-5
    layer.eval()
    assert (layer.probabilities(layer.selector(torch.randn(8, 3, 5, 5))) > 0).all()  # no dropout in evaluation


def test_temperature_schedule_is_linear_then_constant():
    schedule = TemperatureSchedule(10.0, 1.0, 100)
    assert [schedule(i) for i in (0, 50, 100, 1000)] == [10.0, 5.5, 1.0, 1.0]
    assert TemperatureSchedule(2.0, 2.0, 0)(7) == 2.0
    with pytest.raises(ConfigError, match="temperature_end"):
        TemperatureSchedule(1.0, 0.0, 10)


def test_temperature_flattens_soft_routing():
    layer = SwitchedConv(3, 2, 3, 4, mode="soft", usage_history=0)
    logits = layer.selector(torch.randn(2, 3, 5, 5))
    sharp = layer.probabilities(logits).amax(dim=1).mean()
    layer.temperature.fill_(100.0)
    assert layer.probabilities(logits).amax(dim=1).mean() < sharp
    assert layer.probabilities(logits).amax(dim=1).max() < 0.3  # nearly uniform over 4 experts


@pytest.mark.parametrize("option,value", [("num_experts", 0), ("dropout", 1.0), ("usage_history", -1),
                                          ("mode", "medium")])
def test_bad_options_are_config_errors_naming_the_option(option, value):
    kwargs = {"num_experts": 4, option: value}
    with pytest.raises(ConfigError) as info:
        SwitchedConv(3, 2, 3, **kwargs)
    assert info.value.problems[0].path == option


def test_a_plain_state_dict_expands_onto_switched_layers():
    plain = nn.Sequential(make_conv(), nn.ReLU(), make_conv(5, 2))
    switched = nn.Sequential(make_conv(), nn.ReLU(), make_conv(5, 2))
    convert_to_switched(switched, ["*"], 3)
    for layer in switched:  # the switched layers start out different from the plain ones
        if isinstance(layer, SwitchedConv):
            nn.init.normal_(layer.weight)
    switched.load_state_dict(expand_state_dict(plain.state_dict(), switched))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(switched(x), plain(x), rtol=1e-5, atol=1e-5)
    assert expand_state_dict(switched.state_dict(), switched).keys() == switched.state_dict().keys()
