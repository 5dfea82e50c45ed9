"""Optimizers a step can name under ``optimizer: {type: …}``.

The framework passes ``params``: the ``(name, parameter)`` pairs of the networks the step trains, named
``network.module.weight``. Each builder picks torch's fastest implementation for where the parameters live:
``fused`` when they are all CUDA floating-point tensors, ``foreach`` (one kernel per op over all tensors)
otherwise. Both compute the same update as the plain loop.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from dlas.errors import ConfigError
from dlas.registry import OPTIMIZERS

NamedParams = Sequence[tuple[str, torch.nn.Parameter]]

# Words (a name split at "." and "_") marking a normalization or an embedding: "norm1", "layernorm", "ln" (of
# "ln_f"), "bn2", "emb", "embedding", "tokembed", GPT-2's "wte"/"wpe".
_NO_DECAY_WORD = re.compile(r"[a-z0-9]*norm[0-9]*|ln[0-9]*|bn[0-9]*|emb[a-z0-9]*|[a-z0-9]*embed[a-z0-9]*|wte|wpe")


def _unique(params: NamedParams) -> list[tuple[str, torch.nn.Parameter]]:
    """Drop repeats of a parameter shared by two trained networks (torch refuses duplicates)."""
    seen: set[int] = set()
    unique = []
    for name, param in params:
        if id(param) not in seen:
            seen.add(id(param))
            unique.append((name, param))
    return unique


def _implementation(params: NamedParams) -> dict[str, Any]:
    """``{"fused": True}`` for all-CUDA floating-point parameters, else ``{"foreach": True}``."""
    tensors = [p for _, p in params]
    if tensors and all(p.is_cuda and p.is_floating_point() for p in tensors):
        return {"fused": True}
    return {"foreach": True}


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW should apply weight decay to this parameter.

    Matrices and convolution kernels (2 or more dimensions) decay; biases, norm scales and other vectors or
    scalars do not, and neither does any parameter under a module whose name marks it as a normalization
    (``norm``, ``ln``, ``bn``) or an embedding (``emb``, ``embedding``, ``wte``, ``wpe``): shrinking those
    towards zero does not regularize, it only distorts their scale.
    """
    if param.dim() < 2:
        return False
    return not any(_NO_DECAY_WORD.fullmatch(word) for word in re.split(r"[._]", name.lower()))


@OPTIMIZERS.register("adam")
def adam(params: NamedParams, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam (``torch.optim.Adam``).

    Options:
      lr: learning rate; the SR recipes use 2e-4 for PSNR pre-training, and 1e-4 (published ESRGAN, SRGAN) or
        2e-4 (``esrgan_x4``) for GANs.
      betas: decay rates of the gradient's running mean and square; the SR recipes use [0.9, 0.99].
      eps: added to the root of the running square, for stability.
      weight_decay: L2 penalty added to the gradient (coupled with the adaptive scaling; for decoupled decay use
        ``adamw``). Applies to every parameter.
    """
    named = _unique(params)
    return torch.optim.Adam([p for _, p in named], lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                            **_implementation(named))


@OPTIMIZERS.register("adamw")
def adamw(params: NamedParams, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW (``torch.optim.AdamW``): Adam with decoupled weight decay, for transformers and diffusion models.

    Options as ``adam``; ``weight_decay`` (default 0.01) shrinks each decaying weight by ``lr * weight_decay``
    per step. Only weight matrices and convolution kernels decay: biases, normalization weights and
    embeddings are put in a second parameter group with ``weight_decay: 0`` (the rule is
    :func:`dlas.trainer.optimizers.decays`: a parameter with fewer than 2 dimensions, or one under a module
    named like ``norm``/``ln``/``bn``/``emb``, does not decay).
    """
    named = _unique(params)
    decay = [p for name, p in named if decays(name, p)]
    no_decay = [p for name, p in named if not decays(name, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Both groups always exist, so a checkpoint's param_groups match the optimizer rebuilt on resume.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **_implementation(named))


@OPTIMIZERS.register("sgd")
def sgd(params: NamedParams, lr: float = 1e-2, momentum: float = 0.9, nesterov: bool = False,
        weight_decay: float = 0.0) -> torch.optim.SGD:
    """Stochastic gradient descent with momentum (``torch.optim.SGD``).

    Options:
      lr: learning rate.
      momentum: factor of the running velocity (0 gives plain SGD).
      nesterov: use Nesterov momentum (needs momentum > 0).
      weight_decay: L2 penalty added to the gradient, on every parameter.
    """
    named = _unique(params)
    if nesterov and momentum <= 0:
        raise ConfigError("nesterov needs momentum > 0", "nesterov")
    return torch.optim.SGD([p for _, p in named], lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay, **_implementation(named))
