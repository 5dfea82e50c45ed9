"""SRFlow's invertible layers: exact inverses, log-determinants equal to autograd's, sane initialisation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dlas.models.srflow.layers import (
    ActNorm2d,
    AffineCoupling,
    AffineInjector,
    Conv2dZeros,
    FlowStep,
    InvertibleConv1x1,
    Split,
    Squeeze,
    bounded_scale,
)

COND_CHANNELS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomise_zero_convs(layer: nn.Module) -> None:
    """Give the zero-initialised convs random weights, so that couplings and priors are not the identity."""
    for module in layer.modules():
        if isinstance(module, Conv2dZeros):
            nn.init.normal_(module.weight, std=0.3)
            nn.init.normal_(module.bias, std=0.3)
            nn.init.normal_(module.logs, std=0.1)


def _prepared(factory, x: torch.Tensor, cond: torch.Tensor) -> nn.Module:
    """Build a layer in float64, run its data-dependent init on ``x``, randomise it, then freeze it in eval mode."""
    layer = factory().double()
    layer.train()
    layer(x, cond)
    _randomise_zero_convs(layer)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("logs") and p.dim() == 4:  # actnorm scales away from their init value
                p.add_(0.2 * torch.randn_like(p))
    return layer.eval()


LAYERS = {
    "actnorm": lambda: ActNorm2d(4),
    "invconv": lambda: InvertibleConv1x1(4),
    "invconv_lu": lambda: InvertibleConv1x1(4, lu_decomposed=True),
    "squeeze": lambda: Squeeze(),
    "injector": lambda: AffineInjector(4, COND_CHANNELS, hidden_channels=8),
    "coupling": lambda: AffineCoupling(4, COND_CHANNELS, hidden_channels=8),
    "coupling_unconditional": lambda: AffineCoupling(4, 0, hidden_channels=8),
    "split": lambda: Split(4),
    "split_conditional": lambda: Split(4, COND_CHANNELS),
    "flow_step": lambda: FlowStep(4, COND_CHANNELS, hidden_channels=8),
    "transition_step": lambda: FlowStep(4),
    "flow_step_lu": lambda: FlowStep(4, COND_CHANNELS, hidden_channels=8, lu_decomposed=True),
}


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64)
    cond = torch.randn(1, COND_CHANNELS, 2, 2, generator=g, dtype=torch.float64)
    return x, cond


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_reverse_inverts_forward(name):
    torch.manual_seed(0)
    x, cond = _inputs()
    layer = _prepared(LAYERS[name], x, cond)
    x_other, _ = _inputs(seed=1)  # a batch other than the init batch
    with torch.no_grad():
        z, _ = layer(x_other, cond)
        assert not torch.allclose(z.flatten(), x_other.flatten()) or name == "squeeze"
        assert torch.allclose(layer.reverse(z, cond), x_other, atol=1e-4)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_logdet_equals_log_abs_det_of_autograd_jacobian(name):
    torch.manual_seed(0)
    x, cond = _inputs()
    layer = _prepared(LAYERS[name], x, cond)
    x_other, _ = _inputs(seed=1)
    jacobian = torch.autograd.functional.jacobian(lambda v: layer(v, cond)[0], x_other)
    expected = torch.linalg.slogdet(jacobian.reshape(x_other.numel(), x_other.numel()))[1]
    _, logdet = layer(x_other, cond)
    assert logdet.shape == (1,)
    assert logdet.item() == pytest.approx(expected.item(), abs=1e-6)


def test_logdet_is_per_sample_and_accumulates():
    torch.manual_seed(0)
    layer = AffineCoupling(4, 0, hidden_channels=8)
    x = torch.randn(3, 4, 4, 4)
    layer(x)
    _randomise_zero_convs(layer)
    _, alone = layer(x)
    _, accumulated = layer(x, logdet=torch.tensor([1.0, 2.0, 3.0]))
    assert alone.shape == (3,)
    assert torch.allclose(accumulated - alone, torch.tensor([1.0, 2.0, 3.0]), atol=1e-5)
    assert len(set(alone.tolist())) == 3


def test_actnorm_first_training_batch_comes_out_zero_mean_unit_variance():
    torch.manual_seed(0)
    actnorm = ActNorm2d(5)
    x = torch.randn(8, 5, 6, 6) * torch.tensor([0.1, 1.0, 3.0, 10.0, 0.5]).view(1, 5, 1, 1) + 7.0
    z, _ = actnorm(x)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-4)
    assert torch.allclose(z.var(dim=(0, 2, 3), unbiased=False), torch.ones(5), atol=1e-3)
    assert bool(actnorm.initialized)


def test_actnorm_initialises_from_a_bf16_batch_in_float32():
    # Under bf16 autocast the convs before an actnorm hand it bf16 activations; E[x^2] - E[x]^2 in bf16 cancels
    # catastrophically (mean 7, std 0.1 came out with std ~10^4).
    torch.manual_seed(0)
    actnorm = ActNorm2d(3)
    x = torch.randn(8, 3, 6, 6) * 0.1 + 7.0
    actnorm(x.bfloat16())
    z, _ = actnorm(x)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.1)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(3), atol=0.1)


def test_invconv_keeps_float32_activations_under_bf16_autocast():
    torch.manual_seed(0)
    for lu in (False, True):
        layer = InvertibleConv1x1(8, lu_decomposed=lu)
        x = torch.randn(2, 8, 5, 5)
        with torch.no_grad():
            exact, logdet = layer(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z, logdet_autocast = layer(x)
                back = layer.reverse(z)
        assert z.dtype == torch.float32 and back.dtype == torch.float32
        assert (z - exact).abs().max().item() < 1e-5
        assert torch.allclose(logdet_autocast, logdet, atol=1e-4)
        assert (back - x).abs().max().item() < 1e-4


@pytest.mark.parametrize("lu", [False, True], ids=["plain", "lu"])
def test_invconv_runs_on_a_device_without_autocast(lu):
    # torch.autocast(device, enabled=False) raises on devices without autocast, such as meta (shape inference).
    layer = InvertibleConv1x1(4, lu_decomposed=lu).to("meta")
    z, logdet = layer(torch.empty(2, 4, 3, 3, device="meta"))
    assert z.shape == (2, 4, 3, 3) and logdet.shape == (2,)
    assert layer.reverse(z).shape == (2, 4, 3, 3)


def test_coupling_and_split_logdets_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    x, cond = torch.randn(2, 4, 16, 16), torch.randn(2, COND_CHANNELS, 16, 16)
    for layer in (AffineCoupling(4, COND_CHANNELS, hidden_channels=8), AffineInjector(4, COND_CHANNELS, 8),
                  Split(4)):
        layer.train()
        layer(x, cond)
        _randomise_zero_convs(layer)
        layer.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            z, logdet = layer(x, cond)
            back = layer.reverse(z, cond)
        assert z.dtype == torch.float32 and logdet.dtype == torch.float32
        assert (back - x).abs().max().item() < 1e-4


def test_actnorm_initialises_only_once():
    torch.manual_seed(0)
    actnorm = ActNorm2d(2)
    actnorm(torch.randn(4, 2, 3, 3))
    bias = actnorm.bias.detach().clone()
    actnorm(torch.randn(4, 2, 3, 3) * 5 + 3)
    assert torch.equal(actnorm.bias.detach(), bias)


def test_actnorm_does_not_initialise_in_eval_mode():
    actnorm = ActNorm2d(2).eval()
    x = torch.randn(4, 2, 3, 3) + 3
    z, _ = actnorm(x)
    assert torch.equal(z, x)
    assert not bool(actnorm.initialized)


def test_actnorm_loaded_weights_are_not_reinitialised():
    trained = ActNorm2d(2)
    trained(torch.randn(4, 2, 3, 3))
    fresh = ActNorm2d(2)
    fresh.load_state_dict(trained.state_dict())
    fresh(torch.randn(4, 2, 3, 3) * 9 + 4)
    assert torch.equal(fresh.bias, trained.bias)
    assert torch.equal(fresh.logs, trained.logs)


def test_actnorm_weights_without_the_flag_count_as_initialised():
    trained = ActNorm2d(2)
    trained(torch.randn(4, 2, 3, 3))
    published = {k: v for k, v in trained.state_dict().items() if k != "initialized"}
    fresh = ActNorm2d(2)
    fresh.load_state_dict(published)
    fresh(torch.randn(4, 2, 3, 3) * 9 + 4)
    assert torch.equal(fresh.bias, trained.bias)


@pytest.mark.parametrize("name", ["injector", "coupling", "split", "flow_step"])
def test_conditional_layers_are_the_identity_at_init(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = torch.randn(2, 4, 4, 4)
    cond = torch.randn(2, COND_CHANNELS, 4, 4)
    if name == "flow_step":  # actnorm and 1x1 conv are not the identity; compare with them alone
        layer(x, cond)
        normalised, logdet_actnorm = layer.actnorm(x)
        expected = layer.invconv(normalised, None, logdet_actnorm)
        z, logdet = layer(x, cond)
        assert torch.allclose(z, expected[0], atol=1e-6)
        assert torch.allclose(logdet, expected[1], atol=1e-4)
        return
    z, logdet = layer(x, cond)
    assert torch.allclose(z, x, atol=1e-6)
    assert torch.allclose(logdet, torch.zeros(2), atol=1e-4)


def test_bounded_scale_is_one_at_zero_and_finite_positive_everywhere():
    h = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4])
    scale = bounded_scale(h)
    assert scale[2].item() == pytest.approx(1.0)
    assert torch.isfinite(torch.log(scale)).all()
    assert (scale > 1e-4).all() and (scale < 1.14).all()


def test_squeeze_moves_each_2x2_block_into_channels():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    z, _ = Squeeze()(x)
    assert z.shape == (1, 4, 2, 2)
    assert z[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]


def test_split_scores_leaving_channels_with_its_prior():
    torch.manual_seed(0)
    split = Split(4)
    _randomise_zero_convs(split)
    x = torch.randn(2, 4, 3, 3)
    z, logdet = split(x)
    mean, logs = split._mean_and_logs(x[:, :2], None)
    gaussian = torch.distributions.Normal(mean, logs.exp()).log_prob(x[:, 2:]).flatten(1).sum(1)
    standard = torch.distributions.Normal(0.0, 1.0).log_prob(z[:, 2:]).flatten(1).sum(1)
    assert torch.allclose(logdet + standard, gaussian, atol=1e-4)
    assert torch.equal(z[:, :2], x[:, :2])
