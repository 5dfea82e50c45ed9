"""Peak signal-to-noise ratio with BasicSR's conventions."""
from __future__ import annotations

import math

import numpy as np

from dlas.metrics.convention import prepare_pair


def psnr(a: np.ndarray, b: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """PSNR in dB between two HWC RGB images in [0, 255] (uint8 or float), peak 255, computed in float64.

    ``crop_border``: pixels dropped from each edge first (use the scale, e.g. 4 for x4, to match papers).
    ``y_channel``: compare MATLAB BT.601 luma instead of RGB; Y numbers run ~2 dB above RGB ones on Set5,
    so never compare the two. Identical images give ``inf``.
    """
    a64, b64 = prepare_pair(a, b, crop_border, y_channel)
    mse = float(np.mean((a64 - b64) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0 * 255.0 / mse)
