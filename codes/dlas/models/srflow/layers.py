"""Invertible layers of SRFlow: actnorm, 1x1 convolution, squeeze, split, and the parts of a flow step.

Every invertible layer here is a bijection with one API:

``forward(x, cond=None, logdet=None) -> (z, logdet)``
    data direction (HR image towards the latent). ``logdet`` is a ``[B]`` tensor that accumulates
    ``log|det dz/dx|``; ``None`` starts it at zero. ``cond`` is the encoder feature map of the layer's
    resolution; layers that need no condition ignore it.
``reverse(z, cond=None) -> x``
    the exact inverse (sampling direction). The reverse pass never needs the log-determinant.

The split is a bijection too: it keeps the channels that pass on and replaces the ones that leave the flow by
their *standardised* value ``eps = (x2 - mean) / std`` under a learned prior, so its log-determinant is
``-sum(log std)`` and the NLL only needs a standard normal for every latent.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Affine scales use sigmoid(h + 2) like SRFlow (an exp() scale overflows in the reverse direction, SRFlow issues
# #2/#22), floored at 1e-4 and divided by its value at h = 0 so that a zero-initialised network is the identity.
SCALE_SHIFT = 2.0
SCALE_FLOOR = 1e-4
_SCALE_AT_ZERO = 1.0 / (1.0 + math.exp(-SCALE_SHIFT)) + SCALE_FLOOR


def bounded_scale(h: torch.Tensor) -> torch.Tensor:
    """``(sigmoid(h + 2) + 1e-4) / (sigmoid(2) + 1e-4)``: 1 at h = 0, within (1.1e-4, 1.135)."""
    return (torch.sigmoid(h + SCALE_SHIFT) + SCALE_FLOOR) / _SCALE_AT_ZERO


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device_type``: float32 math inside a bf16/fp16 step (a no-op where the device has no
    autocast, e.g. ``meta``, on which ``torch.autocast`` refuses even to be disabled)."""
    available = getattr(torch.amp, "is_autocast_available", lambda device: device in ("cpu", "cuda"))
    return torch.autocast(device_type, enabled=False) if available(device_type) else contextlib.nullcontext()


def _zero_logdet(x: torch.Tensor, logdet: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_zeros(x.shape[0]) if logdet is None else logdet


def _pixels(x: torch.Tensor) -> int:
    return x.shape[2] * x.shape[3]


class ActNorm2d(nn.Module):
    """Per-channel affine ``z = (x + bias) * exp(logs)`` with data-dependent initialisation.

    The first forward pass in training mode sets ``bias``/``logs`` so that this batch comes out with zero mean and
    unit variance per channel (times ``scale``); afterwards they are ordinary parameters. The ``initialized`` buffer
    is saved with the weights, so resuming or loading a trained model never re-initialises. Under
    ``torch.distributed`` the statistics are averaged over all ranks so every replica starts identical.
    """

    def __init__(self, channels: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        # Reading the buffer forces a device sync, so remember on the Python side once it has been checked.
        self._known_initialized = False

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the parameters from the statistics of ``x`` (called automatically on the first training batch)."""
        # In float32 at least: under bf16 autocast x is bf16, where E[x^2] - E[x]^2 cancels to garbage.
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        moments = torch.stack([x.mean(dim=(0, 2, 3)), (x * x).mean(dim=(0, 2, 3))])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
            moments /= dist.get_world_size()
        mean, mean_square = moments
        std = (mean_square - mean * mean).clamp_min(0).sqrt()
        self.bias.copy_(-mean.view_as(self.bias))
        self.logs.copy_(torch.log(self.scale / (std + 1e-6)).view_as(self.logs))
        self.initialized.fill_(True)
        self._known_initialized = True

    def _maybe_initialize(self, x: torch.Tensor) -> None:
        if self._known_initialized or not self.training:
            return
        if not bool(self.initialized):
            self.initialize(x)
        self._known_initialized = True

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._maybe_initialize(x)
        z = (x + self.bias) * torch.exp(self.logs)
        return z, _zero_logdet(x, logdet) + self.logs.sum() * _pixels(x)

    def reverse(self, z: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        return z * torch.exp(-self.logs) - self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Weights saved without the flag (older files, or hand-converted ones) are trained weights.
        state_dict.setdefault(prefix + "initialized", torch.tensor(True))
        self._known_initialized = False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class InvertibleConv1x1(nn.Module):
    """Glow's invertible 1x1 convolution (a learned channel mixing), initialised to a random rotation.

    ``lu_decomposed=False`` (SRFlow's choice) learns the matrix W directly: log|det| by ``slogdet``. With
    ``lu_decomposed=True`` W = P·L·(U + diag(sign·exp(log_s))) with P fixed, so log|det| = sum(log_s) costs
    nothing and W can never become singular. The reverse pass inverts W in float64.
    """

    def __init__(self, channels: int, lu_decomposed: bool = False):
        super().__init__()
        self.lu_decomposed = lu_decomposed
        rotation = torch.linalg.qr(torch.randn(channels, channels))[0]
        if not lu_decomposed:
            self.weight = nn.Parameter(rotation)
            return
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign_s", torch.sign(diagonal))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diagonal.abs()))

    def matrix_and_logabsdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixing matrix W and log|det W|."""
        if not self.lu_decomposed:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        n = self.log_s.shape[0]
        eye = torch.eye(n, device=self.log_s.device, dtype=self.log_s.dtype)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper, self.log_s.sum()

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        # Outside autocast: a bf16 1x1 conv (or LU product) would round the flow's activations to 3 digits, and the
        # reverse pass could no longer undo it.
        with autocast_off(x.device.type):
            weight, logabsdet = self.matrix_and_logabsdet()
            z = F.conv2d(x, weight.to(x.dtype)[:, :, None, None])
        return z, _zero_logdet(x, logdet) + logabsdet * _pixels(x)

    def reverse(self, z: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        with autocast_off(z.device.type):
            weight, _ = self.matrix_and_logabsdet()
            # inv_ex: no host sync to check for a singular W; its non-finite result trips SRFlow's NaN guard instead.
            inverse = torch.linalg.inv_ex(weight.double()).inverse.to(z.dtype)
            return F.conv2d(z, inverse[:, :, None, None])


class Squeeze(nn.Module):
    """Space-to-depth by 2: ``[B, C, H, W] -> [B, 4C, H/2, W/2]`` (channel ``4c + 2i + j`` holds pixel (i, j)).

    A permutation of values, so its log-determinant is 0.
    """

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"squeeze needs an even height and width, got {h}x{w}")
        z = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        return z, _zero_logdet(x, logdet)

    def reverse(self, z: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = z.shape
        return z.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


class Conv2dZeros(nn.Conv2d):
    """A 3x3 convolution initialised to output zeros, with a learned per-channel gain ``exp(3·logs)``.

    Used as the last layer of every coupling network and of the split prior, so that a fresh flow is the identity
    and a fresh prior is N(0, 1). The factor 3 lets the gain move faster than the weights (Glow, SRFlow).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, logscale_factor: float = 3.0):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.logscale_factor = logscale_factor
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * torch.exp(self.logs * self.logscale_factor)


class Conv2dActNorm(nn.Module):
    """A bias-free convolution (weights ~ N(0, 0.05²)) followed by an actnorm, the hidden layers of SRFlow's NNs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.normal_(self.conv.weight, std=0.05)
        self.actnorm = ActNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actnorm(self.conv(x))[0]


def coupling_network(in_channels: int, out_channels: int, hidden_channels: int) -> nn.Sequential:
    """SRFlow's NN: 3x3 conv+actnorm, ReLU, 1x1 conv+actnorm, ReLU, zero-initialised 3x3 conv."""
    return nn.Sequential(
        Conv2dActNorm(in_channels, hidden_channels, 3), nn.ReLU(),
        Conv2dActNorm(hidden_channels, hidden_channels, 1), nn.ReLU(),
        Conv2dZeros(hidden_channels, out_channels),
    )


def _shift_and_scale(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Interleaved ("cross") channels, as SRFlow splits its NN outputs.
    return h[:, 0::2], bounded_scale(h[:, 1::2])


class AffineInjector(nn.Module):
    """SRFlow's conditional affine injector: ``z = (x + shift(cond)) * scale(cond)`` on all channels.

    Shift and scale depend only on the encoder features, so the LR image can move and rescale the whole
    activation map; invertible for any network because x does not enter it. Identity at initialisation.
    """

    def __init__(self, channels: int, cond_channels: int, hidden_channels: int = 64):
        super().__init__()
        if cond_channels <= 0:
            raise ValueError("the affine injector needs conditioning features (cond_channels > 0)")
        self.net = coupling_network(cond_channels, 2 * channels, hidden_channels)

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale = _shift_and_scale(self.net(cond))
        return (x + shift) * scale, _zero_logdet(x, logdet) + torch.log(scale).sum(dim=(1, 2, 3))

    def reverse(self, z: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        shift, scale = _shift_and_scale(self.net(cond))
        return z / scale - shift


class AffineCoupling(nn.Module):
    """Conditional affine coupling: the first ``C//2`` channels pass unchanged and, with the encoder features,
    predict shift and scale for the rest: ``z2 = (x2 + shift(x1, cond)) * scale(x1, cond)``.

    ``cond_channels=0`` gives an unconditional coupling. Identity at initialisation.
    """

    def __init__(self, channels: int, cond_channels: int = 0, hidden_channels: int = 64):
        super().__init__()
        if channels < 2:
            raise ValueError("an affine coupling needs at least 2 channels")
        self.channels_kept = channels // 2
        self.net = coupling_network(self.channels_kept + cond_channels, 2 * (channels - self.channels_kept),
                                    hidden_channels)
        self.conditional = cond_channels > 0

    def _shift_and_scale(self, kept: torch.Tensor, cond: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([kept, cond], dim=1) if self.conditional else kept
        return _shift_and_scale(self.net(h))

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        kept, changed = x[:, :self.channels_kept], x[:, self.channels_kept:]
        shift, scale = self._shift_and_scale(kept, cond)
        z = torch.cat([kept, (changed + shift) * scale], dim=1)
        return z, _zero_logdet(x, logdet) + torch.log(scale).sum(dim=(1, 2, 3))

    def reverse(self, z: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        kept, changed = z[:, :self.channels_kept], z[:, self.channels_kept:]
        shift, scale = self._shift_and_scale(kept, cond)
        return torch.cat([kept, changed / scale - shift], dim=1)


class Split(nn.Module):
    """Factor out half of the channels under a learned Gaussian prior ``N(mean, exp(logs)²)``.

    ``(mean, logs)`` come from a zero-initialised conv of the channels that stay in the flow (and of the encoder
    features when ``cond_channels > 0``; SRFlow's published models use none). The output keeps the first
    ``channels_pass`` channels as they are and replaces the others by ``eps = (x2 - mean) * exp(-logs)``;
    the caller takes ``eps`` out of the flow and scores it with a standard normal.
    """

    def __init__(self, channels: int, cond_channels: int = 0):
        super().__init__()
        self.channels_out = channels // 2
        self.channels_pass = channels - self.channels_out
        self.conditional = cond_channels > 0
        self.prior = Conv2dZeros(self.channels_pass + cond_channels, 2 * self.channels_out)

    def _mean_and_logs(self, kept: torch.Tensor, cond: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.prior(torch.cat([kept, cond], dim=1) if self.conditional else kept)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        kept, leaving = x[:, :self.channels_pass], x[:, self.channels_pass:]
        mean, logs = self._mean_and_logs(kept, cond)
        eps = (leaving - mean) * torch.exp(-logs)
        return torch.cat([kept, eps], dim=1), _zero_logdet(x, logdet) - logs.sum(dim=(1, 2, 3))

    def reverse(self, z: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        kept, eps = z[:, :self.channels_pass], z[:, self.channels_pass:]
        mean, logs = self._mean_and_logs(kept, cond)
        return torch.cat([kept, mean + torch.exp(logs) * eps], dim=1)


class FlowStep(nn.Module):
    """One flow step: actnorm -> invertible 1x1 conv -> [affine injector -> conditional affine coupling].

    Without ``cond_channels`` (a "transition" step) it is only actnorm + 1x1 conv, as SRFlow's
    ``additionalFlowNoAffine`` steps that open each level.
    """

    def __init__(self, channels: int, cond_channels: int = 0, hidden_channels: int = 64,
                 lu_decomposed: bool = False):
        super().__init__()
        self.actnorm = ActNorm2d(channels)
        self.invconv = InvertibleConv1x1(channels, lu_decomposed)
        self.injector = AffineInjector(channels, cond_channels, hidden_channels) if cond_channels else None
        self.coupling = AffineCoupling(channels, cond_channels, hidden_channels) if cond_channels else None

    def sublayers(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, layer)`` in forward order."""
        for name in ("actnorm", "invconv", "injector", "coupling"):
            layer = getattr(self, name)
            if layer is not None:
                yield name, layer

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = _zero_logdet(x, logdet)
        for _, layer in self.sublayers():
            x, logdet = layer(x, cond, logdet)
        return x, logdet

    def reverse(self, z: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        for _, layer in reversed(list(self.sublayers())):
            z = layer.reverse(z, cond)
        return z


def standard_normal_logp(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed per sample: ``[B, ...] -> [B]``."""
    return -0.5 * (z * z + math.log(2 * math.pi)).flatten(1).sum(dim=1)
