"""Structural similarity (Wang et al. 2004) as the MATLAB reference and BasicSR compute it."""
from __future__ import annotations

import numpy as np

from dlas.metrics.convention import prepare_pair

WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def gaussian_kernel_1d(size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian taps (the same values as ``cv2.getGaussianKernel(size, sigma)``)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-(offsets**2) / (2 * sigma**2))
    return taps / taps.sum()


def _filter_valid(channel: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation of an HxW array with ``taps``, keeping only fully covered pixels."""
    k = len(taps)
    rows = sum(taps[i] * channel[i : channel.shape[0] - k + 1 + i, :] for i in range(k))
    return sum(taps[i] * rows[:, i : rows.shape[1] - k + 1 + i] for i in range(k))


def _ssim_channel(x: np.ndarray, y: np.ndarray, taps: np.ndarray) -> float:
    mu_x, mu_y = _filter_valid(x, taps), _filter_valid(y, taps)
    var_x = _filter_valid(x * x, taps) - mu_x**2
    var_y = _filter_valid(y * y, taps) - mu_y**2
    cov = _filter_valid(x * y, taps) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + _C1) * (2 * cov + _C2)) / ((mu_x**2 + mu_y**2 + _C1) * (var_x + var_y + _C2))
    return float(ssim_map.mean())


def ssim(a: np.ndarray, b: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """SSIM between two HWC RGB images in [0, 255] (uint8 or float), in float64.

    11x11 Gaussian window with sigma 1.5, constants C1 = (0.01*255)^2 and C2 = (0.03*255)^2, only the
    "valid" region where the window fits (5 pixels lost per edge), one SSIM per channel averaged for RGB.
    ``crop_border`` and ``y_channel`` as in :func:`dlas.metrics.psnr`. Identical images give 1.0.
    Note: SRFlow's tables use skimage's 7x7 uniform window instead, which gives different numbers.
    """
    a64, b64 = prepare_pair(a, b, crop_border, y_channel)
    if min(a64.shape[0], a64.shape[1]) < WINDOW_SIZE:
        raise ValueError(
            f"SSIM needs images of at least {WINDOW_SIZE}x{WINDOW_SIZE} after cropping, got {a64.shape[:2]}"
        )
    taps = gaussian_kernel_1d()
    return float(np.mean([_ssim_channel(a64[..., c], b64[..., c], taps) for c in range(a64.shape[2])]))
