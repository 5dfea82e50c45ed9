"""SwitchedConv: a convolution with K kernels (experts) and a learned, per-pixel choice between them."""
from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError
from dlas.models.switched.routed import all_experts_conv, output_size, routed_conv

IntPair = Union[int, tuple[int, int]]
# The smallest relative usage the balancing divides by: an expert nobody picked is boosted 1000x, not infinitely.
MIN_RELATIVE_USAGE = 1e-3


def _pair(value: IntPair, option: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ConfigError(f"expected an integer or a pair of integers, got {value!r}", option)
    return pair


class SwitchedConv(nn.Module):
    """A 2-D convolution with ``num_experts`` kernels; at every output pixel a selector picks which one applies.

    Parameters grow ``num_experts``-fold; in ``hard`` mode the compute stays that of one convolution (plus the
    selector, a 1x1 convolution by default), because each output pixel is computed by its own expert only.

    Arguments (those shared with ``nn.Conv2d`` mean the same; ``groups`` is not supported):
      num_experts: K, the number of kernels.
      padding: pixels added on each side; ``None`` gives ``dilation * (kernel_size // 2)`` ("same" for odd kernels
        at stride 1). ``padding_mode``: ``zeros``, ``reflect``, ``replicate`` or ``circular``, as in Conv2d.
      mode: ``hard`` applies only the top-1 expert per pixel (the selector learns through the gradient of the
        winner's probability, see ``route_gradient``); ``soft`` mixes all experts' outputs by their
        probabilities (K times the compute: every expert runs everywhere).
      selector: a module mapping the selector input ``[N, selector_channels, H, W]`` to logits ``[N, K, h, w]``;
        ``None`` builds a 1x1 convolution, or with ``selector_hidden > 0`` a 3x3 convolution to that many
        channels, SiLU, and a 1x1 convolution. Logits of another size than the output are resized (nearest).
      selector_channels: channels of the selector's input: the layer's input (default, ``in_channels``) or a
        guide tensor passed as ``forward(x, guide)``.
      temperature: the softmax temperature (a buffer, saved with the weights; a network's ``set_step`` anneals it).
      usage_history: length of the rolling record of per-expert usage that balances the experts (0: off). The
        probabilities are divided by each expert's mean relative usage over the record and renormalised, so an
        over-used expert wins less often. The record starts neutral and is updated once per iteration by
        :func:`dlas.models.switched.advance_switches` (the network's ``set_step``), averaged over ranks under DDP.
      dropout: during training, each expert is dropped for a whole sample with this probability (its logit set
        to -inf); the expert with the largest draw always stays, so every sample keeps at least one.
      route_gradient: how the selector learns in ``hard`` mode. ``log_prob`` (the original work's RouteTop1): the
        output is the winner's conv times ``p / stop_gradient(p)``, value 1, so the selector receives
        ``<grad, output> * d log p_winner``; ``straight_through``: times ``1 + p - stop_gradient(p)``, the same
        gradient scaled by ``p_winner``, which shrinks to nothing when K is large and the softmax flat.
      implementation: ``fast`` (hard mode: the per-expert grouped matmuls of
        :func:`~dlas.models.switched.routed.routed_conv`) or ``reference`` (all experts, then selected; for
        testing and benchmarking).

    After a training forward, ``balance_loss`` holds the auxiliary load-balancing term of this forward,
    ``K * sum_k f_k * P_k`` (``f_k``: the fraction of pixels routed to expert k, ``P_k``: its mean probability),
    1 when the routing is uniform and up to K when it collapses onto one expert (Switch Transformer's loss).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, num_experts: int,
                 stride: IntPair = 1, padding: Optional[IntPair] = None, dilation: IntPair = 1, bias: bool = True,
                 mode: Literal["hard", "soft"] = "hard",
                 padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
                 selector: Optional[nn.Module] = None, selector_channels: Optional[int] = None,
                 selector_hidden: int = 0, temperature: float = 1.0, usage_history: int = 128, dropout: float = 0.0,
                 route_gradient: Literal["log_prob", "straight_through"] = "log_prob",
                 implementation: Literal["fast", "reference"] = "fast"):
        super().__init__()
        if num_experts < 1:
            raise ConfigError(f"must be at least 1, got {num_experts}", "num_experts")
        if mode not in ("hard", "soft"):
            raise ConfigError(f"must be 'hard' or 'soft', got {mode!r}", "mode")
        if route_gradient not in ("log_prob", "straight_through"):
            raise ConfigError(f"must be 'log_prob' or 'straight_through', got {route_gradient!r}", "route_gradient")
        if implementation not in ("fast", "reference"):
            raise ConfigError(f"must be 'fast' or 'reference', got {implementation!r}", "implementation")
        if not 0 <= dropout < 1:
            raise ConfigError(f"must be in [0, 1), got {dropout}", "dropout")
        if usage_history < 0:
            raise ConfigError(f"must be >= 0 (0: no balancing), got {usage_history}", "usage_history")
        if selector_hidden < 0:
            raise ConfigError(f"must be >= 0, got {selector_hidden}", "selector_hidden")
        self.in_channels, self.out_channels, self.num_experts = in_channels, out_channels, num_experts
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if padding is None:
            padding = tuple(d * (k // 2) for d, k in zip(self.dilation, self.kernel_size))
        self.padding = _pair(padding, "padding")
        self.padding_mode = padding_mode
        self.mode, self.route_gradient, self.implementation = mode, route_gradient, implementation
        self.dropout = dropout

        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        self.reset_parameters()
        selector_channels = selector_channels or in_channels
        if selector is None:
            selector = nn.Conv2d(selector_channels, num_experts, 1) if selector_hidden == 0 else nn.Sequential(
                nn.Conv2d(selector_channels, selector_hidden, 3, padding=1), nn.SiLU(),
                nn.Conv2d(selector_hidden, num_experts, 1))
        self.selector = selector

        self.register_buffer("temperature", torch.tensor(float(temperature)))
        # relative usage (mean 1) of the last `usage_history` iterations; ones are neutral, so balancing blends in
        self.register_buffer("usage_record", torch.ones(usage_history, num_experts))
        self.register_buffer("usage_slot", torch.zeros((), dtype=torch.long))
        # this iteration's relative usage, summed over its training forwards (committed by advance_switches)
        self.register_buffer("usage_pending", torch.zeros(num_experts))
        self.register_buffer("usage_pending_count", torch.zeros(()))
        # for debug_info: pixels routed to each expert since the last look, and the first sample's last map
        self.register_buffer("routed_pixels", torch.zeros(num_experts), persistent=False)
        self.last_map: Optional[torch.Tensor] = None
        self.balance_loss: Optional[torch.Tensor] = None

    def reset_parameters(self) -> None:
        """Each expert initialised independently, as ``nn.Conv2d`` initialises its one kernel."""
        for expert in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight.data[expert], a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel() // self.out_channels
            bound = 1 / math.sqrt(fan_in) if fan_in else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_experts: int, mode: Literal["hard", "soft"] = "hard",
                  **options) -> "SwitchedConv":
        """A switched conv whose every expert is a copy of the trained ``conv``: its output equals ``conv``'s.

        ``options`` are the other constructor arguments (selector, usage_history, dropout, ...). The selector starts
        from its usual random initialisation, so pixels are routed at random between identical experts, which
        then diverge as each learns from the pixels it gets.
        """
        if conv.groups != 1:
            raise ValueError(f"SwitchedConv does not support grouped convolutions (groups={conv.groups})")
        if isinstance(conv.padding, str):
            raise ValueError(f"SwitchedConv needs numeric padding, not {conv.padding!r}")
        switched = cls(conv.in_channels, conv.out_channels, conv.kernel_size, num_experts, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None, mode=mode,
                       padding_mode=conv.padding_mode, **options)
        switched.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            switched.weight.copy_(conv.weight.unsqueeze(0).expand_as(switched.weight))
            if conv.bias is not None:
                switched.bias.copy_(conv.bias.unsqueeze(0).expand_as(switched.bias))
        return switched

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_experts={self.num_experts}, stride={self.stride}, padding={self.padding}, mode={self.mode}")

    # ------------------------------------------------------------------ routing
    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw) = self.padding
        if not (ph or pw):
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, (pw, pw, ph, ph), mode=mode)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-pixel expert probabilities ``[N, K, H, W]`` (float32): temperature, dropout, softmax, balancing."""
        # NCHW-contiguous: softmax over dim 1 of a channels-last tensor is 30x slower on the CPU
        logits = logits.float().contiguous() / self.temperature
        if self.training and self.dropout > 0:
            draw = torch.rand(logits.shape[0], self.num_experts, device=logits.device)
            keep = (draw >= self.dropout) | (draw == draw.max(dim=1, keepdim=True).values)
            logits = logits.masked_fill(~keep[:, :, None, None], float("-inf"))
        probs = torch.softmax(logits, dim=1)
        if self.training and torch.is_grad_enabled():
            mean = probs.detach().mean(dim=(0, 2, 3))
            self.usage_pending += mean / mean.mean()
            self.usage_pending_count += 1
        if self.usage_record.shape[0]:
            balanced = probs / self.usage_record.mean(dim=0).clamp_min(MIN_RELATIVE_USAGE).view(1, -1, 1, 1)
            probs = balanced / balanced.sum(dim=1, keepdim=True)
        return probs

    def _gate(self, probs: torch.Tensor, winner: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` ones whose gradient reaches the winner's probability (see ``route_gradient``)."""
        p = probs.gather(1, winner.unsqueeze(1))
        if self.route_gradient == "log_prob":
            return p / p.detach()
        return 1 + (p - p.detach())  # exactly 1: p - p is 0

    def forward(self, x: torch.Tensor, guide: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.balance_loss = None
        out_size = tuple(output_size(x.shape[2 + i] + 2 * self.padding[i], self.kernel_size[i], self.stride[i],
                                     self.dilation[i]) for i in range(2))
        logits = self.selector(x if guide is None else guide)
        if tuple(logits.shape[-2:]) != out_size:
            logits = F.interpolate(logits.float(), size=out_size, mode="nearest")
        probs = self.probabilities(logits)
        # and argmax over dim 1 of an NCHW tensor is 10x slower than of a channels-last copy
        winner = probs.detach().contiguous(memory_format=torch.channels_last).argmax(dim=1)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):  # the fast path does its own casting
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        gate = self._gate(probs, winner) if self.mode == "hard" and probs.requires_grad else None
        if self.mode == "hard" and self.implementation == "fast":
            # zero padding happens inside, in the same copy that makes the NHWC rows
            source, pad = (x, self.padding) if self.padding_mode == "zeros" else (self._pad(x), (0, 0))
            with torch.autocast(x.device.type, enabled=False):
                out = routed_conv(source, winner, weight, bias, self.stride, self.dilation, pad,
                                  None if gate is None else gate[:, 0])
        else:
            if self.mode == "soft":
                mix = probs
            else:
                mix = F.one_hot(winner, self.num_experts).permute(0, 3, 1, 2).to(probs.dtype)
                mix = mix if gate is None else mix * gate
            out = all_experts_conv(self._pad(x), mix, weight, bias, self.stride, self.dilation)
        if self.training:
            self._record_routing(probs, winner)
        return out

    def _record_routing(self, probs: torch.Tensor, winner: torch.Tensor) -> None:
        """Usage statistics for debug_info and the balance loss (device tensors only: no host sync)."""
        counts = torch.zeros(self.num_experts, device=winner.device).index_add_(
            0, winner.reshape(-1), torch.ones(winner.numel(), device=winner.device))
        self.routed_pixels += counts
        self.last_map = winner[0].detach()
        if torch.is_grad_enabled():
            fraction = counts / max(winner.numel(), 1)
            self.balance_loss = self.num_experts * (fraction * probs.mean(dim=(0, 2, 3))).sum()

    # ------------------------------------------------------------------ per-iteration bookkeeping
    def commit_usage(self) -> None:
        """Append this iteration's mean relative usage to the record (no-op if there was no training forward)."""
        if not self.usage_record.shape[0]:
            self.usage_pending.zero_()
            self.usage_pending_count.zero_()
            return
        used = self.usage_pending_count > 0
        entry = self.usage_pending / self.usage_pending_count.clamp_min(1)
        slot = self.usage_slot.view(1)
        current = self.usage_record.index_select(0, slot)[0]
        self.usage_record.index_copy_(0, slot, torch.where(used, entry, current).unsqueeze(0))
        self.usage_slot.copy_((self.usage_slot + used.long()) % self.usage_record.shape[0])
        self.usage_pending.zero_()
        self.usage_pending_count.zero_()

    def take_routed_pixels(self) -> torch.Tensor:
        """Pixels routed to each expert (training forwards) since the last call; resets the count."""
        counts = self.routed_pixels.clone()
        self.routed_pixels.zero_()
        return counts
