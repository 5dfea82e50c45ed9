"""SR losses (GAN, gradient penalty, perceptual, translational) and the image_patch injector."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlas.context import Context
from dlas.errors import ConfigError
from dlas.losses.gan import discriminator_adversarial_loss, generator_adversarial_loss, gradient_penalty
from dlas.registry import INJECTORS, LOSSES

GAN_TYPES = ["vanilla", "lsgan", "ragan", "hinge", "wgan"]


def logits(*values: float) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1).requires_grad_(True)


# ----------------------------------------------------------------------------------------------- GAN values
@pytest.mark.parametrize("gan_type,expected", [
    ("vanilla", math.log(2)), ("lsgan", 1.0), ("ragan", math.log(2)), ("hinge", 0.0), ("wgan", 0.0),
])
def test_generator_loss_value_at_zero_logits(gan_type, expected):
    loss = generator_adversarial_loss(gan_type, logits(0.0, 0.0), logits(0.0, 0.0))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("gan_type,expected", [
    ("vanilla", 2 * math.log(2)), ("lsgan", 1.0), ("ragan", math.log(2)), ("hinge", 2.0), ("wgan", 0.0),
])
def test_discriminator_loss_value_at_zero_logits(gan_type, expected):
    loss = discriminator_adversarial_loss(gan_type, logits(0.0, 0.0), logits(0.0, 0.0))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_hinge_and_wgan_values_away_from_zero():
    d_real, d_fake = logits(2.0, 0.5), logits(-2.0, 1.0)
    assert discriminator_adversarial_loss("hinge", d_real, d_fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 2) / 2)
    assert discriminator_adversarial_loss("wgan", d_real, d_fake).item() == pytest.approx(-0.5 - 1.25)
    assert generator_adversarial_loss("hinge", d_fake).item() == pytest.approx(0.5)


def test_ragan_generator_loss_matches_basicsr_formula():
    d_real, d_fake = logits(1.0, -0.5, 2.0), logits(0.3, -1.0, 0.1)
    expected = (F.binary_cross_entropy_with_logits(d_real - d_fake.mean(), torch.zeros(3, 1))
                + F.binary_cross_entropy_with_logits(d_fake - d_real.mean(), torch.ones(3, 1))) / 2
    assert generator_adversarial_loss("ragan", d_fake, d_real).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("gan_type", GAN_TYPES)
def test_generator_loss_falls_as_d_calls_fakes_more_real(gan_type):
    d_fake, d_real = logits(0.1, -0.2), logits(0.3, 0.0)
    generator_adversarial_loss(gan_type, d_fake, d_real).backward()
    assert (d_fake.grad < 0).all()
    assert d_real.grad is None or (d_real.grad == 0).all()  # D(real) is a constant for the generator


@pytest.mark.parametrize("gan_type", GAN_TYPES)
def test_discriminator_loss_pushes_real_up_and_fake_down(gan_type):
    d_real, d_fake = logits(0.1, -0.2), logits(0.3, 0.1)  # lsgan's fake target is 0: stay above it
    discriminator_adversarial_loss(gan_type, d_real, d_fake).backward()
    assert (d_real.grad < 0).all() and (d_fake.grad > 0).all()


@pytest.mark.parametrize("gan_type", GAN_TYPES)
def test_gan_losses_are_float32_from_bf16_logits(gan_type):
    # A D under bf16 autocast returns bf16 logits; a ragan difference of large logits or a wgan difference of
    # means taken in bf16 is off in the third digit.
    torch.manual_seed(0)
    d_real, d_fake = torch.randn(16, 1) * 2 + 60, torch.randn(16, 1) * 2 + 58
    real16, fake16 = d_real.bfloat16(), d_fake.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d_loss = discriminator_adversarial_loss(gan_type, real16, fake16)
        g_loss = generator_adversarial_loss(gan_type, fake16, real16)
    assert d_loss.dtype == g_loss.dtype == torch.float32
    exact_d = discriminator_adversarial_loss(gan_type, real16.float(), fake16.float())
    exact_g = generator_adversarial_loss(gan_type, fake16.float(), real16.float())
    assert d_loss.item() == pytest.approx(exact_d.item(), rel=1e-6, abs=1e-6)
    assert g_loss.item() == pytest.approx(exact_g.item(), rel=1e-6, abs=1e-6)


SR_LOSS_CONFIGS = [
    *({"type": "generator_gan", "gan_type": t, "noise": 0.004} for t in GAN_TYPES),
    *({"type": "discriminator_gan", "gan_type": t, "noise": 0.004, "gradient_penalty": 1} for t in GAN_TYPES),
    {"type": "discriminator_gan", "gradient_penalty": 1, "gp_type": "wgan_gp"},
    {"type": "gradient_penalty", "gp_type": "wgan_gp"},
    {"type": "translational", "patch_size": 16, "overlap": 8},
]


@pytest.mark.parametrize("cfg", SR_LOSS_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_sr_losses_give_a_finite_float32_scalar_under_bf16_on_a_micro_batch_of_one(cfg):
    # mega_batch_factor = batch_size hands every loss one image; precision: bf16 runs it under autocast.
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Conv2d(3, 3 * 16, 3, padding=1), nn.PixelShuffle(4))
    discriminator = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
                                  nn.Conv2d(8, 1, 3, padding=1))
    ctx = Context(networks={"generator": generator, "discriminator": discriminator})
    lq = torch.rand(1, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = {"lq": lq, "hq": torch.rand(1, 3, 32, 32), "gen": generator(lq)}
        value = LOSSES.build(dict(cfg))(state, ctx)
    assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value)


# ----------------------------------------------------------------------------------------------- GAN losses
class MeanDiscriminator(nn.Module):
    """Logit = a * mean(image) + b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(2.0))
        self.b = nn.Parameter(torch.tensor(-1.0))

    def forward(self, x):
        return self.a * x.mean(dim=(1, 2, 3)).unsqueeze(1) + self.b


def gan_state():
    torch.manual_seed(0)
    generator_weight = nn.Parameter(torch.tensor(0.5))
    lq = torch.rand(2, 3, 4, 4)
    return generator_weight, {"hq": torch.rand(2, 3, 4, 4), "gen": generator_weight * lq}


def test_discriminator_gan_detaches_fake_trains_d_and_logs_its_logits():
    generator_weight, state = gan_state()
    discriminator = MeanDiscriminator()
    ctx = Context(networks={"discriminator": discriminator})
    loss = LOSSES.build({"type": "discriminator_gan", "gan_type": "vanilla", "real": "hq", "fake": "gen"})
    value = loss(state, ctx)
    value.backward()
    assert generator_weight.grad is None
    assert discriminator.a.grad is not None and discriminator.a.grad != 0
    expected_real = discriminator(state["hq"]).mean()
    assert ctx.scalars["discriminator_real"].item() == pytest.approx(expected_real.item())
    assert "discriminator_fake" in ctx.scalars
    assert loss.reads == ["gen", "hq"] and loss.networks == ["discriminator"]


def test_generator_gan_sends_gradients_to_the_generator_through_a_frozen_d():
    generator_weight, state = gan_state()
    discriminator = MeanDiscriminator().requires_grad_(False)
    loss = LOSSES.build({"type": "generator_gan", "discriminator": "discriminator", "gan_type": "vanilla"})
    loss(state, Context(networks={"discriminator": discriminator})).backward()
    # D's logit grows with the fake's brightness (a = 2 > 0), so the generator is pushed to brighten it.
    assert generator_weight.grad < 0


def test_noise_is_added_to_discriminator_inputs():
    _, state = gan_state()
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.mean(dim=(1, 2, 3)).unsqueeze(1)

    loss = LOSSES.build({"type": "discriminator_gan", "noise": 0.01})
    loss(state, Context(networks={"discriminator": Recorder()}))
    difference = seen[0] - state["hq"]
    assert 0.005 < difference.std().item() < 0.015


def test_negative_noise_is_a_config_error():
    with pytest.raises(ConfigError, match="noise"):
        LOSSES.build({"type": "generator_gan", "noise": -1})


# ----------------------------------------------------------------------------------------------- penalties
def test_r1_penalty_of_a_linear_discriminator_is_its_squared_weight_norm():
    torch.manual_seed(0)
    discriminator = nn.Sequential(nn.Flatten(), nn.Linear(12, 1, bias=False))
    weight = discriminator[1].weight
    penalty = gradient_penalty(discriminator, torch.rand(4, 3, 2, 2), None, "r1")
    assert penalty.item() == pytest.approx(weight.pow(2).sum().item(), rel=1e-6)
    penalty.backward()  # differentiable in D's weights: d||w||^2/dw = 2w
    assert torch.allclose(weight.grad, 2 * weight.detach())


def test_r1_penalty_of_a_quadratic_discriminator_matches_hand_computation():
    real = torch.tensor([[1.0, 2.0], [0.0, 3.0]])

    class Quadratic(nn.Module):
        def forward(self, x):
            return x.pow(2).sum(1, keepdim=True)

    # grad = 2x: squared norms 4*(1+4) = 20 and 4*9 = 36, mean 28
    assert gradient_penalty(Quadratic(), real, None, "r1").item() == pytest.approx(28.0)


def test_wgan_gp_of_a_linear_discriminator_is_norm_minus_one_squared():
    torch.manual_seed(0)
    discriminator = nn.Sequential(nn.Flatten(), nn.Linear(12, 1, bias=False))
    norm = discriminator[1].weight.norm().item()
    penalty = gradient_penalty(discriminator, torch.rand(4, 3, 2, 2), torch.rand(4, 3, 2, 2), "wgan_gp")
    assert penalty.item() == pytest.approx((norm - 1) ** 2, rel=1e-5)


def test_discriminator_gan_adds_the_weighted_penalty():
    _, state = gan_state()
    discriminator = nn.Sequential(nn.Flatten(), nn.Linear(48, 1, bias=False))
    ctx = Context(networks={"discriminator": discriminator})
    plain = LOSSES.build({"type": "discriminator_gan"})(state, ctx)
    penalised = LOSSES.build({"type": "discriminator_gan", "gradient_penalty": 10, "gp_type": "r1"})(state, ctx)
    r1 = discriminator[1].weight.pow(2).sum()
    assert penalised.item() == pytest.approx(plain.item() + 10 * r1.item(), rel=1e-5)
    assert ctx.scalars["discriminator_gradient_penalty"].item() == pytest.approx(r1.item(), rel=1e-5)


def test_discriminator_gan_r1_reuses_d_on_the_reals_instead_of_a_third_forward():
    _, state = gan_state()
    torch.manual_seed(0)

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(64, 1))

        def forward(self, x):
            self.calls += 1
            return self.net(x)

    discriminator = Counting()
    ctx = Context(networks={"discriminator": discriminator})
    loss = LOSSES.build({"type": "discriminator_gan", "gradient_penalty": 10, "gp_type": "r1"})(state, ctx)
    assert discriminator.calls == 2
    expected = gradient_penalty(discriminator.net, state["hq"], None, "r1")
    assert ctx.scalars["discriminator_gradient_penalty"].item() == pytest.approx(expected.item(), rel=1e-5)
    # Same gradients in D's weights as the GAN loss plus a separately computed penalty (second-order terms kept).
    params = list(discriminator.parameters())
    plain = LOSSES.build({"type": "discriminator_gan"})(state, ctx)
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(plain + 10 * expected, params)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # e.g. the loss evaluator: still a penalty, from its own forward under enable_grad
        value = LOSSES.build({"type": "discriminator_gan", "gradient_penalty": 10, "gp_type": "r1"})(state, ctx)
    assert torch.isfinite(value)


def test_standalone_gradient_penalty_loss_reads_fake_only_for_wgan_gp():
    assert LOSSES.build({"type": "gradient_penalty", "gp_type": "r1"}).reads == ["hq"]
    assert LOSSES.build({"type": "gradient_penalty", "gp_type": "wgan_gp"}).reads == ["hq", "gen"]


# ----------------------------------------------------------------------------------------------- perceptual
@pytest.fixture(scope="module")
def random_perceptual():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="randomly initialised"):
        return LOSSES.build({"type": "perceptual", "layer": "conv3_4", "weights_path": "random"})


def test_perceptual_loss_is_zero_for_identical_images(random_perceptual):
    image = torch.rand(1, 3, 32, 32)
    assert random_perceptual({"gen": image, "hq": image.clone()}, Context(networks={})).item() == 0


def test_perceptual_loss_grads_reach_fake_but_not_vgg(random_perceptual):
    fake = torch.rand(1, 3, 32, 32, requires_grad=True)
    loss = random_perceptual({"gen": fake, "hq": torch.rand(1, 3, 32, 32)}, Context(networks={}))
    assert loss.item() > 0
    loss.backward()
    assert fake.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in random_perceptual.parameters())


def test_perceptual_loss_follows_its_inputs_to_their_device():
    # The trainer builds losses on the CPU and moves only networks and batches; the VGG must follow the images
    # (on CUDA the first call failed with a device mismatch). The meta device stands in for a GPU here.
    with pytest.warns(UserWarning):
        loss = LOSSES.build({"type": "perceptual", "layer": "conv2_2", "weights_path": "random"})
    images = {"gen": torch.rand(1, 3, 16, 16, device="meta"), "hq": torch.rand(1, 3, 16, 16, device="meta")}
    value = loss(images, Context(networks={}))
    assert value.device.type == "meta" and value.dim() == 0
    assert all(p.device.type == "meta" for p in loss.vgg.parameters())


def test_perceptual_loss_builds_only_up_to_the_deepest_layer(random_perceptual):
    assert len(random_perceptual.vgg) == 17  # conv3_4 is features[16]


def test_perceptual_vgg_stays_in_eval_mode():
    with pytest.warns(UserWarning):
        loss = LOSSES.build({"type": "perceptual", "layer": "conv1_2", "weights_path": "random"})
    loss.train()
    assert not loss.vgg.training


def test_perceptual_before_activation_takes_the_conv_output():
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        before = LOSSES.build({"type": "perceptual", "layer": "conv1_1", "weights_path": "random"})
        after = LOSSES.build({"type": "perceptual", "layer": "conv1_1", "weights_path": "random",
                              "before_activation": False})
    x = torch.rand(1, 3, 8, 8)
    assert before.features(x)[0].min() < 0
    assert after.features(x)[1].min() >= 0


def test_perceptual_loads_torchvision_vgg19_weights(tmp_path):
    torch.manual_seed(0)
    state = {"features.0.weight": torch.randn(64, 3, 3, 3), "features.0.bias": torch.randn(64),
             "features.2.weight": torch.randn(64, 64, 3, 3), "features.2.bias": torch.randn(64),
             "classifier.0.weight": torch.zeros(1)}
    torch.save(state, tmp_path / "vgg19-dcbb9e9d.pth")
    loss = LOSSES.build({"type": "perceptual", "layer": "conv1_2",
                         "weights_path": str(tmp_path / "vgg19-dcbb9e9d.pth")})
    assert torch.equal(loss.vgg[2].weight, state["features.2.weight"])


def test_perceptual_conv5_4_is_torchvision_vgg19_features_34_before_its_relu(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.vgg19().features.eval()
    torch.save({f"features.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "vgg19.pth")
    loss = LOSSES.build({"type": "perceptual", "layer": "conv5_4", "weights_path": str(tmp_path / "vgg19.pth")})
    assert list(loss.layer_weights) == [34] and len(loss.vgg) == 35
    image = torch.rand(1, 3, 32, 32)
    normalised = (image - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference[:35](normalised)
        assert torch.allclose(loss.features(image)[34], expected, atol=1e-5)
        assert expected.min() < 0  # before the ReLU


def test_perceptual_missing_weights_name_the_file_place_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as error:
        LOSSES.build({"type": "perceptual", "layer": "conv5_4"})
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth") in message
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in message
    assert message.startswith("weights_path")


def test_perceptual_missing_weights_path_names_the_given_file(tmp_path):
    with pytest.raises(ConfigError, match=r"weights_path.*nowhere/vgg19.pth.*download"):
        LOSSES.build({"type": "perceptual", "weights_path": str(tmp_path / "nowhere" / "vgg19.pth")})


def test_perceptual_unknown_layer_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'conv5_4'"):
        LOSSES.build({"type": "perceptual", "layers": {"conv5_5": 1.0}, "weights_path": "random"})


def test_perceptual_unknown_single_layer_names_the_layer_key():
    with pytest.raises(ConfigError) as error:
        LOSSES.build({"type": "perceptual", "layer": "conv5_5", "weights_path": "random"}, "steps.g.losses.vgg")
    assert [problem.path for problem in error.value.problems] == ["steps.g.losses.vgg.layer"]
    assert "did you mean 'conv5_4'" in str(error.value)


# ----------------------------------------------------------------------------------------------- translational
class PointwiseUpsampler(nn.Module):
    """1x1 conv + nearest upsampling: exactly translation-equivariant."""

    def __init__(self, scale=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.scale = scale

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=self.scale, mode="nearest")


class PaddedUpsampler(PointwiseUpsampler):
    """3x3 conv with zero padding: crop borders change the output, so two crops disagree near their edges."""

    def __init__(self, scale=4):
        super().__init__(scale)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)


def translational(network, seed):
    torch.manual_seed(seed)
    loss = LOSSES.build({"type": "translational", "generator": "g", "patch_size": 32, "overlap": 16, "scale": 4})
    lq = torch.rand(2, 3, 20, 20)
    return loss({"lq": lq}, Context(networks={"g": network}))


@pytest.mark.parametrize("seed", range(6))  # covers all four shift directions
def test_translational_loss_is_zero_for_a_translation_equivariant_generator(seed):
    torch.manual_seed(100)
    assert translational(PointwiseUpsampler(), seed).item() == 0


def test_translational_loss_is_positive_and_trains_a_padded_generator():
    torch.manual_seed(100)
    network = PaddedUpsampler()
    loss = translational(network, 0)
    assert loss.item() > 0
    loss.backward()
    assert network.conv.weight.grad.abs().sum() > 0


def test_translational_loss_rejects_overlap_not_smaller_than_patch():
    with pytest.raises(ConfigError, match="overlap"):
        LOSSES.build({"type": "translational", "patch_size": 32, "overlap": 32})


def test_translational_loss_explains_too_small_inputs():
    loss = LOSSES.build({"type": "translational", "generator": "g"})
    with pytest.raises(ValueError, match="at least 32x32"):
        loss({"lq": torch.rand(1, 3, 16, 16)}, Context(networks={"g": PointwiseUpsampler()}))


# ----------------------------------------------------------------------------------------------- image_patch
def aligned_pair():
    lq = torch.rand(3, 3, 10, 12)
    return lq, F.interpolate(lq, scale_factor=4, mode="nearest")


@pytest.mark.parametrize("per_sample", [False, True])
def test_image_patch_cuts_aligned_lr_and_hr_patches(per_sample):
    torch.manual_seed(0)
    lq, hq = aligned_pair()
    injector = INJECTORS.build({"type": "image_patch", "patch_size": 16, "scale": 4, "per_sample": per_sample})
    out = injector({"lq": lq, "hq": hq}, Context(networks={}))
    assert out["lq_patch"].shape == (3, 3, 4, 4) and out["hq_patch"].shape == (3, 3, 16, 16)
    assert torch.equal(F.interpolate(out["lq_patch"], scale_factor=4, mode="nearest"), out["hq_patch"])


def test_image_patch_per_sample_offsets_differ_within_a_batch():
    torch.manual_seed(0)
    lq = torch.arange(10 * 12, dtype=torch.float32).view(1, 1, 10, 12).repeat(8, 3, 1, 1)
    hq = F.interpolate(lq, scale_factor=4, mode="nearest")
    injector = INJECTORS.build({"type": "image_patch", "patch_size": 8, "scale": 4, "per_sample": True})
    corners = injector({"lq": lq, "hq": hq}, Context(networks={}))["lq_patch"][:, 0, 0, 0]
    assert len(set(corners.tolist())) > 1


def test_image_patch_rejects_misaligned_sizes():
    injector = INJECTORS.build({"type": "image_patch", "patch_size": 16, "scale": 4})
    with pytest.raises(ValueError, match="exactly scale=4 times"):
        injector({"lq": torch.rand(1, 3, 10, 10), "hq": torch.rand(1, 3, 41, 40)}, Context(networks={}))


def test_image_patch_size_must_be_a_multiple_of_scale():
    with pytest.raises(ConfigError, match="patch_size"):
        INJECTORS.build({"type": "image_patch", "patch_size": 30, "scale": 4})
