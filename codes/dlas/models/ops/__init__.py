"""Building blocks the networks share: flow warping and normalization / initialisation helpers."""
from dlas.models.ops.flow_warp import flow_warp, resize_flow

__all__ = ["flow_warp", "resize_flow"]
