"""Which timesteps a training batch is computed at: uniformly, or by importance according to past losses.

Both draw from torch's RNG on the batch's device (the trainer seeds and checkpoints it) and return importance
weights ``1 / (T · p_t)`` that keep the weighted loss an unbiased estimate of the uniform-t objective. The loss-aware
sampler's history is state (``state_dict``), saved with the checkpoint so a resumed run draws the same timesteps.
Nothing here reads a tensor back to the host: drawing and updating cost no synchronisation on a GPU.
"""
from __future__ import annotations

from typing import Literal, Mapping

import torch

TimestepSampler = Literal["uniform", "loss_aware"]


class UniformTimesteps:
    """t uniform over the T steps; every weight is 1."""

    def __init__(self, timesteps: int):
        self.num_timesteps = timesteps

    def draw(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(self.num_timesteps, (batch,), device=device)
        return t, torch.ones(batch, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from the losses."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        pass


class LossAwareTimesteps(UniformTimesteps):
    """Importance sampling with p_t ∝ √E[L_t²] over the last ``history`` losses seen at each step (improved DDPM's
    loss-second-moment resampler), mixed with ``uniform_share`` of the uniform distribution so no step starves.

    Until every step has ``history`` losses recorded it draws uniformly (with T = 1000 and 10 values per step that
    takes at least 10,000 samples, e.g. 625 steps at batch 16).
    """

    def __init__(self, timesteps: int, history: int = 10, uniform_share: float = 0.001):
        super().__init__(timesteps)
        self.history_length = history
        self.uniform_share = uniform_share
        self.history = torch.zeros(timesteps, history)
        self.counts = torch.zeros(timesteps, dtype=torch.long)

    def _to(self, device: torch.device) -> None:
        if self.history.device != device:
            self.history, self.counts = self.history.to(device), self.counts.to(device)

    def probabilities(self) -> torch.Tensor:
        """p_t for every step (uniform until the history is full)."""
        second_moment = self.history.square().mean(1).sqrt()
        weights = second_moment / second_moment.sum().clamp(min=1e-30)
        weights = weights * (1 - self.uniform_share) + self.uniform_share / self.num_timesteps
        uniform = torch.full_like(weights, 1 / self.num_timesteps)
        return torch.where((self.counts >= self.history_length).all(), weights, uniform)

    def draw(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        self._to(device)
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True)
        return t, 1 / (self.num_timesteps * p[t])

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record each sample's loss at its timestep; the oldest of a full history is overwritten."""
        self._to(t.device)
        losses = losses.detach().float()
        # one sample at a time: two samples of a batch may share a timestep, and each must take its own slot
        for i in range(t.shape[0]):
            step = t[i]
            slot = self.counts[step] % self.history_length
            self.history.index_put_((step, slot), losses[i])
            self.counts.index_put_((step,), self.counts[step] + 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        history, counts = state["history"], state["counts"]
        if tuple(history.shape) != tuple(self.history.shape):
            raise ValueError(f"the checkpoint's loss history has shape {tuple(history.shape)}, this sampler "
                             f"{tuple(self.history.shape)} (a different number of timesteps or history length)")
        self.history = history.to(self.history.device, self.history.dtype)
        self.counts = counts.to(self.counts.device, torch.long)


def build_timestep_sampler(kind: TimestepSampler, timesteps: int) -> UniformTimesteps:
    return LossAwareTimesteps(timesteps) if kind == "loss_aware" else UniformTimesteps(timesteps)
