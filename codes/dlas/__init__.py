"""DLAS: a YAML-config-driven PyTorch trainer for generative image models."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_network_weights(net: Any, path: str, strict: bool = True) -> Any:
    """Load weights from ``path`` (this project's safetensors, BasicSR or ESRGAN release formats) into ``net``.

    Imported lazily so that ``import dlas`` does not import torch.
    """
    from dlas.weights import load_network_weights as _load

    return _load(net, path, strict=strict)
