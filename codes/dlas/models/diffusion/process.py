"""The Gaussian diffusion process: beta schedules, q(x_t | x_0), the posterior, the model's parametrisations, the
variational bound, timestep respacing and the DDPM / DDIM samplers.

Notation follows Ho et al. 2020 and Nichol & Dhariwal 2021 (improved DDPM): ``t`` is a 0-based index into the
schedule (index 0 is the first noising step), ``ᾱ_t = prod_{s<=t} (1 - β_s)``, images live in [-1, 1]. The
schedule's coefficients are computed once in float64 and handed out in float32 on the data's device.

A respaced process (:meth:`GaussianDiffusion.respaced`) keeps a subset of the timesteps with the same ``ᾱ`` at each
kept step, so a model trained on the full schedule samples with fewer steps; the model always sees the original
timestep, scaled to [0, 1000) (:meth:`GaussianDiffusion.model_time`), whatever the number of steps.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Literal, Optional, Sequence, Union

import torch

BetaSchedule = Literal["linear", "cosine"]
Prediction = Literal["eps", "x0", "v"]
Variance = Literal["fixed_small", "fixed_large", "learned_range"]
Sampler = Literal["ddpm", "ddim"]

COSINE_OFFSET = 0.008  # s of improved DDPM: keeps β_0 from being vanishingly small
MAX_BETA = 0.999  # the cosine schedule's cap near t = T, against a singularity at ᾱ = 0
MODEL_TIME_RANGE = 1000.0  # the model sees timesteps in [0, 1000) for any T (improved DDPM's rescale_timesteps)


def beta_schedule(name: BetaSchedule, timesteps: int) -> torch.Tensor:
    """The float64 betas of a named schedule with ``timesteps`` steps.

    ``linear``: Ho et al.'s 1e-4 .. 0.02 for T = 1000, both ends scaled by 1000 / T so the process reaches the same
    noise level with any T. ``cosine``: improved DDPM's ``ᾱ(t) = cos²((t/T + s) / (1 + s) · π/2)`` with s = 0.008,
    each β capped at 0.999.
    """
    if timesteps < 1:
        raise ValueError(f"a schedule needs at least one timestep, got {timesteps}")
    if name == "linear":
        if timesteps <= 20:
            raise ValueError(f"the linear schedule needs more than 20 timesteps (its last beta is 0.02 x 1000 / T), "
                             f"got {timesteps}; use the cosine schedule for very short processes")
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    if name == "cosine":
        def alpha_bar(fraction: float) -> float:
            return math.cos((fraction + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), MAX_BETA)
                 for i in range(timesteps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule '{name}' (linear or cosine)")


def respace_timesteps(timesteps: int, spec: Union[int, str]) -> list[int]:
    """The sorted timesteps a respaced sampler keeps out of ``timesteps``.

    ``spec`` is a count N (N steps evenly spread over the whole process, first and last included), ``"ddimN"``
    (the DDIM paper's integer stride giving exactly N steps, starting at 0) or ``"a,b,c"`` (the process cut into
    equal sections with a, b, c evenly spread steps each: more steps where they matter). A spec that asks for more
    steps than a section has is a ValueError.
    """
    if isinstance(spec, str) and spec.startswith("ddim"):
        count = _positive_int(spec[len("ddim"):], spec)
        for stride in range(1, timesteps + 1):
            if len(range(0, timesteps, stride)) == count:
                return list(range(0, timesteps, stride))
        raise ValueError(f"no integer stride gives exactly {count} of {timesteps} steps ('{spec}'); "
                         "give a plain count instead")
    counts = [spec] if isinstance(spec, int) else [_positive_int(part, spec) for part in str(spec).split(",")]
    if any(c < 1 for c in counts):
        raise ValueError(f"step counts must be >= 1, got {spec!r}")
    size, extra = divmod(timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if count > section:
            raise ValueError(f"cannot take {count} steps from a section of {section} of the {timesteps} timesteps "
                             f"({spec!r})")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        kept += [start + round(k * stride) for k in range(count)]
        start += section
    return sorted(set(kept))


def _positive_int(text: str, spec: object) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"respacing {spec!r}: expected a step count, 'ddimN' or comma-separated counts") from None
    if value < 1:
        raise ValueError(f"respacing {spec!r}: step counts must be >= 1")
    return value


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) per element, in nats."""
    return 0.5 * (log_var2 - log_var1 - 1.0 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2).square() * torch.exp(-log_var2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element of 8-bit data ``x`` in [-1, 1] under N(mean, exp(log_scale)²) integrated over x's bin
    (width 2/255; the two outermost bins extend to ±infinity), in nats."""
    inv_std = torch.exp(-log_scale)
    upper = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    lower = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    tiny = 1e-12
    log_cdf_upper = torch.log(upper.clamp(min=tiny))
    log_survival_lower = torch.log((1 - lower).clamp(min=tiny))
    log_bin = torch.log((upper - lower).clamp(min=tiny))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, log_bin))


def standard_normal(shape: Sequence[int], generator: Union[torch.Generator, Sequence[torch.Generator], None],
                    device: torch.device) -> torch.Tensor:
    """N(0, 1) noise of ``shape`` from one generator, one generator per sample (a list: row i from generator i), or
    torch's global RNG (None)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device) for g in generator])


def _mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


class GaussianDiffusion:
    """A diffusion process over ``betas`` with a model that predicts ``prediction`` and a ``variance`` kind.

    prediction: ``eps`` (the noise; Ho et al.), ``x0`` (the clean image) or ``v`` (``√ᾱ·ε − √(1−ᾱ)·x0``; Salimans
        & Ho 2022, well-conditioned at both ends of the schedule).
    variance: ``fixed_small`` (the posterior's β̃_t), ``fixed_large`` (β_t), or ``learned_range``: the model outputs
        twice the image's channels and the second half v in [-1, 1] interpolates the log-variance between the two,
        ``log σ² = (v+1)/2 · log β_t + (1−v)/2 · log β̃_t`` (improved DDPM).
    timestep_map: the original timestep of each of these steps (respaced processes); ``original_timesteps``: T of
        the schedule the model was trained on.
    """

    def __init__(self, betas: torch.Tensor, prediction: Prediction = "eps", variance: Variance = "fixed_small",
                 timestep_map: Optional[list[int]] = None, original_timesteps: Optional[int] = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D tensor of values in (0, 1]")
        if prediction not in ("eps", "x0", "v"):
            raise ValueError(f"unknown prediction '{prediction}' (eps, x0 or v)")
        if variance not in ("fixed_small", "fixed_large", "learned_range"):
            raise ValueError(f"unknown variance '{variance}' (fixed_small, fixed_large or learned_range)")
        self.prediction, self.variance = prediction, variance
        self.num_timesteps = len(betas)
        self.timestep_map = list(timestep_map) if timestep_map is not None else list(range(len(betas)))
        self.original_timesteps = original_timesteps or len(betas)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)
        # β̃_0 is 0: its log is clipped to β̃_1's, as improved DDPM does (the first step's variance is never used to
        # add noise, only as the decoder's scale).
        first = posterior_variance[1] if len(betas) > 1 else betas[0]
        log_posterior_variance = torch.log(torch.cat([first.reshape(1), posterior_variance[1:]]))
        log_large = torch.log(torch.cat([first.reshape(1), betas[1:]]))
        self.table = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": previous,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": posterior_variance,
            "log_posterior_variance": log_posterior_variance,
            "log_betas": torch.log(betas),
            "log_large_variance": log_large,
            "posterior_mean_coef_x0": betas * previous.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef_xt": (1 - previous) * (1 - betas).sqrt() / (1 - alphas_cumprod),
            "model_time": torch.tensor(self.timestep_map, dtype=torch.float64)
            * (MODEL_TIME_RANGE / self.original_timesteps),
        }
        self._names = list(self.table)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def named(cls, schedule: BetaSchedule = "linear", timesteps: int = 1000, prediction: Prediction = "eps",
              variance: Variance = "fixed_small") -> "GaussianDiffusion":
        """The process of a named beta schedule with ``timesteps`` steps."""
        return cls(beta_schedule(schedule, timesteps), prediction, variance)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for every step (float64, CPU)."""
        return self.table["alphas_cumprod"]

    @property
    def learns_variance(self) -> bool:
        return self.variance == "learned_range"

    def respaced(self, spec: Union[int, str, Iterable[int]]) -> "GaussianDiffusion":
        """This process restricted to the kept timesteps (see :func:`respace_timesteps`, or an explicit list).

        The new betas are ``1 − ᾱ_{s_i} / ᾱ_{s_{i−1}}``, so ᾱ at every kept step is the original's and the model,
        fed the original timesteps, sees the noise levels it was trained on.
        """
        kept = respace_timesteps(self.num_timesteps, spec) if isinstance(spec, (int, str)) else sorted(set(spec))
        if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f"kept timesteps must lie in [0, {self.num_timesteps}), got {kept[:3]}...")
        alphas = self.alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas[:-1]])
        betas = 1 - alphas / previous
        return GaussianDiffusion(betas, self.prediction, self.variance, [self.timestep_map[k] for k in kept],
                                 self.original_timesteps)

    # ------------------------------------------------------------------ coefficients
    def _coefficient(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """``table[name][t]`` in float32 on ``t``'s device, shaped to broadcast over an ``ndim``-D batch."""
        stacked = self._on_device.get(t.device)
        if stacked is None:  # one copy per device, so sampling and training make no host-to-device copy per step
            stacked = torch.stack([self.table[n] for n in self._names]).float().to(t.device)
            self._on_device[t.device] = stacked
        values = stacked[self._names.index(name)][t]
        return values.reshape(-1, *([1] * (ndim - 1)))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The float timestep the model is given for step index ``t``: the original timestep · 1000 / T."""
        return self._coefficient("model_time", t, 1)

    # ------------------------------------------------------------------ the forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw of x_t ~ q(x_t | x_0) = N(√ᾱ_t · x_0, (1 − ᾱ_t) · I) with the given standard-normal ``noise``."""
        return (self._coefficient("sqrt_alphas_cumprod", t, x0.dim()) * x0
                + self._coefficient("sqrt_one_minus_alphas_cumprod", t, x0.dim()) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and (clipped) log-variance of q(x_{t−1} | x_t, x_0)."""
        n = x_t.dim()
        mean = (self._coefficient("posterior_mean_coef_x0", t, n) * x0
                + self._coefficient("posterior_mean_coef_xt", t, n) * x_t)
        return (mean, self._coefficient("posterior_variance", t, n),
                self._coefficient("log_posterior_variance", t, n))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model should output (its first half, with a learned variance) for x_t = q_sample(x0, t, noise)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        n = x0.dim()
        return (self._coefficient("sqrt_alphas_cumprod", t, n) * noise
                - self._coefficient("sqrt_one_minus_alphas_cumprod", t, n) * x0)

    # ------------------------------------------------------------------ the model's reverse process
    def split_output(self, output: torch.Tensor, channels: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The model output's prediction and, with a learned variance, its variance values (ValueError when the
        output has the wrong number of channels for this process)."""
        expected = channels * (2 if self.learns_variance else 1)
        if output.dim() < 2 or output.shape[1] != expected:
            why = " (learned_range variance: twice the image's channels; set learn_sigma on the network)" \
                if self.learns_variance else ""
            raise ValueError(f"the diffusion model returned {output.shape[1] if output.dim() > 1 else '?'} channels "
                             f"for {channels}-channel images; expected {expected}{why}")
        if self.learns_variance:
            return output[:, :channels], output[:, channels:]
        return output, None

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """x_0 implied by the model's ``prediction`` at x_t."""
        n = x_t.dim()
        if self.prediction == "x0":
            return prediction
        if self.prediction == "eps":
            return (self._coefficient("sqrt_recip_alphas_cumprod", t, n) * x_t
                    - self._coefficient("sqrt_recipm1_alphas_cumprod", t, n) * prediction)
        return (self._coefficient("sqrt_alphas_cumprod", t, n) * x_t
                - self._coefficient("sqrt_one_minus_alphas_cumprod", t, n) * prediction)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes ``x0`` to ``x_t`` at step ``t``."""
        n = x_t.dim()
        return ((self._coefficient("sqrt_recip_alphas_cumprod", t, n) * x_t - x0)
                / self._coefficient("sqrt_recipm1_alphas_cumprod", t, n))

    def log_variance(self, t: torch.Tensor, variance_values: Optional[torch.Tensor], ndim: int) -> torch.Tensor:
        """log σ²_t of p(x_{t−1} | x_t): fixed, or interpolated by the model's values in [-1, 1]."""
        if self.variance == "fixed_small":
            return self._coefficient("log_posterior_variance", t, ndim)
        if self.variance == "fixed_large":
            return self._coefficient("log_large_variance", t, ndim)
        fraction = (variance_values + 1) / 2
        return (fraction * self._coefficient("log_betas", t, ndim)
                + (1 - fraction) * self._coefficient("log_posterior_variance", t, ndim))

    def p_mean_variance(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip: bool = False) -> dict[str, torch.Tensor]:
        """p(x_{t−1} | x_t) from the model's raw ``output``: ``mean``, ``log_variance`` and the predicted ``x0``
        (clamped to [-1, 1] with ``clip``, as when sampling images)."""
        prediction, variance_values = self.split_output(output, x_t.shape[1])
        x0 = self.predict_x0(x_t, t, prediction)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return {"mean": mean, "log_variance": self.log_variance(t, variance_values, x_t.dim()), "x0": x0}

    def vb_terms(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, mean: torch.Tensor,
                 log_variance: torch.Tensor) -> torch.Tensor:
        """The variational bound's term L_t per sample, in bits per dimension: KL(q(x_{t−1}|x_t,x_0) || p(x_{t−1}|x_t))
        for t > 0 and the discretised decoder's −log p(x_0 | x_1) at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        kl = _mean_per_sample(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2)
        nll = -_mean_per_sample(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / math.log(2)
        return torch.where(t == 0, nll, kl)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
               generator: Union[torch.Generator, Sequence[torch.Generator], None] = None, sampler: Sampler = "ddim",
               eta: float = 0.0, clip: bool = True) -> torch.Tensor:
        """x_0 from x_T = ``noise`` by running every step of this process backwards.

        ``model(x_t, model_time)`` returns the raw output. ``ddpm``: ancestral sampling from p(x_{t−1} | x_t) with
        its (fixed or learned) variance. ``ddim``: Song et al.'s update with ``σ_t = eta · √((1−ᾱ_{t−1})/(1−ᾱ_t)) ·
        √(1 − ᾱ_t/ᾱ_{t−1})``; eta 0 is deterministic (the same noise gives the same image), eta 1 matches DDPM's
        small variance. Fresh noise comes from ``generator`` (on ``noise``'s device), or from one generator per
        sample (a list), so that a sample does not depend on the others drawn with it; None: torch's global RNG.
        """
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler '{sampler}' (ddpm or ddim)")
        x = noise
        n = x.dim()
        for index in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
            out = self.p_mean_variance(model(x, self.model_time(t)).float(), x, t, clip)
            if index == 0:  # the last step adds no noise; both samplers' mean at t = 0 is the predicted x_0
                x = out["x0"]
                break
            if sampler == "ddpm":
                fresh = standard_normal(x.shape, generator, x.device)
                x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * fresh
                continue
            alpha = self._coefficient("alphas_cumprod", t, n)
            alpha_prev = self._coefficient("alphas_cumprod_prev", t, n)
            eps = self.predict_eps(x, t, out["x0"])
            x = out["x0"] * alpha_prev.sqrt()
            if eta:
                sigma = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
                fresh = standard_normal(x.shape, generator, x.device)
                x = x + (1 - alpha_prev - sigma.square()).clamp(min=0).sqrt() * eps + sigma * fresh
            else:
                x = x + (1 - alpha_prev).sqrt() * eps
        return x
