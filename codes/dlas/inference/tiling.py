"""Tiled inference: run an image-to-image network on overlapping tiles and blend them seamlessly."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from dlas.errors import ConfigError

Forward = Callable[[torch.Tensor], torch.Tensor]


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread tile origins covering [0, size) with neighbours overlapping by at least ``overlap``."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _axis_weights(start: int, length: int, size: int, blank: int, ramp: int) -> torch.Tensor:
    """Blend weights along one axis of one tile (output pixels): 1 inside, 0 then a cosine rise near an edge
    shared with a neighbour, untouched at the image border where no neighbour exists."""
    weights = torch.ones(length)
    rise = None
    if ramp:
        rise = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp).float()
    if start > 0:
        weights[:blank] = 0
        if ramp:
            weights[blank : blank + ramp] = rise
    if start + length < size:
        weights[length - blank :] = 0
        if ramp:
            weights[length - blank - ramp : length - blank] = rise.flip(0)
    return weights


def tiled_forward(net: Forward, lq: torch.Tensor, scale: int, tile: int, overlap: int) -> torch.Tensor:
    """Run ``net`` on overlapping ``tile`` x ``tile`` crops of the NCHW batch ``lq`` and blend them seamlessly.

    Neighbouring tiles overlap by at least ``overlap`` input pixels. In each overlap the first quarter next to
    a tile's edge gets weight 0 (those outputs saw the zero padding at the tile edge), the middle half a
    cosine cross-fade, normalised so weights sum to 1: for a network whose receptive-field radius is at most
    ``overlap // 4`` input pixels the result equals untiled inference up to float rounding; beyond that the
    cross-fade hides the seams. Memory is bounded by one tile's activations plus the full output.
    ``scale`` is the output/input size ratio. A tile as large as the image runs the network once.
    """
    if lq.dim() != 4:
        raise ValueError(f"tiled_forward expects an NCHW batch, got shape {tuple(lq.shape)}")
    check_tiling(tile, overlap)
    height, width = lq.shape[-2:]
    if height <= tile and width <= tile:
        return net(lq)
    blank = (overlap // 4) * scale
    ramp = overlap * scale - 2 * blank
    out: Optional[torch.Tensor] = None
    total = torch.zeros(1, 1, height * scale, width * scale, dtype=torch.float32, device=lq.device)
    for y in _tile_starts(height, tile, overlap):
        for x in _tile_starts(width, tile, overlap):
            h, w = min(tile, height), min(tile, width)
            result = net(lq[..., y : y + h, x : x + w])
            if result.shape[-2:] != (h * scale, w * scale):
                raise ValueError(f"network output {tuple(result.shape[-2:])} is not {scale}x its input {(h, w)}")
            if out is None:
                out = torch.zeros(*result.shape[:2], height * scale, width * scale, dtype=torch.float32,
                                  device=lq.device)
            wy = _axis_weights(y * scale, h * scale, height * scale, blank, ramp).to(lq.device)
            wx = _axis_weights(x * scale, w * scale, width * scale, blank, ramp).to(lq.device)
            weight = wy[:, None] * wx[None, :]
            region = (..., slice(y * scale, (y + h) * scale), slice(x * scale, (x + w) * scale))
            out[region] += result.float() * weight
            total[region] += weight
    return (out / total).to(lq.dtype)


def infer_scale(net: Forward, lq: torch.Tensor, tile: Optional[int] = None) -> int:
    """The network's upscaling factor, measured on a corner crop of ``lq`` (at most ``tile`` pixels a side)."""
    probe = lq[..., : tile or lq.shape[-2], : tile or lq.shape[-1]]
    out = net(probe)
    scale = out.shape[-1] // probe.shape[-1]
    if scale < 1 or out.shape[-1] != scale * probe.shape[-1] or out.shape[-2] != scale * probe.shape[-2]:
        raise ValueError(f"network output {tuple(out.shape[-2:])} is not an integer multiple of its input "
                         f"{tuple(probe.shape[-2:])}")
    return scale


def run_network(net: Forward, lq: torch.Tensor, scale: int, tile: Optional[int] = None,
                overlap: int = 16) -> torch.Tensor:
    """``net(lq)``, tiled when ``tile`` is set and the image is larger than one tile."""
    if tile:
        return tiled_forward(net, lq, scale, tile, overlap)
    return net(lq)




def check_tiling(tile: Optional[int], overlap: int, tile_option: str = "tile",
                 overlap_option: str = "tile_overlap") -> None:
    """A ConfigError for a tile size / overlap pair that cannot work (``tile`` None: no tiling)."""
    if tile is None:
        return
    if isinstance(tile, bool) or tile < 1:
        raise ConfigError(f"must be at least 1 (LQ pixels per tile side) or null for no tiling, got {tile}",
                          tile_option)
    if not 0 <= overlap <= tile // 2:
        raise ConfigError(f"must be between 0 and half the tile size ({tile // 2} for tile {tile}), got {overlap}",
                          overlap_option)
