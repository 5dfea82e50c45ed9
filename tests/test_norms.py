"""Normalization choices, spectral norm and Fixup initialisation of the SR conv networks."""
from __future__ import annotations

import pytest
import torch

from dlas.errors import ConfigError
from dlas.models.ops.norm import fixup_scale
from dlas.registry import NETWORKS

# Tiny versions of every conv network, with an input of the size each needs.
NETWORKS_UNDER_TEST = {
    "rrdbnet": ({"nf": 8, "nb": 2, "gc": 8, "scale": 2}, (2, 3, 8, 8)),
    "srresnet": ({"nf": 8, "nb": 2, "scale": 2}, (2, 3, 8, 8)),
    "compact_sr": ({"nf": 8, "num_conv": 2, "scale": 2}, (2, 3, 8, 8)),
    "vgg_discriminator": ({"nf": 8, "input_size": 128}, (2, 3, 128, 128)),
    "unet_discriminator": ({"nf": 8}, (2, 3, 16, 16)),
}
NORM_LAYERS = {"batch": torch.nn.BatchNorm2d, "group": torch.nn.GroupNorm, "instance": torch.nn.InstanceNorm2d}
# (network, extra options) for every choice a network offers
VARIANTS = [(name, {"norm": norm}) for name in NETWORKS_UNDER_TEST for norm in ["none", "batch", "group", "instance"]]
VARIANTS += [("rrdbnet", {"init": "fixup"}), ("srresnet", {"init": "fixup"}),
             ("vgg_discriminator", {"norm": "none", "spectral_norm": True}),
             ("unet_discriminator", {"spectral_norm": False, "norm": "group"})]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def build(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return NETWORKS.build({"type": name, **NETWORKS_UNDER_TEST[name][0], **options})


def parameter_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def train_one_step(net: torch.nn.Module, shape: tuple[int, ...]) -> float:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    out = net(x)
    loss = (out - out.detach().mean()).square().mean() + out.mean().square()
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("name,options", VARIANTS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={w}" for k, w in v.items()))
def test_each_choice_builds_and_trains_a_step(name, options):
    net = build(name, **options)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert torch.isfinite(torch.tensor(train_one_step(net, NETWORKS_UNDER_TEST[name][1])))
    after = net.state_dict()
    changed = [k for k in before if k.endswith(("weight", "weight_orig")) and not torch.equal(before[k], after[k])]
    assert changed, "no weight moved"
    norm = options.get("norm", "none")
    layers = [m for m in net.modules() if isinstance(m, tuple(NORM_LAYERS.values()))]
    assert (not layers) if norm == "none" else all(isinstance(m, NORM_LAYERS[norm]) for m in layers) and layers
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(net(torch.rand(NETWORKS_UNDER_TEST[name][1]))).all()


@pytest.mark.parametrize("name,normed_conv,plain_conv", [("rrdbnet", "body.0.rdb1.conv1", "conv_first"),
                                                          ("srresnet", "body.1.conv2", "conv_first"),
                                                          ("compact_sr", "body.0", "body.9")])
def test_a_norm_layer_replaces_the_bias_of_the_conv_before_it(name, normed_conv, plain_conv):
    net = build(name, norm="instance")
    assert net.get_submodule(normed_conv).bias is None
    assert net.get_submodule(plain_conv).bias is not None
    assert build(name).get_submodule(normed_conv).bias is not None


def test_compact_sr_without_norm_keeps_real_esrgan_body_indices():
    keys = build("compact_sr").state_dict()
    assert keys["body.0.weight"].dim() == 4 and keys["body.1.weight"].dim() == 1  # conv, PReLU, conv, ...
    assert keys["body.2.weight"].dim() == 4 and keys["body.6.weight"].shape == (3 * 4, 8, 3, 3)


@pytest.mark.parametrize("name,option,value", [("rrdbnet", "gc", 4), ("srresnet", "nf", 12),
                                               ("compact_sr", "nf", 12), ("unet_discriminator", "nf", 12)])
def test_group_norm_needs_channels_in_multiples_of_8_and_names_the_option(name, option, value):
    with pytest.raises(ConfigError) as error:
        build(name, norm="group", **{option: value})
    assert error.value.problems[0].path == option and "multiple of 8" in error.value.problems[0].message


def test_spectral_norm_keeps_the_parameter_count_and_bounds_each_layer():
    plain, normed = build("vgg_discriminator"), build("vgg_discriminator", spectral_norm=True)
    assert parameter_count(plain) == parameter_count(normed)
    assert {"conv0_0.weight_orig", "conv3_1.weight_u", "linear1.weight_orig"} <= set(normed.state_dict())
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        for _ in range(15):  # each training-mode call runs one power iteration
            normed(x)
    weight = normed.conv2_0.weight.flatten(1)
    assert torch.linalg.matrix_norm(weight, ord=2).item() == pytest.approx(1.0, rel=0.05)


def test_unet_discriminator_without_spectral_norm_has_plain_conv_keys():
    keys = set(build("unet_discriminator", spectral_norm=False).state_dict())
    assert "conv1.weight" in keys and not any("weight_orig" in k for k in keys)


@pytest.mark.parametrize("name", ["srresnet", "rrdbnet"])
def test_fixup_residual_branches_start_at_zero(name):
    net = build(name, init="fixup")
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        for block in net.body:
            assert torch.equal(block(x), x)
        if name == "rrdbnet":
            for rdb in (net.body[0].rdb1, net.body[1].rdb3):
                assert torch.equal(rdb(x), x)
                assert rdb.conv5.weight.abs().max() == 0 and rdb.branch_scale.item() == 1.0
        else:
            assert net.body[0].conv2.weight.abs().max() == 0 and net.body[0].branch_scale.item() == 1.0


@pytest.mark.parametrize("name,first_conv,branches,layers", [("srresnet", "conv1", 16, 2),
                                                               ("rrdbnet", "conv1", 3 * 4, 5)])
def test_fixup_scales_the_other_branch_layers_by_the_depth(name, first_conv, branches, layers):
    nb = branches if name == "srresnet" else branches // 3
    torch.manual_seed(0)
    net = NETWORKS.build({"type": name, "nf": 64, "nb": nb, **({"gc": 32} if name == "rrdbnet" else {}),
                          "init": "fixup"})
    block = net.body[0] if name == "srresnet" else net.body[0].rdb1
    weight = getattr(block, first_conv).weight
    kaiming_std = (2.0 / weight[0].numel()) ** 0.5
    assert weight.std().item() == pytest.approx(kaiming_std * branches ** (-1 / (2 * layers - 2)), rel=0.05)


def test_fixup_scale_follows_the_paper():
    assert fixup_scale(16, 2) == pytest.approx(0.25) and fixup_scale(69, 5) == pytest.approx(69 ** -0.125)
    assert fixup_scale(10, 1) == 1.0


@pytest.mark.parametrize("name,zeroed", [("srresnet", "body.0.conv2.weight"), ("rrdbnet", "body.0.rdb1.conv5.weight")])
def test_fixup_zero_layers_learn_after_a_few_steps(name, zeroed):
    net = build(name, init="fixup")
    for _ in range(3):  # the RRDB multiplier moves first, then gradients reach the zeroed convs behind it
        train_one_step(net, NETWORKS_UNDER_TEST[name][1])
    assert net.state_dict()[zeroed].abs().max() > 0


def test_fixup_adds_only_the_branch_multipliers():
    assert parameter_count(build("srresnet", init="fixup")) == parameter_count(build("srresnet")) + 2
    assert parameter_count(build("rrdbnet", init="fixup")) == parameter_count(build("rrdbnet")) + 2 * 4


@pytest.mark.parametrize("name", ["srresnet", "rrdbnet"])
def test_fixup_with_a_norm_layer_is_a_config_error_naming_init(name):
    with pytest.raises(ConfigError) as error:
        build(name, init="fixup", norm="batch")
    assert error.value.problems[0].path == "init" and "norm: none" in error.value.problems[0].message
