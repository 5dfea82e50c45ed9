"""The two ways to compute a switched convolution from per-pixel expert weights.

* :func:`routed_conv` (the fast hard path): every output pixel is computed by its own expert only. Pixels are
  grouped by expert (one stable sort), each group's input patches are gathered from an NHWC copy of the padded
  input (one ``index_select`` of whole channel rows per kernel tap, in chunks small enough to stay in cache) and
  multiplied by that expert's kernel (one matmul per chunk); the results are written back to their pixels. The
  work is one dense convolution's multiply-adds, plus the gathers. Backward does the same in reverse (the
  weight gradient per expert, the input gradient scattered back with ``index_add_``), recomputing the patches
  instead of keeping them, so the layer saves only its input for backward.
* :func:`all_experts_conv` (the reference): all K convolutions as one convolution with K times the output
  channels, then the per-pixel weighted sum. It is K times the work of one convolution; it is what soft routing
  needs, and the reference the fast path is tested against.

Both take the input already padded (so any ``padding_mode`` works, and its gradient is autograd's).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Patch rows gathered per matmul on the CPU: about 1 MB of float32 patches, which stays in cache between the gather
# that writes it and the matmul that reads it, yet is large enough for an efficient matmul.
CPU_CHUNK_BYTES = 2**20
# On a GPU a chunk is only bounded so that one expert's patches never take more than this much memory.
GPU_CHUNK_BYTES = 2**28


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN_LINEAR = _onednn_linear_available()
ROW_MULTIPLE = 128


def linear(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ weight.T + bias`` for contiguous ``a [m, k]`` and ``weight [n, k]``.

    On the CPU this calls oneDNN's matmul (the kernel torch.compile uses for CPU linears) where torch has it:
    for these tall, narrow products it measured 4-5x faster than the BLAS behind ``torch.mm`` on our AMD CPUs,
    which is what the dense convolution (also oneDNN) is compared against. Elsewhere it is ``F.linear``.
    """
    if weight.dtype != a.dtype:  # bf16 patches against fp32 experts (autocast): compute in the patches' dtype
        weight = weight.to(a.dtype)
        bias = bias.to(a.dtype) if bias is not None else None
    # float32 only: this op's bf16 kernel wants prepacked weights and refuses plain ones (torch 2.14 on our CPUs)
    if ONEDNN_LINEAR and a.device.type == "cpu" and a.dtype == torch.float32:
        # oneDNN compiles a kernel per shape (~10 ms each; cached): rounding the rows up to a multiple of
        # ROW_MULTIPLE keeps the number of shapes small while the experts' pixel counts change every step
        rows = a.shape[0]
        extra = -rows % ROW_MULTIPLE
        if extra:
            a = torch.cat([a, a.new_zeros(extra, a.shape[1])])
        return torch.ops.mkldnn._linear_pointwise(a, weight, bias, "none", [], "")[:rows]
    return F.linear(a, weight, bias)


def output_size(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Output length of a convolution over an already padded input of length ``size``."""
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def all_experts_conv(x: torch.Tensor, mix: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     stride: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """``sum_k mix[:, k] * conv(x, weight[k], bias[k])``: every expert everywhere, then the per-pixel mixture.

    x: the padded input ``[N, C, H, W]``; mix: ``[N, K, Ho, Wo]`` per-pixel expert weights (softmax
    probabilities, or a one-hot routing); weight ``[K, O, C, kh, kw]``; bias ``[K, O]`` or None.
    """
    experts, channels = weight.shape[:2]
    y = F.conv2d(x, weight.flatten(0, 1), None if bias is None else bias.flatten(), stride, 0, dilation)
    y = y.unflatten(1, (experts, channels))
    return torch.einsum("nkohw,nkhw->nohw", y, mix.to(y.dtype))


def group_by_expert(winner: torch.Tensor, experts: int) -> tuple[torch.Tensor, list[int]]:
    """Flat pixel indices sorted by expert (stable: in raster order within an expert) and each expert's count.

    The counts come to the host (one sync on a GPU): the matmuls' sizes depend on them.
    """
    order = torch.argsort(winner, stable=True)
    counts = torch.zeros(experts, dtype=torch.long, device=winner.device)
    counts.index_add_(0, winner, torch.ones_like(winner))
    return order, counts.tolist()


def _chunks(counts: list[int], row_bytes: int, device: torch.device):
    """``(expert, start, end)`` row ranges of the sorted pixels, one expert per range, sized for the cache."""
    budget = CPU_CHUNK_BYTES if device.type == "cpu" else GPU_CHUNK_BYTES
    rows = max(ROW_MULTIPLE, budget // max(row_bytes, 1) // ROW_MULTIPLE * ROW_MULTIPLE)
    start = 0
    for expert, count in enumerate(counts):
        for begin in range(start, start + count, rows):
            yield expert, begin, min(begin + rows, start + count)
        start += count


class _RoutedConv(torch.autograd.Function):
    """The hard-routed convolution (see the module docstring); winner gets no gradient."""

    @staticmethod
    def forward(ctx, x, winner, gate, weight, bias, stride, padding, dilation):
        n, c, height, width = x.shape
        experts, out_channels, _, kh, kw = weight.shape
        out_h, out_w = winner.shape[-2:]
        # Zero-padded NHWC rows in one copy: one pixel's channels are contiguous, so a kernel tap of a patch is one
        # row to copy.
        (ph, pw), padded_h, padded_w = padding, height + 2 * padding[0], width + 2 * padding[1]
        if ph or pw:
            rows = x.new_zeros(n, padded_h, padded_w, c)
            rows[:, ph:ph + height, pw:pw + width] = x.permute(0, 2, 3, 1)
        else:
            rows = x.permute(0, 2, 3, 1).contiguous()
        rows = rows.view(-1, c)
        order, counts = group_by_expert(winner.reshape(-1), experts)
        per_image = out_h * out_w
        image, pixel = order // per_image, order % per_image
        origins = (image * (padded_h * padded_w) + (pixel // out_w) * (stride[0] * padded_w)
                   + (pixel % out_w) * stride[1])
        taps = (torch.arange(kh, device=x.device)[:, None] * (dilation[0] * padded_w)
                + torch.arange(kw, device=x.device)[None, :] * dilation[1]).reshape(-1)
        # the rows of every sorted pixel's patch, kh * kw per pixel
        index = (origins[:, None] + taps).reshape(-1)
        kk = taps.numel()
        # [K, O, taps * C]: tap-major, channel-minor, the order the gathered patch rows come in
        kernels = weight.permute(0, 1, 3, 4, 2).reshape(experts, out_channels, -1)
        out_sorted = x.new_empty(order.numel(), out_channels)
        for expert, start, end in _chunks(counts, kernels.shape[-1] * x.element_size(), x.device):
            patches = rows.index_select(0, index[start * kk:end * kk]).view(end - start, -1)
            out_sorted[start:end] = linear(patches, kernels[expert], None if bias is None else bias[expert])
        gate_sorted = None if gate is None else gate.reshape(-1).index_select(0, order).to(out_sorted.dtype)
        scaled = out_sorted if gate is None else out_sorted * gate_sorted[:, None]
        # back to raster order with a gather (faster than scattering each chunk)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        # written through an NHWC view of a channels-last tensor: the output is not a view (in-place ops after it,
        # such as an inplace LeakyReLU, would be refused on a view made inside a custom Function)
        out = torch.empty((n, out_channels, out_h, out_w), dtype=scaled.dtype, device=scaled.device,
                          memory_format=torch.channels_last)
        torch.index_select(scaled, 0, inverse, out=out.permute(0, 2, 3, 1).view(-1, out_channels))
        ctx.save_for_backward(rows, order, index, weight, gate_sorted,
                              out_sorted if ctx.needs_input_grad[2] else None)
        ctx.counts, ctx.has_bias, ctx.geometry = counts, bias is not None, (n, c, height, width, ph, pw)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, order, index, weight, gate_sorted, out_sorted = ctx.saved_tensors
        n, c, height, width, ph, pw = ctx.geometry
        experts, out_channels, _, kh, kw = weight.shape
        need_x, _, need_gate, need_w, need_b = ctx.needs_input_grad[:5]
        kernels = weight.permute(0, 1, 3, 4, 2).reshape(experts, out_channels, -1)
        kernels_t = kernels.transpose(1, 2).contiguous() if need_x else None
        kk = kh * kw
        grad_sorted = grad_out.permute(0, 2, 3, 1).reshape(-1, out_channels).index_select(0, order)
        grad_gate = None
        if need_gate:
            grad_gate = torch.empty(order.numel(), dtype=gate_sorted.dtype, device=order.device)
            grad_gate[order] = (grad_sorted * out_sorted).sum(dim=1).to(gate_sorted.dtype)
            grad_gate = grad_gate.view(n, *grad_out.shape[-2:])
        if gate_sorted is not None:
            grad_sorted = grad_sorted * gate_sorted[:, None]
        # accumulated in float32 at least: a chunked sum in bf16 would lose the small terms
        total = torch.promote_types(rows.dtype, torch.float32)
        grad_kernels = torch.zeros(kernels.shape, dtype=total, device=rows.device) if need_w else None
        grad_rows = torch.zeros(rows.shape, dtype=total, device=rows.device) if need_x else None
        for expert, start, end in _chunks(ctx.counts, kernels.shape[-1] * rows.element_size(), rows.device):
            grad = grad_sorted[start:end]
            rows_of = index[start * kk:end * kk]
            if need_w:
                patches = rows.index_select(0, rows_of).view(end - start, -1)
                if total == rows.dtype:
                    grad_kernels[expert].addmm_(grad.t(), patches)
                else:
                    grad_kernels[expert] += torch.mm(grad.t(), patches).to(total)
            if need_x:
                grad_rows.index_add_(0, rows_of, linear(grad, kernels_t[expert]).view(-1, c).to(total))
        grad_x = grad_weight = grad_bias = None
        if need_x:
            grad_x = grad_rows.view(n, height + 2 * ph, width + 2 * pw, c)[:, ph:ph + height, pw:pw + width]
            grad_x = grad_x.permute(0, 3, 1, 2).to(rows.dtype)
        if need_w:
            grad_weight = grad_kernels.view(experts, out_channels, kh, kw, c).permute(0, 1, 4, 2, 3)
            grad_weight = grad_weight.contiguous().to(weight.dtype)
        if need_b and ctx.has_bias:
            sums = torch.zeros(experts, out_channels, dtype=total, device=rows.device)
            start = 0
            for expert, count in enumerate(ctx.counts):
                sums[expert] = grad_sorted[start:start + count].to(total).sum(0)
                start += count
            grad_bias = sums.to(weight.dtype)
        return grad_x, None, grad_gate, grad_weight, grad_bias, None, None, None


def routed_conv(x: torch.Tensor, winner: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int] = (0, 0),
                gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each output pixel ``(n, i, j)`` computed by expert ``winner[n, i, j]`` only, times ``gate[n, i, j]``.

    x: the input ``[N, C, H, W]``, zero-padded by ``padding`` here (pad it yourself for other padding modes);
    winner: ``[N, Ho, Wo]`` expert indices (long); weight ``[K, O, C, kh, kw]``; bias ``[K, O]`` or None; gate:
    ``[N, Ho, Wo]`` per-pixel factors or None (the switched conv's gate: ones that carry the selector's gradient).
    Returns ``[N, O, Ho, Wo]`` in channels-last memory (what the next switched layer gathers from without a copy).
    Equal to :func:`all_experts_conv` of the padded input with ``mix = one_hot(winner) * gate``.
    """
    return _RoutedConv.apply(x, winner, gate, weight, bias, stride, padding, dilation)
