"""SR generators and discriminators: sizes, shapes, protocols, errors."""
import pytest
import torch

from dlas.errors import ConfigError
from dlas.registry import NETWORKS


def build(type_: str, **options):
    torch.manual_seed(0)
    return NETWORKS.build({"type": type_, **options})


def parameter_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def test_rrdbnet_esrgan_size_has_16697987_parameters():
    assert parameter_count(build("rrdbnet", nf=64, nb=23, gc=32, scale=4)) == 16_697_987


def test_rrdbnet_parameter_count_matches_layer_arithmetic():
    nf, gc, nb = 64, 32, 23
    dense_block = sum(conv(nf + i * gc, gc, 3) for i in range(4)) + conv(nf + 4 * gc, nf, 3)
    expected = conv(3, nf, 3) + nb * 3 * dense_block + 4 * conv(nf, nf, 3) + conv(nf, 3, 3)
    assert expected == 16_697_987


def test_srresnet_x4_has_1517571_parameters():
    assert parameter_count(build("srresnet", nf=64, nb=16, scale=4)) == 1_517_571


def test_vgg_discriminator_128_parameter_count_matches_layer_arithmetic():
    nf = 64
    widths = [nf, 2 * nf, 4 * nf, 8 * nf, 8 * nf]
    expected = conv(3, nf, 3) + conv(nf, nf, 4, bias=False) + 2 * nf  # stage 0: conv0_0, conv0_1, bn0_1
    for previous, width in zip(widths, widths[1:]):
        expected += conv(previous, width, 3, bias=False) + conv(width, width, 4, bias=False) + 4 * width
    expected += (8 * nf * 4 * 4 * 100 + 100) + (100 + 1)
    assert expected == 14_499_401
    assert parameter_count(build("vgg_discriminator", nf=64, input_size=128, norm="batch")) == expected
    assert parameter_count(build("vgg_discriminator", nf=64, input_size=128, norm="group")) == expected


def test_vgg_discriminator_keeps_basicsr_key_names():
    keys = build("vgg_discriminator", nf=8).state_dict().keys()
    for key in ("conv0_0.weight", "conv0_0.bias", "conv0_1.weight", "bn0_1.weight", "conv4_1.weight",
                "bn4_1.running_mean", "linear1.weight", "linear2.bias"):
        assert key in keys
    assert "conv1_0.bias" not in keys  # BasicSR's normalised convs have no bias


@pytest.mark.parametrize("size", [128, 256])
@pytest.mark.parametrize("norm", ["none", "batch", "group"])
def test_vgg_discriminator_gives_one_logit_per_image(size, norm):
    net = build("vgg_discriminator", nf=8, input_size=size, norm=norm)
    assert net(torch.rand(2, 3, size, size)).shape == (2, 1)


def test_vgg_discriminator_refuses_a_wrong_input_size_with_a_clear_message():
    net = build("vgg_discriminator", nf=8, input_size=128)
    with pytest.raises(ValueError, match=r"expects \(N, 3, 128, 128\).*got \(2, 3, 96, 96\)"):
        net(torch.rand(2, 3, 96, 96))


def test_vgg_discriminator_rejects_unsupported_input_size_at_build():
    with pytest.raises(ConfigError, match="input_size"):
        build("vgg_discriminator", input_size=192)


def test_unet_discriminator_gives_one_logit_per_pixel_and_uses_spectral_norm():
    net = build("unet_discriminator", nf=8)
    assert net(torch.rand(2, 3, 32, 40)).shape == (2, 1, 32, 40)
    keys = net.state_dict().keys()
    assert "conv1.weight_orig" in keys and "conv1.weight_u" in keys and "conv0.weight" in keys


def test_unet_discriminator_without_skips_still_runs():
    assert build("unet_discriminator", nf=8, skip_connection=False)(torch.rand(1, 3, 16, 16)).shape == (1, 1, 16, 16)


def test_unet_discriminator_refuses_sizes_not_multiple_of_8():
    with pytest.raises(ValueError, match="multiples of 8"):
        build("unet_discriminator", nf=8)(torch.rand(1, 3, 30, 32))


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_rrdbnet_output_is_scale_times_the_input(scale):
    net = build("rrdbnet", nf=8, nb=1, gc=4, scale=scale)
    assert net(torch.rand(2, 3, 8, 12)).shape == (2, 3, 8 * scale, 12 * scale)


@pytest.mark.parametrize("scale,in_channels", [(1, 48), (2, 12), (4, 3), (8, 3)])
def test_rrdbnet_pixel_unshuffles_the_input_below_scale_4(scale, in_channels):
    net = build("rrdbnet", nf=8, nb=1, gc=4, scale=scale)
    assert net.conv_first.in_channels == in_channels
    assert hasattr(net, "conv_up3") == (scale == 8)


def test_rrdbnet_rejects_scale_3():
    with pytest.raises(ConfigError, match="scale 1, 2, 4 or 8"):
        build("rrdbnet", scale=3)


def test_rrdbnet_keeps_basicsr_key_names():
    keys = set(build("rrdbnet", nf=8, nb=2, gc=4).state_dict())
    assert {"conv_first.weight", "body.1.rdb3.conv5.bias", "conv_body.weight", "conv_up1.weight",
            "conv_up2.weight", "conv_hr.weight", "conv_last.weight"} <= keys


def test_rrdbnet_dense_block_convs_start_at_a_tenth_of_kaiming_scale():
    net = build("rrdbnet", nf=64, nb=1, gc=32)
    weight = net.body[0].rdb1.conv5.weight
    kaiming_std = (2.0 / weight[0].numel()) ** 0.5
    assert weight.std().item() == pytest.approx(0.1 * kaiming_std, rel=0.05)
    assert net.body[0].rdb1.conv5.bias.abs().max().item() == 0


def test_rrdbnet_checkpoint_modules_are_its_rrdb_blocks():
    net = build("rrdbnet", nf=8, nb=3, gc=4)
    modules = net.checkpoint_modules()
    assert len(modules) == 3 and all(m is b for m, b in zip(modules, net.body))


def test_rrdbnet_forward_features_taps_blocks_and_upsampling_levels():
    net = build("rrdbnet", nf=8, nb=4, gc=4).eval()
    x = torch.rand(1, 3, 6, 6)
    with torch.no_grad():
        features = net.forward_features(x, [1, 3])
        trunk = net.conv_first(x)
        block_1 = net.body[1](net.body[0](trunk))
        assert torch.allclose(features["block_1"], block_1)
        assert torch.allclose(features["last_lr_fea"], trunk + net.conv_body(net.body(trunk)), atol=1e-6)
        assert torch.equal(features["out"], net(x))
    assert set(features) == {"block_1", "block_3", "last_lr_fea", "fea_up1", "fea_up2", "fea_up4", "out"}
    assert features["fea_up2"].shape == (1, 8, 12, 12) and features["fea_up4"].shape == (1, 8, 24, 24)
    assert features["fea_up2"].min() < 0  # taken before the LeakyReLU, as SRFlow conditions on it


def test_rrdbnet_forward_features_rejects_block_ids_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        build("rrdbnet", nf=8, nb=2, gc=4).forward_features(torch.rand(1, 3, 4, 4), [2])


def test_srresnet_starts_close_to_bilinear_upsampling():
    net = build("srresnet", nf=16, nb=2, scale=4)
    x = torch.rand(1, 3, 8, 8)
    bilinear = torch.nn.functional.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    out = net(x)
    assert out.shape == (1, 3, 32, 32)
    assert (out - bilinear).abs().mean() < 0.05


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_srresnet_scales(scale):
    assert build("srresnet", nf=8, nb=1, scale=scale)(torch.rand(1, 3, 5, 5)).shape == (1, 3, 5 * scale, 5 * scale)


def test_compact_sr_upsamples_and_learns():
    net = build("compact_sr", nf=16, num_conv=2, scale=4)
    x = torch.rand(2, 3, 8, 8)
    out = net(x)
    assert out.shape == (2, 3, 32, 32)
    out.mean().backward()
    assert net.body[-1].weight.grad.abs().sum() > 0  # the zero-initialised last conv learns first


def test_compact_sr_body_carries_the_input_to_its_last_conv_at_init():
    # with PyTorch's default init the features shrank by ~1/sqrt(3) a layer until only the biases were left: the
    # last conv then saw the same features for every input, and training stalled at bicubic quality
    net = build("compact_sr", nf=32, num_conv=8, scale=4)
    x = torch.rand(8, 3, 16, 16)
    features = net.body[:-1](x)
    assert 0.5 < features.std() / x.std() < 4
    other = net.body[:-1](torch.rand(8, 3, 16, 16))
    assert (features - other).std() > 0.5 * features.std()  # they depend on the input, not only on the biases


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_compact_sr_starts_as_its_plain_upsampler(mode):
    net = build("compact_sr", nf=16, num_conv=2, scale=2, upsample=mode)
    x = torch.rand(1, 3, 6, 6)
    options = {} if mode == "nearest" else {"align_corners": False}
    assert torch.equal(net(x), torch.nn.functional.interpolate(x, scale_factor=2, mode=mode, **options))


def test_compact_sr_requires_out_nc_equal_in_nc():
    with pytest.raises(ConfigError, match="out_nc"):
        build("compact_sr", in_nc=3, out_nc=1)
