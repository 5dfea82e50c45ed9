"""Backward warping of images by dense optical flow, and resizing of flow fields.

The coordinate conventions live here once: a flow is in pixels, ``flow[:, 0]`` moves along the width (x) and
``flow[:, 1]`` along the height (y), and ``output[p] = image[p + flow[p]]`` with ``p`` the pixel's integer index
(its centre). ``grid_sample`` is called with ``align_corners=False``, whose normalised coordinates -1 and 1 are
the outer edges of the border pixels, so pixel centre ``i`` of ``size`` sits at ``(2i + 1) / size - 1``; that
holds for every size including 1. (The original DLAS helper normalised for ``align_corners=True`` but called
``grid_sample`` without it, so a zero flow shifted and blurred the image by up to half a pixel.)
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F

WarpMode = Literal["bilinear", "nearest", "bicubic"]
WarpPadding = Literal["zeros", "border", "reflection"]


def flow_warp(image: torch.Tensor, flow: torch.Tensor, mode: WarpMode = "bilinear",
              padding: WarpPadding = "zeros") -> torch.Tensor:
    """Sample ``image`` (N, C, H, W) at ``p + flow[p]`` for every pixel ``p``; differentiable in both.

    ``flow`` is (N, 2, H, W) in pixels: channel 0 the x (width) displacement, channel 1 the y (height) one, so a
    flow of ``+1`` in channel 0 makes each output pixel the input pixel to its right (the content moves left).
    Either batch may be 1 and is then broadcast against the other (one image warped by N flows, or N images
    by one flow).

    ``mode``: ``bilinear``, ``nearest`` (no gradient reaches the flow) or ``bicubic``. ``padding`` says what is
    read outside the image: ``zeros``; ``border`` (the nearest edge pixel); ``reflection`` (mirrored at the
    image's outer edge, so one pixel beyond the left edge reads pixel 0, two pixels beyond reads pixel 1).

    Sampling runs in float32 (float64 stays float64) and the result is cast back to the image's dtype: a
    bf16 sampling grid has 8 significant bits, which at 512 pixels puts samples up to two pixels off. In float32
    the position is exact to about ``1.2e-7 * size`` pixels, the resolution of ``grid_sample``'s normalised
    coordinates.
    """
    _check_shapes(image, flow)
    n, _, height, width = image.shape
    batch = max(n, flow.shape[0])
    dtype = torch.promote_types(torch.promote_types(image.dtype, flow.dtype), torch.float32)
    flow = flow.to(dtype)
    # The normalised pixel centres per axis; the 2-D grid is never built: adding the flow broadcasts them.
    xs = torch.linspace(1 / width - 1, 1 - 1 / width, width, device=flow.device, dtype=dtype)
    ys = torch.linspace(1 / height - 1, 1 - 1 / height, height, device=flow.device, dtype=dtype)
    grid = torch.stack((torch.add(xs, flow[:, 0], alpha=2 / width),
                        torch.add(ys[:, None], flow[:, 1], alpha=2 / height)), dim=-1)
    source = image.to(dtype)
    if source.shape[0] != batch:
        source = source.expand(batch, -1, -1, -1)
    if grid.shape[0] != batch:
        grid = grid.expand(batch, -1, -1, -1)
    device_type = image.device.type
    autocast = torch.is_autocast_enabled(device_type) if device_type in ("cuda", "cpu") else False
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        out = F.grid_sample(source, grid, mode=mode, padding_mode=padding, align_corners=False)
    return out.to(image.dtype)


def resize_flow(flow: torch.Tensor, size: int | tuple[int, int] | None = None,
                scale_factor: float | None = None, mode: Literal["bilinear", "nearest", "bicubic", "area"]
                = "bilinear") -> torch.Tensor:
    """Resize a flow field (N, 2, H, W) to ``size`` (an int or ``(height, width)``) or by ``scale_factor``.

    The vectors are rescaled with the field: x displacements by ``new_width / width``, y displacements by
    ``new_height / height`` (the ratios of the sizes actually produced), so a flow estimated at low resolution
    warps the high-resolution image to the same places. Resampling uses ``align_corners=False``, the convention
    :func:`flow_warp` uses, under which a size ratio is exactly the ratio of pixel distances.
    """
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"resize_flow: the flow must be (N, 2, H, W), got {tuple(flow.shape)}")
    if (size is None) == (scale_factor is None):
        raise ValueError("resize_flow: give exactly one of size and scale_factor")
    height, width = flow.shape[-2:]
    if size is not None:
        new_height, new_width = (size, size) if isinstance(size, int) else size
    else:
        new_height, new_width = int(height * scale_factor), int(width * scale_factor)
    if min(new_height, new_width) < 1:
        raise ValueError(f"resize_flow: the new size {(new_height, new_width)} is empty")
    options = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    resized = F.interpolate(flow, size=(new_height, new_width), mode=mode, **options)
    ratios = torch.tensor([new_width / width, new_height / height], device=flow.device, dtype=flow.dtype)
    return resized * ratios.view(1, 2, 1, 1)


def _check_shapes(image: torch.Tensor, flow: torch.Tensor) -> None:
    if image.dim() != 4:
        raise ValueError(f"flow_warp: the image must be (N, C, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point() or not flow.is_floating_point():
        raise ValueError(f"flow_warp: image and flow must be floating point, got {image.dtype} and {flow.dtype}")
    n, _, height, width = image.shape
    if (flow.dim() != 4 or flow.shape[1] != 2 or tuple(flow.shape[2:]) != (height, width)
            or (flow.shape[0] != n and 1 not in (n, flow.shape[0]))):
        raise ValueError(f"flow_warp: a flow for an image of shape {tuple(image.shape)} must be "
                         f"({n}, 2, {height}, {width}) (x then y displacement, in pixels), got {tuple(flow.shape)}")
