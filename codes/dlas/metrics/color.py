"""Colour conversions used by the evaluation conventions of published SR tables."""
from __future__ import annotations

import numpy as np

# ITU-R BT.601 "studio swing" luma as MATLAB's rgb2ycbcr computes it, on RGB in [0, 255]:
# Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, so Y lies in [16, 235].
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """MATLAB BT.601 luma of an HWC **RGB** image in [0, 255]; returns an HW×1 float32 array in [16, 235].

    The arithmetic follows BasicSR's ``to_y_channel`` step by step (scale to [0, 1] in float32, weighted
    sum in float64, divide by 255 and round to float32, scale back to [0, 255] in float32, never quantised),
    because published Y-channel tables were made that way and the float32 roundings move PSNR by ~1e-6 dB.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"rgb_to_y expects an HxWx3 RGB image, got shape {tuple(image.shape)}")
    unit = image.astype(np.float32) / np.float32(255.0)
    luma = np.dot(unit, np.array(_Y_WEIGHTS, dtype=np.float64)) + 16.0
    luma = (luma / 255.0).astype(np.float32)
    return (luma * np.float32(255.0))[..., None]
