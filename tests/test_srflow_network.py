"""The `srflow` network: exact invertibility, exact log-likelihood, training signal, sampling and its guards."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError, DataError
from dlas.models.srflow.layers import Conv2dZeros
from dlas.models.srflow.srflow import NonFiniteError, SRFlow
from dlas.registry import NETWORKS

TINY = dict(nf=8, nb=1, gc=8, K=2, L=2, hidden_channels=8, encoder_blocks=[0], scale=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(**overrides) -> SRFlow:
    torch.manual_seed(0)
    return SRFlow(**{**TINY, **overrides})


def _pair(batch: int = 2, size: int = 16, seed: int = 0, scale: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hq = torch.rand(batch, 3, size, size, generator=g)
    return hq, F.interpolate(hq, scale_factor=1 / scale, mode="area")


def _trained_looking(net: SRFlow, hq: torch.Tensor, lq: torch.Tensor) -> SRFlow:
    """Initialise the actnorms on a batch, then give every zero-initialised conv random weights (not the identity)."""
    net.train()
    net(hq, lq)
    for module in net.modules():
        if isinstance(module, Conv2dZeros):
            nn.init.normal_(module.weight, std=0.05)
            nn.init.normal_(module.bias, std=0.1)
    return net.eval()


@pytest.mark.parametrize("options", [{}, {"L": 3}, {"lu_decomposed": True}, {"conditional_split_prior": True},
                                     {"scale": 2}, {"scale": 8, "L": 3}],
                         ids=["L2", "L3", "lu", "conditional_split", "x2", "x8"])
def test_reverse_of_encode_reproduces_hq(options):
    hq, lq = _pair(scale=options.get("scale", 4))
    net = _trained_looking(_tiny(**options), hq, lq)
    with torch.no_grad():
        latents, _, _, _ = net.encode(hq, lq, dequantize=False)
        assert [tuple(z.shape) for z in latents] == net.latent_shapes(lq)
        assert (net.reverse(lq, latents) - hq).abs().max().item() <= 1e-4


def test_flow_stays_exactly_invertible_in_float32_under_bf16_autocast():
    # precision: bf16 runs the step under autocast. A bf16 coupling network turns the fp32 rounding of the reverse
    # pass into jumps of a bf16 step in its shifts and scales (max error ~1 grey level); only the encoder may
    # run in bf16.
    hq, lq = _pair(size=32)
    net = _trained_looking(_tiny(L=3), hq, lq)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latents, logdet, nll, _ = net.encode(hq, lq, dequantize=False)
        back = net.reverse(lq, latents)
    assert logdet.dtype == nll.dtype == back.dtype == torch.float32
    assert (back - hq).abs().max().item() <= 1e-4


def test_network_logdet_equals_log_abs_det_of_its_jacobian():
    hq, lq = _pair(batch=1, size=8)
    net = _trained_looking(_tiny(), hq, lq).double()
    hq, lq = hq.double(), lq.double()

    def flat_latents(x: torch.Tensor) -> torch.Tensor:
        latents, _, _, _ = net.encode(x, lq, dequantize=False)
        return torch.cat([z.flatten() for z in latents])

    jacobian = torch.autograd.functional.jacobian(flat_latents, hq)
    expected = torch.linalg.slogdet(jacobian.reshape(hq.numel(), hq.numel()))[1]
    _, logdet, _, _ = net.encode(hq, lq, dequantize=False)
    assert logdet.item() == pytest.approx(expected.item(), rel=1e-6)


def test_nll_is_bits_per_dimension_of_the_latents_under_a_standard_normal():
    hq, lq = _pair()
    net = _trained_looking(_tiny(), hq, lq)
    latents, logdet, nll, nll_srflow = net.encode(hq, lq, dequantize=False)
    log_prior = sum(torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1) for z in latents)
    dims = 3 * 16 * 16
    expected = -(logdet + log_prior) / (math.log(2) * dims) + math.log2(256)
    assert torch.allclose(nll, expected, rtol=1e-5)
    # SRFlow's convention normalises by H·W and counts the dequantisation term per pixel.
    assert torch.allclose(nll_srflow, 3 * (nll - 8) + 8, rtol=1e-5)


def test_forward_returns_per_sample_nll_latent_and_logdet():
    hq, lq = _pair(batch=3)
    out = _tiny()(hq, lq)
    assert out["nll"].shape == (3,) and out["nll_srflow"].shape == (3,) and out["logdet"].shape == (3,)
    assert out["z"].shape == (3, 24, 4, 4)
    assert out["nll"].requires_grad


def test_nll_decreases_when_trained_with_adam():
    torch.manual_seed(0)
    # A toy set of smooth images (an LR structure the encoder can explain).
    coarse = torch.rand(6, 3, 4, 4)
    hq = F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    hq = (hq + 0.02 * torch.randn_like(hq)).clamp(0, 1)
    lq = F.interpolate(hq, scale_factor=0.25, mode="area")
    net = _tiny()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = net(hq, lq)["nll"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)


def test_temperature_zero_sampling_is_deterministic():
    hq, lq = _pair()
    net = _trained_looking(_tiny(), hq, lq)
    a = net.sample(lq, temperature=0.0)
    b = net.sample(lq, temperature=0.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.shape == hq.shape and 0 <= a.min() and a.max() <= 1


def test_positive_temperature_samples_differ_and_are_reproducible_by_seed():
    hq, lq = _pair()
    net = _trained_looking(_tiny(), hq, lq)
    a = net.sample(lq, 0.9, generator=torch.Generator().manual_seed(1))
    b = net.sample(lq, 0.9, generator=torch.Generator().manual_seed(1))
    c = net.sample(lq, 0.9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_the_sample_task_draws_count_seeded_samples_of_one_lr_image():
    from dlas.build import autocast
    from dlas.inference.tasks import Request, build_task

    hq, lq = _pair(batch=1)
    net = _trained_looking(_tiny(), hq, lq)
    cpu = torch.device("cpu")
    task = build_task("sample", {"generator": net}, {}, cpu, autocast("fp32", cpu), {"temperature": 0.8})
    assert task.needs == {"image"}
    first = task(Request("x", image=lq[0], seed=3, count=2))
    assert first.shape == (2, 3, 16, 16) and not torch.equal(first[0], first[1])
    assert torch.equal(first, task(Request("x", image=lq[0], seed=3, count=2)))


def test_sample_pads_lr_sizes_the_flow_cannot_take_and_crops_back():
    net = _trained_looking(_tiny(L=3), *_pair())
    sr = net.sample(torch.rand(1, 3, 5, 7), temperature=0.0)
    assert sr.shape == (1, 3, 20, 28)


def test_forward_without_hq_samples():
    hq, lq = _pair()
    net = _trained_looking(_tiny(), hq, lq)
    out = net(lq=lq, temperature=0.0)
    assert torch.equal(out["sample"], net.sample(lq, 0.0))


def test_reverse_guard_names_the_layer_that_produced_nan():
    hq, lq = _pair()
    net = _trained_looking(_tiny(), hq, lq)
    with torch.no_grad():
        net.levels[1].steps[0].coupling.net[-1].bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"level 2/2, step 1/2 coupling"):
        net.sample(lq, temperature=0.5)


def test_reverse_guard_names_a_singular_1x1_conv():
    # inv_ex instead of inv: no host sync per 1x1 conv to check for singularity; the NaN guard reports it instead.
    hq, lq = _pair()
    net = _trained_looking(_tiny(), hq, lq)
    with torch.no_grad():
        net.levels[1].steps[1].invconv.weight.zero_()
    with pytest.raises(NonFiniteError, match=r"level 2/2, step 2/2 invconv"):
        net.sample(lq, temperature=0.5)


def test_reverse_clamp_keeps_sampling_finite_instead_of_raising():
    hq, lq = _pair()
    net = _trained_looking(_tiny(reverse_clamp=100.0), hq, lq)
    with torch.no_grad():
        net.levels[1].steps[0].coupling.net[-1].bias.fill_(float("inf"))
    assert torch.isfinite(net.sample(lq, temperature=0.5)).all()


def test_encoder_is_frozen_until_train_encoder_after_steps():
    hq, lq = _pair()
    net = _tiny(train_encoder_after=5)
    net.set_step(5)
    net(hq, lq)["nll"].mean().backward()
    assert all(p.grad is None for p in net.encoder.parameters())
    assert net.levels[0].steps[0].coupling.net[-1].weight.grad is not None
    net.zero_grad()
    net.set_step(6)
    net(hq, lq)["nll"].mean().backward()
    # The trunk and the first upsampling conv feed the flow (conv_up2, conv_hr, conv_last produce HR-size maps it
    # does not use).
    assert net.encoder.conv_first.weight.grad is not None
    assert net.encoder.conv_up1.weight.grad is not None


def test_encoder_never_trains_with_train_encoder_after_null():
    hq, lq = _pair()
    net = _tiny(train_encoder_after=None)
    net.set_step(10**6)
    net(hq, lq)["nll"].mean().backward()
    assert all(p.grad is None for p in net.encoder.parameters())


def test_freezing_keeps_requires_grad_so_ddp_still_syncs_the_encoder_once_it_thaws():
    net = _tiny(train_encoder_after=5)
    net.set_step(1)
    assert all(p.requires_grad for p in net.encoder.parameters())


def test_pretrained_encoder_weights_are_loaded(tmp_path):
    from dlas.models.sr.rrdbnet import RRDBNet
    from dlas.weights import save_network_weights

    torch.manual_seed(3)
    rrdb = RRDBNet(3, 3, nf=8, nb=1, gc=8, scale=4)
    save_network_weights(rrdb, tmp_path / "rrdb.safetensors")
    net = _tiny(pretrained_encoder=str(tmp_path / "rrdb.safetensors"))
    assert torch.equal(net.encoder.conv_first.weight, rrdb.conv_first.weight)


def test_missing_pretrained_encoder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="missing.pth"):
        _tiny(pretrained_encoder=str(tmp_path / "missing.pth"))


def test_a_warning_says_the_encoder_starts_from_scratch(caplog):
    with caplog.at_level(logging.WARNING, logger="dlas.models.srflow.srflow"):
        _tiny()
    assert "starts from scratch" in caplog.text


def test_loaded_weights_give_the_same_likelihood_without_reinitialising():
    hq, lq = _pair()
    net = _trained_looking(_tiny(), hq, lq)
    copy = _tiny()
    copy.load_state_dict(net.state_dict())
    copy.train()
    other_hq, other_lq = _pair(seed=7)
    copy(other_hq * 3, other_lq * 3)  # a training batch that would re-initialise a fresh actnorm
    copy.eval()
    a = net.encode(hq, lq, dequantize=False)[2]
    b = copy.encode(hq, lq, dequantize=False)[2]
    assert torch.allclose(a, b)


def test_encoder_block_ids_must_exist():
    with pytest.raises(ConfigError, match="encoder_blocks"):
        SRFlow(**{**TINY, "encoder_blocks": [1, 8]})


def test_hr_size_not_divisible_by_two_to_the_L_is_a_data_error():
    net = _tiny(L=3)
    hq, lq = _pair(size=12)
    with pytest.raises(DataError, match="divisible by 8"):
        net(hq, lq)


def test_registry_builds_srflow_from_a_config():
    net = NETWORKS.build({"type": "srflow", **TINY})
    assert isinstance(net, SRFlow)
    assert len(net.levels) == 2 and len(net.levels[0].steps) == 2


def test_called_with_one_image_it_samples_like_an_sr_network():
    hq, lq = _pair()
    net = _trained_looking(_tiny(), hq, lq)
    torch.manual_seed(4)
    a = net(lq)
    torch.manual_seed(4)
    assert torch.equal(a, net.sample(lq, 0.9))
    assert a.shape == hq.shape


def test_activation_checkpointing_gives_the_same_gradients():
    from dlas.trainer.trainer import enable_checkpointing

    hq, lq = _pair()
    plain, checkpointed = _tiny(), _tiny()
    assert enable_checkpointing(checkpointed, "generator") == len(checkpointed.checkpoint_modules()) > 0
    grads = []
    for net in (plain, checkpointed):
        net.encode(hq, lq, dequantize=False)  # actnorm init: inside the checkpointed steps for the second net
        net.zero_grad()
        net.encode(hq, lq, generator=torch.Generator().manual_seed(0))[2].mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
