"""Every random generator a training step may draw from, saved with each checkpoint and restored on resume."""
from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as plain lists and numbers.

    Plain values load under ``torch.load(weights_only=True)`` and travel through ``all_gather_object`` (which
    cannot unpickle tensors), so one format serves checkpoints and DDP alike.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def check_rng_state(state: Any) -> None:
    """Raise (any exception) when :func:`set_rng_state` could not use ``state``; changes no generator."""
    version, internal, gauss = state["python"]
    random.Random().setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.Generator().set_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and not all(isinstance(s, list) for s in state["cuda"]):
        raise TypeError("the CUDA generator states are not lists of bytes")
