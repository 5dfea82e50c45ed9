"""The dVAE's bottlenecks: a Gumbel-softmax relaxation over codebook logits, an EMA vector quantizer, and the
windowed code-usage statistics both report.

A quantizer maps the encoder's output ``z`` ([B, C, h, w]) to a :class:`Quantized`: the decoder's input, the
integer tokens [B, h, w] and its own loss terms (``kl`` for Gumbel, ``commitment`` for VQ; the other one is a
zero). Both run in float32 under autocast: a bf16 distance or softmax over 8192 codes picks wrong codes.

Codebook state changes only in a *training* forward: the module is in train mode, autograd is on and the
encoder's output requires grad. A dVAE that some other step uses frozen (a transformer's step encoding its
images) then leaves its codebook and statistics alone even though the trainer keeps every network in train
mode.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dlas.models.srflow.layers import autocast_off

TemperatureSchedule = Literal["cosine", "linear", "exponential"]


class Quantized(NamedTuple):
    """What a quantizer gives the dVAE for one batch."""

    decoder_input: torch.Tensor  # [B, D, h, w]
    tokens: torch.Tensor  # [B, h, w] int64
    commitment: torch.Tensor  # 0-d: mean squared distance of z to its code (VQ), else 0
    kl: torch.Tensor  # 0-d: mean KL(q || uniform) per token position in nats (Gumbel), else 0


def updates_state(module: nn.Module, z: torch.Tensor) -> bool:
    """Whether this forward may change codebook state: a training forward whose encoder is being trained."""
    return module.training and torch.is_grad_enabled() and z.requires_grad


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


class CodeUsage(nn.Module):
    """Which codes the encoder picks, over a recent window of training forwards rather than one batch.

    ``usage``: the fraction of the codebook picked at least once in the last ``window`` training forwards.
    ``perplexity``: exp(entropy) of the code frequencies averaged with an EMA of horizon ``window`` (decay
    1 - 1/window): the effective number of codes in use, from 1 (collapse) to the codebook size (uniform).
    Per-batch perplexity would depend on the batch size (a batch of 64 positions can use at most 64 codes).
    The state is a few buffers updated on the device without a host sync; they are saved with the weights, so
    a resumed run reports the same numbers.
    """

    def __init__(self, codebook_size: int, window: int = 100):
        super().__init__()
        self.window = window
        self.register_buffer("forwards", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_used", torch.full((codebook_size,), -(2**62), dtype=torch.int64))
        self.register_buffer("frequency", torch.zeros(codebook_size))  # normalised when read: no start-up bias

    @torch.no_grad()
    def update(self, tokens: torch.Tensor) -> None:
        counts = torch.bincount(tokens.flatten(), minlength=self.last_used.numel()).float()
        if _distributed():
            torch.distributed.all_reduce(counts)
        self.forwards += 1
        self.last_used.copy_(torch.where(counts > 0, self.forwards, self.last_used))
        decay = 1.0 - 1.0 / self.window
        self.frequency.mul_(decay).add_(counts / counts.sum().clamp_min(1), alpha=1 - decay)

    def usage(self) -> torch.Tensor:
        return (self.forwards - self.last_used < self.window).float().mean()

    def perplexity(self) -> torch.Tensor:
        p = self.frequency / self.frequency.sum().clamp_min(1e-12)
        return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def temperature_at(iteration: int, start: float, end: float, steps: int, schedule: TemperatureSchedule) -> float:
    """The Gumbel temperature at a 1-based iteration: ``start`` at 0, ``end`` from ``steps`` on.

    ``cosine``: ``end + (start - end) * (1 + cos(pi * t)) / 2`` with ``t = iteration / steps`` (flat at both
    ends); ``linear``; ``exponential``: ``start * (end / start) ** t`` (the same factor every step). A pure
    function of the iteration, so a resumed run anneals exactly as an uninterrupted one.
    """
    if steps <= 0 or iteration >= steps:
        return end
    t = max(iteration, 0) / steps
    if schedule == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * t)) / 2
    if schedule == "linear":
        return start + (end - start) * t
    return start * (end / start) ** t


class GumbelQuantizer(nn.Module):
    """DALL-E's relaxation: the encoder gives logits over the codebook at each position; training decodes a
    Gumbel-softmax sample (noise added to the logits, divided by the temperature) mixing the codebook vectors,
    evaluation decodes the argmax code. ``kl`` is KL(softmax(logits) || uniform) = sum q log q + log K, averaged
    over positions. ``hard``: straight-through one-hot samples (forward hard, gradient of the soft sample)."""

    def __init__(self, codebook_size: int, dim: int, hard: bool = False):
        super().__init__()
        self.codebook_size = codebook_size
        self.hard = hard
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.normal_(self.embedding.weight, std=1.0)
        self.temperature = 1.0

    @property
    def input_channels(self) -> int:
        return self.codebook_size

    def forward(self, logits: torch.Tensor) -> Quantized:
        with autocast_off(logits.device.type):
            logits = logits.float()
            tokens = logits.argmax(dim=1)
            log_q = F.log_softmax(logits, dim=1)
            kl = (log_q.exp() * log_q).sum(dim=1).mean() + math.log(self.codebook_size)
            if self.training and torch.is_grad_enabled():
                weights = F.gumbel_softmax(logits, tau=self.temperature, hard=self.hard, dim=1)
                decoder_input = torch.einsum("bkhw,kd->bdhw", weights, self.embedding.weight)
            else:
                decoder_input = self.lookup(tokens)
        return Quantized(decoder_input, tokens, logits.new_zeros(()), kl)

    def encode(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens).permute(0, 3, 1, 2)


class EMAVectorQuantizer(nn.Module):
    """VQ-VAE with an exponential-moving-average codebook (van den Oord et al. 2017, appendix; VQ-VAE-2).

    Each position's vector ``z`` takes the nearest code ``e`` (Euclidean); the decoder gets
    ``z + sg(e - z)`` (straight-through), ``commitment`` is ``mean((z - sg(e))^2)``. Training forwards update
    the codebook without gradients, per code ``k`` with ``n_k`` assignments and ``s_k`` their sum in the batch::

        N_k <- decay * N_k + (1 - decay) * n_k          (EMA cluster size)
        S_k <- decay * S_k + (1 - decay) * s_k          (EMA sum)
        e_k  = S_k / ((N_k + eps) / (N + K eps) * N)     (Laplace smoothing; N = sum_k N_k)

    Dead codes, those whose ``N_k`` fell below ``dead_code_threshold`` (EMA assignments per forward), are
    restarted from the current batch's encoder outputs chosen at random (``N_k`` set to the threshold and
    ``S_k`` to ``threshold * e_k``, so a code is not dead again at once). The codebook starts empty
    (``N_k = 0``), so with a threshold above 0 the first training batch initialises every code from the data.
    With several processes the counts and sums are all-reduced and rank 0's restart choices broadcast, so every
    rank keeps the same codebook.
    """

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99, eps: float = 1e-5,
                 dead_code_threshold: float = 1.0):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.decay = decay
        self.eps = eps
        self.dead_code_threshold = dead_code_threshold
        codebook = torch.randn(codebook_size, dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", codebook.clone() * 0)

    @property
    def input_channels(self) -> int:
        return self.dim

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """The index of the nearest code of each row of ``flat`` [N, D]."""
        distances = (flat.square().sum(1, keepdim=True) - 2 * flat @ self.codebook.t()
                     + self.codebook.square().sum(1)[None])
        return distances.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> Quantized:
        with autocast_off(z.device.type):
            z = z.float()
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            tokens = self.nearest(flat.detach())
            quantized = self.codebook[tokens]
            commitment = (flat - quantized.detach()).square().mean()
            if updates_state(self, z):
                self.update(flat.detach(), tokens)
            straight = flat + (quantized - flat).detach()
            decoder_input = straight.view(b, h, w, d).permute(0, 3, 1, 2)
        return Quantized(decoder_input, tokens.view(b, h, w), commitment, z.new_zeros(()))

    @torch.no_grad()
    def update(self, flat: torch.Tensor, tokens: torch.Tensor) -> None:
        """One EMA step of the codebook from a batch's vectors ``flat`` [N, D] and their codes, then restarts."""
        counts = torch.bincount(tokens, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, tokens, flat)
        if _distributed():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed.clamp_min(1e-12)[:, None])
        if self.dead_code_threshold > 0:
            self.restart_dead_codes(flat)

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Move every code with ``cluster_size < dead_code_threshold`` onto a random vector of ``flat``.

        Written with ``torch.where`` over all codes rather than ``if dead.any()``, so it costs no host sync.
        """
        dead = self.cluster_size < self.dead_code_threshold
        candidates = flat[torch.randint(flat.shape[0], (self.codebook_size,), device=flat.device)]
        if _distributed():
            torch.distributed.broadcast(candidates, 0)
        threshold = self.dead_code_threshold
        self.codebook.copy_(torch.where(dead[:, None], candidates, self.codebook))
        self.embed_sum.copy_(torch.where(dead[:, None], candidates * threshold, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead, torch.full_like(self.cluster_size, threshold), self.cluster_size))

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        with autocast_off(z.device.type):
            b, d, h, w = z.shape
            return self.nearest(z.float().permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.codebook[tokens].permute(0, 3, 1, 2)
