"""The discrete VAE: encode/decode, the EMA codebook, dead-code restarts, Gumbel schedules, usage statistics."""
from __future__ import annotations

import math

import pytest
import torch

from dlas.data.shapes import ShapesDataset
from dlas.errors import ConfigError, DataError
from dlas.models.vqvae.dvae import DiscreteVAE
from dlas.models.vqvae.quantizers import CodeUsage, EMAVectorQuantizer, GumbelQuantizer, temperature_at

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**options) -> DiscreteVAE:
    torch.manual_seed(0)
    return DiscreteVAE(**{"codebook_size": 16, "width": 8, "codebook_dim": 8, **options})


# ------------------------------------------------------------------ the public interface
@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])
@pytest.mark.parametrize("downsample", [4, 8])
def test_encode_gives_int64_tokens_on_the_downsampled_grid_and_decode_gives_images(quantizer, downsample):
    net = tiny(quantizer=quantizer, downsample=downsample).eval()
    images = torch.rand(2, 3, 32, 48)
    tokens = net.encode(images)
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 32 // downsample, 48 // downsample)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < net.codebook_size
    decoded = net.decode(tokens.int())
    assert decoded.shape == (2, 3, 32, 48) and decoded.dtype == torch.float32
    assert 0 <= float(decoded.min()) and float(decoded.max()) <= 1
    assert net.token_grid(32, 48) == tuple(tokens.shape[1:]) and net.size_multiple == net.downsample == downsample
    assert torch.equal(net.reconstruct(images), decoded)


@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])
def test_forward_returns_the_reconstruction_tokens_and_both_loss_terms_and_trains_the_encoder(quantizer):
    net = tiny(quantizer=quantizer)
    images = torch.rand(2, 3, 16, 16)
    out = net(images)
    assert out["recon"].shape == images.shape and out["tokens"].shape == (2, 4, 4)
    assert out["kl"].dim() == 0 and out["commitment"].dim() == 0
    (out["recon"] - images).abs().mean().backward()
    first_conv = net.encoder.layers[0].weight
    assert first_conv.grad is not None and float(first_conv.grad.abs().sum()) > 0


def test_eval_forward_reconstructs_what_encode_and_decode_give():
    net = tiny(quantizer="gumbel").eval()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = net(images)
    assert torch.equal(out["tokens"], net.encode(images))
    assert torch.allclose(out["recon"].clamp(0, 1), net.decode(out["tokens"]))


def test_sizes_that_are_not_a_multiple_of_the_downsampling_are_a_data_error():
    with pytest.raises(DataError, match="divisible by 4"):
        tiny().encode(torch.rand(1, 3, 18, 16))


def test_bad_options_are_config_errors_naming_them():
    with pytest.raises(ConfigError, match="power of two") as info:
        DiscreteVAE(downsample=6)
    assert info.value.problems[0].path == "downsample"
    with pytest.raises(ConfigError, match="needs 3 positive multipliers") as info:
        DiscreteVAE(downsample=4, channel_mult=[1, 2])
    assert info.value.problems[0].path == "channel_mult"


# ------------------------------------------------------------------ the EMA codebook
def test_the_ema_codebook_update_matches_a_hand_computation():
    vq = EMAVectorQuantizer(codebook_size=2, dim=1, decay=0.5, eps=0.0, dead_code_threshold=0)
    vq.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    vq.cluster_size.copy_(torch.tensor([2.0, 2.0]))
    vq.embed_sum.copy_(torch.tensor([[0.0], [20.0]]))
    z = torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3).requires_grad_()  # codes 0, 0, 1
    out = vq.train()(z)
    assert out.tokens.tolist() == [[[0, 0, 1]]]
    # cluster sizes 0.5*2 + 0.5*[2, 1] = [2, 1.5]; sums 0.5*[0, 20] + 0.5*[3, 9] = [1.5, 14.5]
    assert torch.allclose(vq.cluster_size, torch.tensor([2.0, 1.5]))
    assert torch.allclose(vq.embed_sum, torch.tensor([[1.5], [14.5]]))
    assert torch.allclose(vq.codebook, torch.tensor([[0.75], [14.5 / 1.5]]))
    # commitment: mean of (1-0)^2, (2-0)^2, (9-10)^2 with the old codebook
    assert math.isclose(float(out.commitment.detach()), (1 + 4 + 1) / 3, rel_tol=1e-6)


def test_laplace_smoothing_keeps_a_rarely_used_code_finite():
    vq = EMAVectorQuantizer(codebook_size=2, dim=1, decay=0.5, eps=0.1, dead_code_threshold=0)
    vq.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    vq.cluster_size.copy_(torch.tensor([4.0, 0.0]))
    vq.embed_sum.copy_(torch.tensor([[4.0], [0.0]]))
    vq.train()(torch.tensor([1.0, 1.0]).view(1, 1, 1, 2).requires_grad_())
    # N = [3, 0], total 3; smoothed = (N + 0.1) / (3 + 0.2) * 3; sums [3, 0]
    smoothed = (torch.tensor([3.0, 0.0]) + 0.1) / 3.2 * 3
    assert torch.allclose(vq.codebook[:, 0], torch.tensor([3.0, 0.0]) / smoothed)


def test_straight_through_passes_the_decoder_gradient_to_the_encoder_output():
    vq = EMAVectorQuantizer(codebook_size=4, dim=2, dead_code_threshold=0)
    z = torch.randn(1, 2, 2, 2, requires_grad=True)
    vq.eval()(z).decoder_input.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_dead_codes_are_restarted_on_encoder_outputs_of_the_batch():
    torch.manual_seed(0)
    vq = EMAVectorQuantizer(codebook_size=4, dim=2, decay=0.9, dead_code_threshold=0.5)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0], [-100.0, 100.0]]))
    vq.cluster_size.fill_(1.0)
    vq.embed_sum.copy_(vq.codebook)
    z = (torch.rand(1, 2, 4, 4) * 1.2).requires_grad_()  # near codes 0 and 1 only: 2 and 3 never win
    vectors = z.detach().permute(0, 2, 3, 1).reshape(-1, 2)
    for _ in range(6):  # 0.9^6 = 0.53: still alive
        vq.train()(z)
    assert float(vq.codebook[2:].abs().min()) > 99  # untouched (up to Laplace smoothing)
    vq.train()(z)  # 0.9^7 = 0.48 < 0.5: codes 2 and 3 are dead and restarted in this update
    for code in (2, 3):
        assert (vq.codebook[code] - vectors).abs().sum(1).min() < 1e-5  # it sits on one of the batch's vectors
        assert float(vq.cluster_size[code]) == 0.5
    assert float(vq.codebook.abs().max()) < 2


def test_the_first_training_batch_initialises_every_code_from_the_data():
    vq = EMAVectorQuantizer(codebook_size=8, dim=2)
    z = (torch.rand(1, 2, 8, 8) + 5).requires_grad_()
    vq.train()(z)
    assert float(vq.codebook.min()) >= 5  # every code moved from randn onto the data


@pytest.mark.parametrize("how", ["eval", "no_grad", "frozen_encoder"])
def test_the_codebook_and_usage_do_not_change_outside_a_training_forward(how):
    net = tiny()
    images = torch.rand(2, 3, 16, 16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    if how == "eval":
        net.eval()(images)
    elif how == "no_grad":
        with torch.no_grad():
            net(images)
    else:  # a step that does not train the dVAE: the trainer turns requires_grad off, the network stays in train mode
        net.requires_grad_(False)
        net(images)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ------------------------------------------------------------------ Gumbel
def test_the_temperature_schedules_go_from_start_to_end_over_their_steps():
    assert temperature_at(0, 1.0, 1 / 16, 1000, "cosine") == 1.0
    assert math.isclose(temperature_at(500, 1.0, 1 / 16, 1000, "cosine"), (1 + 1 / 16) / 2)
    assert math.isclose(temperature_at(250, 1.0, 1 / 16, 1000, "linear"), 1 - 0.25 * 15 / 16)
    assert math.isclose(temperature_at(500, 1.0, 1 / 16, 1000, "exponential"), 0.25)
    for schedule in ("cosine", "linear", "exponential"):
        assert temperature_at(1000, 1.0, 1 / 16, 1000, schedule) == 1 / 16
        assert temperature_at(5000, 1.0, 1 / 16, 1000, schedule) == 1 / 16


def test_set_step_sets_the_gumbel_temperature_from_the_iteration_alone():
    net = tiny(quantizer="gumbel", temperature_steps=100, temperature_schedule="linear")
    net.set_step(50)
    assert math.isclose(net.quantizer.temperature, 1 - 0.5 * 15 / 16)
    assert math.isclose(net.debug_info()["temperature"], net.quantizer.temperature)
    net.set_step(7)
    net.set_step(50)  # going back and forth (a resume) gives the same value: no state
    assert math.isclose(net.quantizer.temperature, 1 - 0.5 * 15 / 16)


def test_the_kl_to_the_uniform_prior_is_zero_for_uniform_logits_and_log_k_for_certain_ones():
    quantizer = GumbelQuantizer(codebook_size=8, dim=4)
    assert abs(float(quantizer(torch.zeros(2, 8, 3, 3)).kl)) < 1e-6
    certain = torch.full((1, 8, 2, 2), -1e4)
    certain[:, 3] = 1e4
    assert math.isclose(float(quantizer(certain).kl), math.log(8), rel_tol=1e-5)


def test_hard_gumbel_samples_decode_exactly_one_code_vector_per_position():
    quantizer = GumbelQuantizer(codebook_size=8, dim=4, hard=True).train()
    out = quantizer(torch.randn(2, 8, 3, 3, requires_grad=True))
    vectors = out.decoder_input.permute(0, 2, 3, 1).reshape(-1, 4)
    distances = torch.cdist(vectors, quantizer.embedding.weight)
    assert float(distances.detach().min(1).values.max()) < 1e-5


def test_the_recipes_kl_weight_rises_from_zero_to_its_final_value_like_dalles():
    from dlas.config import load_config
    from dlas.trainer.schedules import build_weight
    from tests.conftest import REPO

    cfg = load_config(str(REPO / "options" / "triforce_dvae_shapes.yml"), ["networks.dvae.quantizer=gumbel"])
    spec = cfg["steps"]["dvae"]["losses"]["kl"]["weight"]
    weight = build_weight(spec, "kl")
    assert weight(0) == 0 and weight(spec["end"]) == spec["to"] > 0
    assert weight(spec["end"] // 2) == pytest.approx(spec["to"] / 2)


# ------------------------------------------------------------------ usage statistics
def test_codebook_usage_counts_the_codes_of_a_recent_window_not_of_one_batch():
    usage = CodeUsage(codebook_size=8, window=3)
    for code in (0, 1, 2, 3):  # each batch uses one code
        usage.update(torch.tensor([code]))
    assert float(usage.usage()) == 3 / 8  # codes 1, 2, 3: the last three forwards
    assert float(usage.perplexity()) > 2.5  # about three codes in use, though each batch used one


def test_perplexity_is_one_under_collapse_and_the_codebook_size_when_uniform():
    collapsed, uniform = CodeUsage(16, window=10), CodeUsage(16, window=10)
    for _ in range(20):
        collapsed.update(torch.zeros(64, dtype=torch.long))
        uniform.update(torch.arange(16).repeat(4))
    assert math.isclose(float(collapsed.perplexity()), 1.0, rel_tol=1e-5)
    assert math.isclose(float(uniform.perplexity()), 16.0, rel_tol=1e-4)


def test_debug_info_reports_usage_perplexity_and_a_code_histogram():
    net = tiny()
    net(torch.rand(2, 3, 16, 16))
    info = net.debug_info()
    assert 0 < float(info["codebook_usage"]) <= 1 and 1 <= float(info["perplexity"]) <= 16
    assert info["code_frequency"].shape == (16,)


# ------------------------------------------------------------------ it learns
# Four colours on three backgrounds, large shapes at three places, 16 px: a slice of the shapes data small
# enough that 100 steps (about 4 s per run on one core) show learning; the recipe trains on all of it.
LEARNING_DATA = dict(resolution=16, colors=["red", "green", "blue", "yellow"], backgrounds=["white", "black", "gray"],
                     sizes=["large"], positions=["center", "top left", "bottom right"])


@pytest.mark.parametrize("quantizer, better_than_mean", [("vq", 4.0), ("gumbel", 2.5)])
def test_a_short_run_on_shapes_reconstructs_far_better_than_the_mean_image_using_most_codes(quantizer,
                                                                                          better_than_mean):
    torch.manual_seed(0)
    data = ShapesDataset(count=10**6, **LEARNING_DATA)
    held_out = torch.stack([ShapesDataset(count=32, variant=1, **LEARNING_DATA)[i]["hq"] for i in range(32)])
    net = DiscreteVAE(codebook_size=32, width=16, codebook_dim=16, quantizer=quantizer, temperature_steps=100)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(1, 101):
        net.set_step(step)
        images = torch.stack([data[(0, step * 16 + i)]["hq"] for i in range(16)])
        out = net(images)
        loss = (out["recon"] - images).abs().mean() + 0.25 * out["commitment"] + 1e-2 * out["kl"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    error = float((net.eval().reconstruct(held_out) - held_out).square().mean())
    mean_image_error = float((held_out - held_out.mean(0)).square().mean())
    assert error < mean_image_error / better_than_mean
    assert float(net.usage.usage()) > 0.6
