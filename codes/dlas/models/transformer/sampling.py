"""Choosing the next token from logits: temperature, top-k, top-p (nucleus) and classifier-free guidance."""
from __future__ import annotations

import torch

from dlas.errors import ConfigError


def check_sampling_options(temperature: float, top_k: int | None, top_p: float | None,
                           guidance_scale: float | None) -> None:
    """A ConfigError naming the option for a value that cannot sample."""
    if not temperature > 0:
        raise ConfigError(f"must be > 0 (1: the model's distribution, lower: sharper), got {temperature}",
                          "temperature")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"must be >= 1 or null (no top-k filter), got {top_k}", "top_k")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"must be in (0, 1] or null (no nucleus filter), got {top_p}", "top_p")
    if guidance_scale is not None and guidance_scale < 0:
        raise ConfigError(f"must be >= 0 (0: unconditional, 1: conditional, >1: guided) or null, got "
                          f"{guidance_scale}", "guidance_scale")


def guide(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``cond + (scale - 1) * (cond - uncond)``.

    This is ``uncond + scale * (cond - uncond)`` (DALLE-pytorch's ``cond_scale``, Imagen's ``w``), written so
    that ``scale = 1`` returns the conditional logits exactly; Ho & Salimans' ``w`` is ``scale - 1``.
    """
    return conditional + (scale - 1.0) * (conditional - unconditional)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits [B, V]`` with everything outside the top ``top_k`` and outside the smallest set of tokens whose
    probability reaches ``top_p`` set to -inf (the most likely token always survives)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # a token is dropped when the tokens more likely than it already reach top_p
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, generator: torch.Generator | None, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """One token id per row of ``logits [B, V]`` (``[B]`` int64), drawn from ``generator``."""
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
