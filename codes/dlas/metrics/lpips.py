"""LPIPS perceptual distance (Zhang et al. 2018) through the ``lpips`` package, without any download.

The ``lpips`` package ships only its small linear calibration layers; the backbone (AlexNet or VGG16
ImageNet features) normally comes from torchvision's download. Here the backbone is built empty and its
weights are read from a local file: ``weights_path`` when given, else torchvision's cache
``$TORCH_HOME/hub/checkpoints/<file>`` (``~/.cache/torch/hub/checkpoints`` by default).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch

from dlas.errors import DataError
from dlas.metrics.convention import as_hwc
from dlas.weights import pretrained_weights_file

# torchvision's ImageNet weights for each LPIPS backbone: file name in the hub cache and where to get it.
BACKBONE_WEIGHTS = {
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}

LpipsNet = Literal["alex", "vgg"]


def backbone_weights_file(net: str = "alex", weights_path: Optional[Union[str, Path]] = None) -> Path:
    """The file holding the ImageNet backbone weights of LPIPS ``net``; a :class:`DataError` when absent."""
    if net not in BACKBONE_WEIGHTS:
        raise ValueError(f"LPIPS net must be one of {sorted(BACKBONE_WEIGHTS)}, got {net!r}")
    name, url = BACKBONE_WEIGHTS[net]
    return pretrained_weights_file(name, url, f"LPIPS ({net}, torchvision ImageNet backbone)", weights_path)


class LPIPSMetric:
    """A ready LPIPS model; call it on pairs of HWC RGB images in [0, 255] to get distances (lower = closer).

    ``net``: ``"alex"`` (the package default, used by SRFlow and SPSR tables) or ``"vgg"`` (BasicSR's
    script). Always report which one: the two are not comparable. Build it once and reuse it; building
    loads ~10 MB (alex) or ~60 MB (vgg) of backbone weights.
    """

    def __init__(
        self,
        net: LpipsNet = "alex",
        weights_path: Optional[Union[str, Path]] = None,
        device: Union[str, torch.device] = "cpu",
    ):
        import lpips as lpips_package  # imported here: it imports torchvision, which `import dlas` avoids

        file = backbone_weights_file(net, weights_path)
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips_package.LPIPS(net=net, pnet_rand=True, verbose=False)
        _load_backbone(self.model.net, file)
        self.net = net
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def distance_tensors(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS of two NCHW RGB batches in [0, 1]; returns a tensor of shape (N,)."""
        x = x.to(self.device, torch.float32) * 2 - 1
        y = y.to(self.device, torch.float32) * 2 - 1
        return self.model(x, y).flatten()

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        """LPIPS between two HWC RGB images in [0, 255] (uint8 or float) of the same shape."""
        a, b = as_hwc(a, "a"), as_hwc(b, "b")
        if a.shape != b.shape:
            raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
        to_tensor = lambda im: torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[
            None]
        return float(self.distance_tensors(to_tensor(a), to_tensor(b))[0])


def _load_backbone(backbone: torch.nn.Module, file: Path) -> None:
    """Copy torchvision ``features.I.*`` weights into lpips' ``sliceK.I.*`` modules (same layer index I)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated download or another format: say which file
        raise DataError(f"cannot read backbone weights ({exc}); download the file again", str(file)) from exc
    if not isinstance(state, dict):
        raise DataError("not a state dict of torchvision ImageNet weights", str(file))
    mapped = {}
    for key in backbone.state_dict():
        source = "features." + re.sub(r"^slice\d+\.", "", key)
        if source not in state:
            raise DataError(f"not torchvision {type(backbone).__name__} weights: '{source}' is missing", str(file))
        mapped[key] = state[source]
    try:
        backbone.load_state_dict(mapped)
    except RuntimeError as exc:
        raise DataError(f"backbone weights do not fit: {str(exc).splitlines()[0]}", str(file)) from exc


def lpips(
    a: np.ndarray,
    b: np.ndarray,
    net: LpipsNet = "alex",
    weights_path: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
) -> float:
    """LPIPS between two HWC RGB images in [0, 255]; builds the model each call (use :class:`LPIPSMetric` for many)."""
    return LPIPSMetric(net, weights_path, device)(a, b)
