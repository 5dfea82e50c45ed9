"""The pre-processing every full-reference metric shares: shape checks, border crop, optional Y channel."""
from __future__ import annotations

import numpy as np
import torch

from dlas.metrics.color import rgb_to_y


def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """A CHW (or 1xCxHxW) RGB tensor in [0, 1] as an HWC uint8 array, rounded exactly as a saved PNG is."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
        image = image[0]
    quantised = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return quantised.permute(1, 2, 0).cpu().numpy()


def as_hwc(image: np.ndarray, name: str) -> np.ndarray:
    """Return ``image`` as an HxWxC numpy array (an HxW grey image gets C = 1)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy HWC image in [0, 255], got {type(image).__name__}; "
            "convert tensors with dlas.metrics.tensor_to_uint8"
        )
    if image.ndim == 2:
        return image[..., None]
    if image.ndim != 3:
        raise ValueError(f"{name} must be HxW or HxWxC, got shape {image.shape}")
    return image


def prepare_pair(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Apply the BasicSR evaluation convention to a pair of RGB images; return float64 HxWxC arrays.

    ``crop_border`` pixels are removed from each of the four edges (published x4 tables use 4), then, when
    ``y_channel`` is set, each 3-channel image is reduced to its MATLAB BT.601 luma (a 1-channel image is used
    as it is, as BasicSR does; any other channel count is a ValueError).
    """
    a, b = as_hwc(a, "a"), as_hwc(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if y_channel and a.shape[2] not in (1, 3):  # else a CHW array or RGBA would be scored per channel, not on Y
        raise ValueError(f"y_channel needs HxWx3 RGB (or HxW grey) images, got shape {a.shape}; convert CHW "
                         "tensors with dlas.metrics.tensor_to_uint8 and drop alpha first")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        if 2 * crop_border >= min(a.shape[0], a.shape[1]):
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {a.shape[0]}x{a.shape[1]} image")
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel and a.shape[2] == 3:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return a.astype(np.float64), b.astype(np.float64)
