"""Training a diffusion model through an ordinary config: the ``gaussian_diffusion`` injector."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

from dlas.context import Context
from dlas.errors import ConfigError
from dlas.injectors.base import Injector
from dlas.models.diffusion.process import (
    BetaSchedule,
    GaussianDiffusion,
    Prediction,
    Sampler,
    Variance,
    respace_timesteps,
)
from dlas.models.diffusion.timesteps import TimestepSampler, build_timestep_sampler
from dlas.registry import INJECTORS

QUARTILES = 4
OUTPUTS = ("pred", "target", "mse", "vb", "timestep", "noisy", "denoised")


@INJECTORS.register("gaussian_diffusion")
class GaussianDiffusionInjector(Injector):
    """One diffusion training term per sample: draws a timestep t and the noise, noises ``hq`` to x_t, runs the
    network on (x_t, t, lq, condition) and writes what the losses need.

    Images are mapped from [0, 1] to [-1, 1] for the process. State keys written (each with ``prefix``):
      pred: the network's prediction (its first ``channels`` outputs; with a learned variance the rest are the
        variance values); target: what it should have predicted (the noise, x_0 or v).
      mse: the per-sample mean squared error of pred against target, importance-weighted by the timestep sampler,
        averaged over the batch (a ``direct`` loss: L_simple). With ``timestep_sampler: uniform``, a ``pix`` loss
        on pred/target (e.g. ``criterion: l1``, as SR3) trains the same thing.
      vb: T · L_t, a one-sample estimate of the variational bound in bits per dimension (without the constant prior
        term), importance-weighted. Its gradient reaches only the learned variance: the mean enters it detached, as
        improved DDPM does, so ``{type: direct, key: vb, weight: 0.001}`` is its hybrid loss with λ = 0.001. With a
        fixed variance it trains nothing and is a free estimate of how well the model fits.
      timestep: t of each sample; noisy: x_t and denoised: the predicted x_0, both mapped to [0, 1] and clamped
        (for visuals).
    Debug scalars ``debug/{prefix}mse_q0..q3`` and ``vb_q0..q3``: the mean of each term over the samples whose t fell
    in each quarter of the schedule (q0: the least noise). A quarter no sample fell in repeats its last value (at
    first: the batch's mean).

    Options:
      network: the denoiser (a ``diffusion_unet``), called as ``network(x_t, t, lq=..., condition=...)`` with t the
        float timestep in [0, 1000).
      hq: the clean images; lq: the low-resolution images to condition on (null: unconditional);
      condition: an extra per-sample vector to condition on (null: none).
      timesteps: T (1000; improved DDPM's upsampler used 4000); schedule: ``linear`` (DDPM's, the upsamplers' choice)
        or ``cosine`` (improved DDPM's, better at low resolution).
      prediction: ``eps``, ``x0`` or ``v``. variance: ``fixed_small`` (β̃), ``fixed_large`` (β) or ``learned_range``
        (the network's ``learn_sigma``; train it with the vb term; sampling with few steps gains the most).
      timestep_sampler: ``uniform``, or ``loss_aware``: importance sampling with p_t ∝ √E[vb_t²] over the last 10
        values per timestep (improved DDPM §3.3, for the VB term), uniform until every timestep has 10.
      sampler, sampling_steps, eta: how validation and ``dlas-test`` sample this model unless told otherwise (the
        ``diffusion`` task reads them from the run's config): ``ddim`` or ``ddpm``; the number of steps (a count, or
        a respacing such as ``ddim50`` or ``10,10,30``); DDIM's eta (0: deterministic). Training ignores them.
      prefix: prepended to every state key written (two diffusion models in one config).
    """

    def __init__(self, network: str = "generator", hq: str = "hq", lq: Optional[str] = "lq",
                 condition: Optional[str] = None, timesteps: int = 1000, schedule: BetaSchedule = "linear",
                 prediction: Prediction = "eps", variance: Variance = "fixed_small",
                 timestep_sampler: TimestepSampler = "uniform", sampler: Sampler = "ddim",
                 sampling_steps: Union[int, str] = 50, eta: float = 0.0, prefix: str = ""):
        if timesteps < 2:
            raise ConfigError(f"must be >= 2, got {timesteps}", "timesteps")
        if eta < 0:
            raise ConfigError(f"must be >= 0, got {eta}", "eta")
        try:
            respace_timesteps(timesteps, sampling_steps)
        except ValueError as exc:
            raise ConfigError(str(exc), "sampling_steps") from None
        self.keys = {name: f"{prefix}{name}" for name in OUTPUTS}
        reads = [hq] + [key for key in (lq, condition) if key is not None]
        super().__init__(reads=reads, writes=list(self.keys.values()), networks=[network])
        self.network, self.hq, self.lq, self.condition = network, hq, lq, condition
        self.prefix = prefix
        self.sampler, self.sampling_steps, self.eta = sampler, sampling_steps, eta  # for the diffusion task
        try:
            self.diffusion = GaussianDiffusion.named(schedule, timesteps, prediction, variance)
        except ValueError as exc:
            raise ConfigError(str(exc), "timesteps") from None
        self.timestep_sampler = build_timestep_sampler(timestep_sampler, timesteps)
        self.last_quartiles: dict[str, torch.Tensor] = {}

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        x0 = state[self.hq].float() * 2 - 1
        kwargs = {}
        if self.lq is not None:
            kwargs["lq"] = state[self.lq] * 2 - 1
        if self.condition is not None:
            kwargs["condition"] = state[self.condition]
        t, weights = self.timestep_sampler.draw(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        output = ctx.networks[self.network](x_t, self.diffusion.model_time(t), **kwargs).float()
        pred, variance_values = self.diffusion.split_output(output, x0.shape[1])
        target = self.diffusion.target(x0, noise, t)
        mse = (pred - target).square().flatten(1).mean(1)
        # The bound trains the variance only: the mean's part comes from a detached prediction.
        frozen = pred.detach() if variance_values is None else torch.cat([pred.detach(), variance_values], 1)
        reverse = self.diffusion.p_mean_variance(frozen, x_t, t)
        vb = self.diffusion.vb_terms(x0, x_t, t, reverse["mean"], reverse["log_variance"]) \
            * self.diffusion.num_timesteps
        if ctx.training:
            self.timestep_sampler.update(t, vb)
            self._log_quartiles(ctx, t, {"mse": mse.detach(), "vb": vb.detach()})
        return {
            self.keys["pred"]: pred,
            self.keys["target"]: target,
            self.keys["mse"]: (mse * weights).mean(),
            self.keys["vb"]: (vb * weights).mean(),
            self.keys["timestep"]: t,
            self.keys["noisy"]: ((x_t.detach() + 1) / 2).clamp(0, 1),
            self.keys["denoised"]: ((reverse["x0"].detach() + 1) / 2).clamp(0, 1),
        }

    def _log_quartiles(self, ctx: Context, t: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """Each term's mean per quarter of the schedule, without a host sync (an empty quarter repeats itself)."""
        quartile = (t * QUARTILES) // self.diffusion.num_timesteps
        members = torch.nn.functional.one_hot(quartile, QUARTILES).float()  # batch x 4
        counts = members.sum(0)
        for name, values in terms.items():
            means = (values[:, None] * members).sum(0) / counts.clamp(min=1)
            previous = self.last_quartiles.get(name)
            previous = values.mean().expand(QUARTILES) if previous is None else previous.to(means.device)
            means = torch.where(counts > 0, means, previous)
            self.last_quartiles[name] = means
            for q in range(QUARTILES):
                ctx.log(f"{self.prefix}{name}_q{q}", means[q])

    # The loss-aware sampler's history is training state: the trainer saves it with the step's optimizer.
    def state_dict(self) -> dict[str, Any]:
        return {"timestep_sampler": self.timestep_sampler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.timestep_sampler.load_state_dict(state.get("timestep_sampler", {}))
