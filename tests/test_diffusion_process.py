"""The Gaussian diffusion process: schedules, q(x_t | x_0), the posterior, parametrisations, respacing, samplers."""
from __future__ import annotations

import math

import pytest
import torch

from dlas.models.diffusion.process import (
    GaussianDiffusion,
    beta_schedule,
    respace_timesteps,
)
from dlas.models.diffusion.timesteps import LossAwareTimesteps, UniformTimesteps


def alpha_bars(betas: torch.Tensor) -> list[float]:
    """ᾱ_t as a running product in plain Python floats (independent of the implementation's cumprod)."""
    out, product = [], 1.0
    for beta in betas.tolist():
        product *= 1.0 - beta
        out.append(product)
    return out


def test_linear_schedule_is_ddpms_for_1000_steps_and_scaled_for_others():
    betas = beta_schedule("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    short = beta_schedule("linear", 250)
    assert short[0].item() == pytest.approx(4e-4) and short[-1].item() == pytest.approx(0.08)


def test_cosine_schedule_follows_the_squared_cosine_alpha_bar():
    steps = 100
    f = [math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(steps + 1)]
    betas = beta_schedule("cosine", steps)
    bars = alpha_bars(betas)
    for t in range(steps - 1):  # the last beta is capped at 0.999
        assert bars[t] == pytest.approx(f[t + 1] / f[0], rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)


def test_q_sample_is_the_closed_form_draw_from_q_xt_given_x0():
    diffusion = GaussianDiffusion.named("linear", 200)
    bars = alpha_bars(diffusion.table["betas"])
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 57, 199])
    x_t = diffusion.q_sample(x0, t, noise)
    for i, step in enumerate(t.tolist()):
        expected = math.sqrt(bars[step]) * x0[i] + math.sqrt(1 - bars[step]) * noise[i]
        torch.testing.assert_close(x_t[i], expected, rtol=1e-5, atol=1e-6)


def test_q_sample_has_the_mean_and_variance_of_q_xt_given_x0():
    diffusion = GaussianDiffusion.named("cosine", 100)
    bar = alpha_bars(diffusion.table["betas"])[40]
    x0 = torch.full((20000, 1, 1, 1), 0.6)
    x_t = diffusion.q_sample(x0, torch.full((20000,), 40), torch.randn_like(x0))
    assert x_t.mean().item() == pytest.approx(math.sqrt(bar) * 0.6, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - bar, rel=0.05)


def test_posterior_is_the_product_of_the_two_gaussians():
    # q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): precisions add, means are precision-weighted
    diffusion = GaussianDiffusion.named("linear", 300)
    betas = diffusion.table["betas"].tolist()
    bars = alpha_bars(diffusion.table["betas"])
    x0, x_t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    t = torch.tensor([5, 250])
    mean, variance, log_variance = diffusion.q_posterior(x0, x_t, t)
    for i, step in enumerate(t.tolist()):
        beta, previous = betas[step], bars[step - 1]
        precision = 1 / (1 - previous) + (1 - beta) / beta
        expected_mean = (math.sqrt(previous) * x0[i] / (1 - previous) + math.sqrt(1 - beta) * x_t[i] / beta) / precision
        torch.testing.assert_close(mean[i], expected_mean, rtol=1e-4, atol=1e-5)
        assert variance[i].item() == pytest.approx(1 / precision, rel=1e-5)
        assert log_variance[i].item() == pytest.approx(math.log(1 / precision), rel=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_a_perfect_prediction_gives_back_x0_and_the_noise(prediction):
    diffusion = GaussianDiffusion.named("cosine", 100, prediction=prediction)
    x0, noise = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 10, 50, 98])
    x_t = diffusion.q_sample(x0, t, noise)
    predicted = diffusion.predict_x0(x_t, t, diffusion.target(x0, noise, t))
    torch.testing.assert_close(predicted, x0, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(diffusion.predict_eps(x_t[:3], t[:3], x0[:3]), noise[:3], rtol=1e-3, atol=2e-3)


def test_learned_range_variance_spans_the_posterior_variance_to_beta():
    diffusion = GaussianDiffusion.named("linear", 100, variance="learned_range")
    t = torch.tensor([1, 50, 99])
    low = diffusion.log_variance(t, torch.full((3, 1, 1, 1), -1.0), 4).flatten()
    high = diffusion.log_variance(t, torch.full((3, 1, 1, 1), 1.0), 4).flatten()
    middle = diffusion.log_variance(t, torch.zeros(3, 1, 1, 1), 4).flatten()
    torch.testing.assert_close(low, diffusion.table["log_posterior_variance"][t].float())
    torch.testing.assert_close(high, diffusion.table["log_betas"][t].float())
    assert ((low < middle) & (middle < high)).all()


def test_the_bound_is_zero_where_the_model_matches_the_posterior_and_positive_elsewhere():
    diffusion = GaussianDiffusion.named("linear", 100)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    t = torch.tensor([30, 70])
    x_t = diffusion.q_sample(x0, t, torch.randn_like(x0))
    mean, _, log_variance = diffusion.q_posterior(x0, x_t, t)
    assert diffusion.vb_terms(x0, x_t, t, mean, log_variance).abs().max() < 1e-5
    assert (diffusion.vb_terms(x0, x_t, t, mean + 0.1, log_variance) > 0).all()


def test_the_decoder_term_at_t0_is_the_probability_of_the_8_bit_bin():
    diffusion = GaussianDiffusion.named("linear", 1000)
    x0 = torch.randint(1, 255, (2, 3, 8, 8)).float() / 127.5 - 1  # interior levels: bins of width 2/255
    t = torch.zeros(2, dtype=torch.long)
    x_t = diffusion.q_sample(x0, t, torch.randn_like(x0))
    log_variance = diffusion.log_variance(t, None, 4).expand_as(x0)
    sigma = math.exp(0.5 * log_variance[0, 0, 0, 0].item())
    bits = -math.log2(math.erf(1 / 255 / (sigma * math.sqrt(2))))  # P(|N(0, σ²)| < half a bin)
    torch.testing.assert_close(diffusion.vb_terms(x0, x_t, t, x0, log_variance), torch.full((2,), bits),
                               rtol=1e-4, atol=1e-4)
    assert (diffusion.vb_terms(x0, x_t, t, x0 + 4 / 255, log_variance) > bits + 1).all()


def test_respaced_process_keeps_alpha_bar_at_every_kept_step():
    base = GaussianDiffusion.named("cosine", 1000)
    kept = respace_timesteps(1000, 25)
    respaced = base.respaced(25)
    assert respaced.num_timesteps == 25 and respaced.timestep_map == kept
    torch.testing.assert_close(respaced.alphas_cumprod, base.alphas_cumprod[kept])
    # the model is told the original timestep (scaled to [0, 1000)), not the index into the short schedule
    times = respaced.model_time(torch.arange(25))
    torch.testing.assert_close(times, torch.tensor(kept, dtype=torch.float32))


def test_respacing_ddim_n_uses_the_integer_stride_and_sections_spread_their_steps():
    assert respace_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert respace_timesteps(100, 10)[0] == 0 and respace_timesteps(100, 10)[-1] == 99
    sections = respace_timesteps(300, "10,15,20")
    assert len(sections) == 45
    assert len([t for t in sections if t < 100]) == 10 and len([t for t in sections if t >= 200]) == 20


def test_respacing_more_steps_than_a_section_has_is_an_error():
    with pytest.raises(ValueError, match="cannot take 60 steps"):
        respace_timesteps(100, "60,10")
    with pytest.raises(ValueError, match="step count"):
        respace_timesteps(100, "fast")


def gaussian_data_oracle(diffusion: GaussianDiffusion, mean: float, std: float):
    """The exact ε-predictor for data x_0 ~ N(mean, std²): E[ε | x_t] for a Gaussian prior, in closed form."""
    def model(x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        # the model is called with the original timestep; recover ᾱ from it
        index = torch.searchsorted(torch.tensor(diffusion.timestep_map, dtype=torch.float32), time)
        bar = diffusion.alphas_cumprod[index].float().reshape(-1, 1, 1, 1)
        return (1 - bar).sqrt() * (x_t - bar.sqrt() * mean) / (bar * std ** 2 + 1 - bar)
    return model


@pytest.mark.parametrize("sampler, variance", [("ddpm", "fixed_large"), ("ddim", "fixed_small")])
def test_samplers_draw_from_the_data_distribution_with_an_exact_model(sampler, variance, one_torch_thread):
    # (DDPM with β̃ under-disperses at this step count, std 0.188: its steps ignore the uncertainty of x_0, which
    # is what a learned variance corrects.)
    diffusion = GaussianDiffusion.named("linear", 1000, variance=variance).respaced(250)
    noise = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    samples = diffusion.sample(gaussian_data_oracle(diffusion, 0.3, 0.2), noise, torch.Generator().manual_seed(1),
                               sampler, clip=False)
    assert samples.mean().item() == pytest.approx(0.3, abs=0.01)
    assert samples.std().item() == pytest.approx(0.2, abs=0.01)


def test_ddim_with_eta_0_is_deterministic_and_with_eta_1_is_not():
    diffusion = GaussianDiffusion.named("linear", 1000).respaced(20)
    model = gaussian_data_oracle(diffusion, 0.0, 0.5)
    noise = torch.randn(8, 1, 2, 2)
    first = diffusion.sample(model, noise, torch.Generator().manual_seed(1), "ddim", eta=0.0)
    second = diffusion.sample(model, noise, torch.Generator().manual_seed(2), "ddim", eta=0.0)
    assert torch.equal(first, second)
    stochastic = [diffusion.sample(model, noise, torch.Generator().manual_seed(s), "ddim", eta=1.0) for s in (1, 2)]
    assert not torch.allclose(*stochastic)


def test_uniform_timesteps_have_unit_weights():
    t, weights = UniformTimesteps(50).draw(64, torch.device("cpu"))
    assert t.min() >= 0 and t.max() < 50 and torch.equal(weights, torch.ones(64))


def test_loss_aware_timesteps_are_uniform_until_every_step_has_its_history():
    sampler = LossAwareTimesteps(4, history=2)
    sampler.update(torch.tensor([0, 1, 2, 3, 0, 1, 2]), torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0]))
    torch.testing.assert_close(sampler.probabilities(), torch.full((4,), 0.25))
    sampler.update(torch.tensor([3]), torch.tensor([4.0]))
    p = sampler.probabilities()
    expected = torch.tensor([1.0, 2.0, 3.0, 4.0]) / 10 * (1 - 0.001) + 0.001 / 4
    torch.testing.assert_close(p, expected)


def test_loss_aware_weights_keep_the_objective_unbiased():
    sampler = LossAwareTimesteps(4, history=1)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    sampler.update(torch.arange(4), losses)
    torch.manual_seed(0)
    t, weights = sampler.draw(200000, torch.device("cpu"))
    assert (weights * losses[t]).mean().item() == pytest.approx(losses.mean().item(), rel=0.01)
    assert (t == 3).float().mean().item() == pytest.approx(0.4, abs=0.01)  # p_t ∝ the loss's RMS


def test_loss_aware_history_keeps_the_last_values_per_step_and_round_trips():
    sampler = LossAwareTimesteps(3, history=2)
    sampler.update(torch.tensor([1, 1, 1]), torch.tensor([5.0, 6.0, 7.0]))  # two samples of a batch share t = 1
    assert sorted(sampler.history[1].tolist()) == [6.0, 7.0] and sampler.counts[1].item() == 3
    restored = LossAwareTimesteps(3, history=2)
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.history, sampler.history) and torch.equal(restored.counts, sampler.counts)
