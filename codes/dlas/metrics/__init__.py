"""Image quality metrics: PSNR and SSIM (BasicSR conventions), LPIPS and FID (local weights only).

``psnr``/``ssim`` take HWC **RGB** numpy images in [0, 255]; ``tensor_to_uint8`` turns a
CHW [0, 1] tensor into one, quantised exactly like a saved PNG.
"""
from dlas.metrics.color import rgb_to_y
from dlas.metrics.convention import tensor_to_uint8
from dlas.metrics.fid import InceptionFeatures, feature_statistics, fid, frechet_distance, reference_statistics
from dlas.metrics.lpips import LPIPSMetric, lpips
from dlas.metrics.psnr import psnr
from dlas.metrics.scoring import ImageScorer
from dlas.metrics.ssim import ssim

__all__ = [
    "psnr",
    "ssim",
    "lpips",
    "LPIPSMetric",
    "fid",
    "frechet_distance",
    "feature_statistics",
    "reference_statistics",
    "InceptionFeatures",
    "rgb_to_y",
    "tensor_to_uint8",
    "ImageScorer",
]
