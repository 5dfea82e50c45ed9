"""Normalization layers, spectral norm and Fixup initialisation, as the conv networks choose them by name.

A network takes ``norm: none|batch|group|instance`` (and a discriminator ``spectral_norm: true``) and builds its
layers with :func:`norm_layer` / :func:`spectral_normed`; a residual network takes ``init: fixup`` and calls
:func:`fixup_init` on each residual branch. Why not always BatchNorm: its output depends on the rest of the batch
(real and fake images, micro-batches under ``mega_batch_factor``, a batch of one at inference) and its running
statistics make eval differ from training, a known source of GAN artifacts. Group and instance norm compute
per image; Fixup trains a deep residual network with no normalization at all.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dlas.errors import ConfigError

NormKind = Literal["none", "batch", "group", "instance"]

# DLAS's GroupNorm discriminators used 8 groups: small enough that 64-channel layers keep 8 channels per group.
GROUP_NORM_GROUPS = 8


def norm_layer(kind: str, channels: int) -> nn.Module:
    """A 2-D normalization layer over ``channels`` (``nn.Identity`` for ``none``), with a learned scale and shift.

    ``batch``: BatchNorm2d (batch statistics in training, running ones in eval). ``group``: GroupNorm with
    :data:`GROUP_NORM_GROUPS` groups. ``instance``: InstanceNorm2d, each image's channel on its own, the same in
    training and eval. Callers check the channel counts first with :func:`check_norm_channels`.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(GROUP_NORM_GROUPS, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{kind}' (none, batch, group or instance)")


def check_norm_channels(kind: str, counts: dict[str, int]) -> None:
    """Raise ConfigError naming the option when ``norm: group`` cannot split one of ``counts`` into 8 groups.

    ``counts`` maps an option name (``nf``, ``gc``) to a channel count a normalized layer will have.
    """
    if kind != "group":
        return
    for option, channels in counts.items():
        if channels % GROUP_NORM_GROUPS:
            raise ConfigError(f"norm: group splits channels into {GROUP_NORM_GROUPS} groups, so {option} must be "
                              f"a multiple of {GROUP_NORM_GROUPS}, got {channels}", option)


def spectral_normed(module: nn.Module, enabled: bool = True) -> nn.Module:
    """``module`` with spectral normalization of its weight when ``enabled`` (one power iteration per call).

    The hook-based ``torch.nn.utils.spectral_norm`` (keys ``weight_orig``, ``weight_u``, ``weight_v``), the layout
    of Real-ESRGAN's discriminator files, so the same module names load them.
    """
    return nn.utils.spectral_norm(module) if enabled else module


def check_fixup(init: str, norm: str) -> None:
    """``init: fixup`` replaces normalization; with a norm layer its zeroed last convs get huge first gradients."""
    if init == "fixup" and norm != "none":
        raise ConfigError(f"init: fixup is an initialisation for training without normalization layers; use it "
                          f"with norm: none (got norm: {norm})", "init")


def fixup_scale(branches: int, layers: int) -> float:
    """Fixup's factor for the non-final layers of a branch: ``branches ** (-1 / (2 * layers - 2))``.

    Zhang et al. 2019 (Fixup): with L residual branches of m layers each, this keeps the change of the network's
    output per SGD step independent of the depth. For a single-layer branch there is nothing to scale (1.0).
    """
    return float(branches) ** (-1.0 / (2 * layers - 2)) if layers > 1 and branches > 0 else 1.0


def fixup_init(branch: list[nn.Module], branches: int) -> None:
    """Fixup-initialise one residual branch given as its weighted layers in order (the last one ends the branch).

    Every layer but the last gets He (kaiming-normal, fan-in) weights multiplied by :func:`fixup_scale`; the last
    layer's weights are zero, so the branch adds nothing and its residual block starts as the identity. Biases
    start at zero.
    """
    scale = fixup_scale(branches, len(branch))
    for i, layer in enumerate(branch):
        if i == len(branch) - 1:
            nn.init.zeros_(layer.weight)
        else:
            nn.init.kaiming_normal_(layer.weight)
            with torch.no_grad():
                layer.weight.mul_(scale)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
