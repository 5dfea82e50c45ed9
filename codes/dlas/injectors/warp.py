"""Optical-flow warping of state images."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dlas.context import Context
from dlas.injectors.base import Injector
from dlas.models.ops.flow_warp import WarpMode, WarpPadding, flow_warp, resize_flow
from dlas.registry import INJECTORS


@INJECTORS.register("flow_warp")
class FlowWarpInjector(Injector):
    """Warps an image by a dense flow field: ``out[p] = in[p + flow[p]]`` (``dlas.models.ops.flow_warp``).

    Gradients reach both the image and the flow, so a flow-predicting network trains through a loss on the
    warped image (e.g. an L1 between ``out`` and the next video frame).

    Options:
      in: the image key, (N, C, H, W).
      flow: the flow key, (N, 2, H, W) in pixels: channel 0 the x (width) displacement, channel 1 the y one.
        A positive x flow reads from the right, so the content moves left. Either batch may be 1 (broadcast).
      out: the key written (the image's dtype).
      mode: ``bilinear``, ``nearest`` (no gradient reaches the flow) or ``bicubic``.
      padding: what is read outside the image: ``zeros``, ``border`` (edge pixels) or ``reflection``.
      resize_flow: a flow of another size than the image (estimated at low resolution) is resized to the
        image with its vectors rescaled (``resize_flow``, bilinear). Off: a size mismatch is an error naming
        both shapes.
    """

    def __init__(self, in_: str, flow: str, out: str, mode: WarpMode = "bilinear", padding: WarpPadding = "zeros",
                 resize_flow: bool = False):
        super().__init__(reads=[in_, flow], writes=[out])
        self.in_, self.flow, self.out = in_, flow, out
        self.mode, self.padding, self.resize_flow = mode, padding, resize_flow

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        image, flow = state[self.in_], state[self.flow]
        if self.resize_flow and flow.dim() == 4 and tuple(flow.shape[-2:]) != tuple(image.shape[-2:]):
            flow = resize_flow(flow, size=tuple(image.shape[-2:]))
        return {self.out: flow_warp(image, flow, self.mode, self.padding)}
