"""Fréchet Inception Distance (Heusel et al. 2017): distance between Gaussian fits of Inception features.

Feature network: torchvision's ``inception_v3`` with its ImageNet weights ``inception_v3_google-0cc3c7bd.pth``
(2048-d pool features, images resized to 299x299 bilinearly and scaled to [-1, 1]). This is *not* the
TF-graph Inception of pytorch-fid / torch-fidelity, so numbers are comparable between runs of this project but
typically differ from published FIDs by a few points; compare models only with the same feature network.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from dlas.errors import DataError
from dlas.weights import pretrained_weights_file

INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
Images = Iterable[torch.Tensor]  # NCHW RGB batches in [0, 1]


class InceptionFeatures(torch.nn.Module):
    """torchvision InceptionV3 up to its 2048-d average pool; input NCHW RGB in [0, 1] of any size.

    ``weights_path``: the ImageNet weights file (default: torchvision's cache
    ``$TORCH_HOME/hub/checkpoints/inception_v3_google-0cc3c7bd.pth``). Nothing is ever downloaded.
    """

    def __init__(self, weights_path: Optional[Union[str, Path]] = None):
        super().__init__()
        from torchvision.models import inception_v3  # torchvision is only needed when FID is used

        file = pretrained_weights_file(INCEPTION_FILE, INCEPTION_URL, "FID (InceptionV3 ImageNet weights)",
                                       weights_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            net.fc = torch.nn.Identity()
            net.load_state_dict(state)
        except Exception as exc:
            raise DataError(f"not torchvision InceptionV3 weights ({str(exc).splitlines()[0]})", str(file)) from exc
        self.net = net.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x * 2 - 1)


@torch.no_grad()
def feature_statistics(
    images: Images, extractor: torch.nn.Module, device: Union[str, torch.device] = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) in float64 of ``extractor``'s features over all image batches."""
    extractor = extractor.to(device).eval()
    features = [extractor(batch.to(device)).flatten(1).double().cpu() for batch in images]
    if not features:
        raise DataError("no images to compute FID statistics from", "images")
    stacked = torch.cat(features).numpy()
    if len(stacked) < 2:
        raise DataError(f"FID needs at least 2 images, got {len(stacked)}", "images")
    return stacked.mean(axis=0), np.cov(stacked, rowvar=False)


def load_statistics(file: Union[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu, sigma)`` from a ``.npz`` with arrays ``mu`` and ``sigma`` (the pytorch-fid layout too)."""
    try:
        with np.load(file) as data:
            return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"not FID statistics (need arrays 'mu' and 'sigma'): {exc}; delete it to recompute",
                        str(file)) from exc


def reference_statistics(
    cache_file: Union[str, Path],
    images: Images,
    extractor: torch.nn.Module,
    device: Union[str, torch.device] = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of the reference images, computed once and cached in ``cache_file`` (``.npz``).

    A cache made with another feature network is silently wrong: delete it when changing networks.
    """
    cache_file = Path(cache_file)
    if cache_file.is_file():
        return load_statistics(cache_file)
    mu, sigma = feature_statistics(images, extractor, device)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache_file, mu=mu, sigma=sigma)
    return mu, sigma


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues → 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))``.

    ``Tr((s1 s2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix ``s1^(1/2) s2 s1^(1/2)`` (same spectrum as ``s1 s2``), in float64: no complex parts and no
    failure on the singular covariances that fewer images than feature dimensions produce.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid(
    generated: Images,
    reference: Union[Images, str, Path],
    extractor: Optional[torch.nn.Module] = None,
    weights_path: Optional[Union[str, Path]] = None,
    reference_cache: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
) -> float:
    """FID between generated and reference images (NCHW batches in [0, 1]); lower is better, 0 = same statistics.

    ``reference``: image batches, or a ``.npz`` of precomputed ``mu``/``sigma``. ``reference_cache``: where to
    cache the reference statistics (reused when it exists). ``extractor``: the feature network (default
    :class:`InceptionFeatures` from ``weights_path``). FID is biased upwards with few images: compare runs
    only at the same image count (10k-50k is customary; below ~2k the covariance is rank-deficient).
    """
    extractor = extractor if extractor is not None else InceptionFeatures(weights_path)
    if isinstance(reference, (str, Path)):
        ref_mu, ref_sigma = load_statistics(reference)
    elif reference_cache is not None:
        ref_mu, ref_sigma = reference_statistics(reference_cache, reference, extractor, device)
    else:
        ref_mu, ref_sigma = feature_statistics(reference, extractor, device)
    mu, sigma = feature_statistics(generated, extractor, device)
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)
