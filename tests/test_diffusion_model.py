"""The diffusion_unet network, the gaussian_diffusion injector and the diffusion inference task."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from dlas.context import Context
from dlas.errors import ConfigError
from dlas.inference.tasks import Request, build_task
from dlas.injectors.diffusion import GaussianDiffusionInjector
from dlas.losses.pixel import PixelLoss
from dlas.models.diffusion.unet import DiffusionUNet
from dlas.registry import NETWORKS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_at=[2], norm_groups=4, num_heads=2)


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``net`` with every parameter nudged, so that zero-initialised output layers no longer hide the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return net


@pytest.mark.parametrize("size, lq_size", [(16, 4), (32, 8), (24, 12), (16, 16)])
def test_unet_output_has_the_input_size_and_channels_at_several_resolutions(size, lq_size):
    net = DiffusionUNet(**TINY)
    out = net(torch.randn(2, 3, size, size), torch.tensor([0.0, 999.0]), lq=torch.rand(2, 3, lq_size, lq_size))
    assert out.shape == (2, 3, size, size)


def test_unet_with_learn_sigma_outputs_twice_the_channels_and_three_levels_need_multiples_of_4():
    net = DiffusionUNet(**{**TINY, "channel_mult": [1, 1, 2]}, learn_sigma=True, lq_channels=0)
    assert net(torch.randn(1, 3, 12, 20), torch.tensor([5.0])).shape == (1, 6, 12, 20)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        net(torch.randn(1, 3, 10, 20), torch.tensor([5.0]))


def test_unet_output_depends_on_timestep_lq_and_condition():
    net = perturbed(DiffusionUNet(**TINY, condition_dim=2))
    x, lq, t = torch.randn(1, 3, 16, 16), torch.rand(1, 3, 4, 4), torch.tensor([100.0])
    condition = torch.tensor([[0.1, 0.5]])
    base = net(x, t, lq=lq, condition=condition)
    assert not torch.allclose(base, net(x, torch.tensor([600.0]), lq=lq, condition=condition))
    assert not torch.allclose(base, net(x, t, lq=lq.flip(-1), condition=condition))
    assert not torch.allclose(base, net(x, t, lq=lq, condition=torch.tensor([[0.9, 0.5]])))


def test_unet_starts_predicting_zero_and_conditions_on_the_bilinearly_upsampled_lq():
    net = DiffusionUNet(**TINY)
    assert net(torch.randn(1, 3, 16, 16), torch.tensor([3.0]), lq=torch.rand(1, 3, 4, 4)).abs().max() == 0
    lq = torch.rand(1, 3, 4, 4)
    perturbed(net)
    upsampled = F.interpolate(lq, size=(16, 16), mode="bilinear", align_corners=False)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([3.0])
    torch.testing.assert_close(net(x, t, lq=lq), net(x, t, lq=upsampled))


def test_unet_options_it_cannot_build_are_config_errors():
    with pytest.raises(ConfigError, match="not downsampling factors"):
        NETWORKS.build({"type": "diffusion_unet", "channel_mult": [1, 2], "attention_at": [4]})
    with pytest.raises(ConfigError, match="norm_groups"):
        NETWORKS.build({"type": "diffusion_unet", "model_channels": 20})


def diffusion_state(batch: int = 4, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hq = torch.rand(batch, 3, size, size, generator=g)
    return {"hq": hq, "lq": F.avg_pool2d(hq, 4)}


def test_injector_writes_prediction_target_and_loss_terms_that_pix_can_train():
    net = perturbed(DiffusionUNet(**TINY))
    injector = GaussianDiffusionInjector(network="g", timesteps=50)
    torch.manual_seed(0)
    out = injector(diffusion_state(), Context(networks={"g": net}))
    assert out["pred"].shape == out["target"].shape == (4, 3, 16, 16)
    assert out["mse"].dim() == 0 and out["vb"].dim() == 0 and out["timestep"].shape == (4,)
    assert 0 <= out["noisy"].min() and out["noisy"].max() <= 1 and out["denoised"].shape == (4, 3, 16, 16)
    # eps prediction: the target is the noise itself; with uniform timesteps pix l2 is the mse term
    pix = PixelLoss("l2", real="target", fake="pred")(out, None)
    torch.testing.assert_close(pix, out["mse"])
    assert out["target"].std().item() == pytest.approx(1.0, abs=0.2)


def test_injector_vb_term_trains_only_the_learned_variance():
    class Constant(torch.nn.Module):  # a "network" whose output is a parameter: gradients are easy to read
        def __init__(self):
            super().__init__()
            self.output = torch.nn.Parameter(torch.randn(4, 6, 8, 8) * 0.1)

        def forward(self, x, t, lq=None):
            return self.output

    net = Constant()
    injector = GaussianDiffusionInjector(network="g", timesteps=50, variance="learned_range")
    injector(diffusion_state(size=8), Context(networks={"g": net}))["vb"].backward()
    assert net.output.grad[:, :3].abs().max() == 0 and net.output.grad[:, 3:].abs().max() > 0


def test_injector_names_a_network_with_the_wrong_number_of_output_channels():
    injector = GaussianDiffusionInjector(network="g", timesteps=50, variance="learned_range")
    with pytest.raises(ValueError, match="expected 6.*learn_sigma"):
        injector(diffusion_state(), Context(networks={"g": DiffusionUNet(**TINY)}))


def test_injector_logs_each_term_per_quarter_of_the_schedule():
    injector = GaussianDiffusionInjector(network="g", timesteps=100)
    ctx = Context(networks={"g": perturbed(DiffusionUNet(**TINY))})
    torch.manual_seed(0)
    out = injector(diffusion_state(batch=16), ctx)
    assert sorted(ctx.scalars) == sorted(f"{term}_q{q}" for term in ("mse", "vb") for q in range(4))
    quarter = out["timestep"] // 25
    present = [q for q in range(4) if (quarter == q).any()]
    mean_of_quarters = sum(ctx.scalars[f"mse_q{q}"] * (quarter == q).sum() for q in present) / 16
    assert mean_of_quarters.item() == pytest.approx(out["mse"].item(), rel=1e-5)
    # validation (ctx.training false) neither logs nor teaches the timestep sampler
    quiet = Context(networks=ctx.networks, training=False)
    injector(diffusion_state(), quiet)
    assert quiet.scalars == {}


def test_injector_rejects_sampling_steps_and_schedules_it_cannot_give():
    with pytest.raises(ConfigError, match="cannot take 80 steps"):
        GaussianDiffusionInjector(timesteps=50, sampling_steps=80)
    with pytest.raises(ConfigError, match="linear schedule needs more than 20 timesteps"):
        GaussianDiffusionInjector(timesteps=10, sampling_steps=5)


def test_a_tiny_model_overfits_one_image():
    from skimage import data

    hq = torch.from_numpy(data.astronaut()[200:328:8, 200:328:8].copy()).permute(2, 0, 1)[None].float() / 255
    lq = F.interpolate(hq, scale_factor=0.25, mode="area")
    torch.manual_seed(0)
    net = DiffusionUNet(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_at=[], norm_groups=4,
                        num_heads=1)
    injector = GaussianDiffusionInjector(network="g", timesteps=100, schedule="cosine", prediction="x0")
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    ctx = Context(networks={"g": net})
    state = {"hq": hq.expand(8, -1, -1, -1), "lq": lq.expand(8, -1, -1, -1)}
    for _ in range(150):
        loss = injector(state, ctx)["mse"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    sample = injector.diffusion.respaced(10).sample(lambda x, t: net(x, t, lq=lq * 2 - 1), torch.randn(1, 3, 16, 16))
    psnr = -10 * torch.log10(((sample.clamp(-1, 1) + 1) / 2 - hq).square().mean())
    bilinear = -10 * torch.log10((F.interpolate(lq, scale_factor=4, mode="bilinear") - hq).square().mean())
    assert psnr > 25 > bilinear + 8


# ---------------------------------------------------------------------- the diffusion task
def run_config(**injector) -> dict:
    return {"networks": {"generator": {"type": "diffusion_unet", **TINY}},
            "steps": {"g": {"injectors": {"d": {"type": "gaussian_diffusion", "network": "generator",
                                                "timesteps": 100, "sampling_steps": 5, **injector}}}}}


def diffusion_task(net: torch.nn.Module, config: dict, **options):
    return build_task("diffusion", {"generator": net}, config, torch.device("cpu"), contextlib.nullcontext, options)


def test_task_upsamples_by_the_network_scale_and_crops_padding_back():
    task = diffusion_task(perturbed(DiffusionUNet(**TINY)).eval(), run_config())
    assert task.scored and task.scale_factor == 4 and task.diffusion.num_timesteps == 5
    images = task(Request("x", image=torch.rand(3, 5, 7), seed=1, count=2))
    assert images.shape == (2, 3, 20, 28)


def test_task_samples_are_reproducible_per_seed_and_independent_of_the_batch():
    net = perturbed(DiffusionUNet(**TINY)).eval()
    image = torch.rand(3, 4, 4)
    ddpm = diffusion_task(net, run_config(), sampler="ddpm", batch=3)
    first = ddpm(Request("x", image=image, seed=7, count=3))
    assert torch.equal(first, ddpm(Request("x", image=image, seed=7, count=3)))
    assert not torch.allclose(first, ddpm(Request("x", image=image, seed=8, count=3)))
    one_at_a_time = diffusion_task(net, run_config(), sampler="ddpm", batch=1)
    # the same draws; only float32 rounding may differ (the kernels differ by batch size, and DDPM's chain of steps
    # carries a last-bit difference on: 1.2e-5 on one pixel in a CI run); a seeding slip is off by ~1, as seed 8 is
    torch.testing.assert_close(one_at_a_time(Request("x", image=image, seed=7, count=2)), first[:2],
                               atol=1e-4, rtol=1e-4)


def test_task_reads_the_process_from_the_runs_injector_and_options_override_it():
    config = run_config(schedule="cosine", prediction="v", sampler="ddpm", sampling_steps="ddim10")
    task = diffusion_task(DiffusionUNet(**TINY), config)
    assert task.diffusion.prediction == "v" and task.sampler == "ddpm" and task.diffusion.num_timesteps == 10
    assert diffusion_task(DiffusionUNet(**TINY), config, steps=4, sampler="ddim").diffusion.num_timesteps == 4


def test_task_without_a_diffusion_injector_in_the_run_is_a_config_error():
    config = {"networks": {"generator": {"type": "diffusion_unet"}}, "steps": {}}
    with pytest.raises(ConfigError, match="no gaussian_diffusion injector for network 'generator'"):
        diffusion_task(DiffusionUNet(**TINY), config)


def test_task_of_an_unconditional_model_draws_images_of_the_training_size():
    config = {**run_config(lq=None), "datasets": {"train": {"target_size": 8}}}
    task = diffusion_task(DiffusionUNet(**TINY, lq_channels=0).eval(), config)
    assert not task.scored
    assert task(Request("u", seed=0, count=2)).shape == (2, 3, 8, 8)
