"""Geometric augmentations shared by the image datasets: aligned random crops, flips, 90° rotations.

All randomness comes from the item's generator (see :mod:`dlas.data.base`). Arrays are HWC numpy images.
"""
from __future__ import annotations

import numpy as np
import torch


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` crop at a uniformly random position (the image must be at least that large)."""
    height, width = image.shape[:2]
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return image[top:top + size, left:left + size]


def paired_random_crop(lq: np.ndarray, hq: np.ndarray, lq_size: int, scale: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crops: ``lq_size`` on the LQ image and the same area (``lq_size * scale``) on the HQ image."""
    height, width = lq.shape[:2]
    top = int(rng.integers(0, height - lq_size + 1))
    left = int(rng.integers(0, width - lq_size + 1))
    lq_crop = lq[top:top + lq_size, left:left + lq_size]
    hq_crop = hq[top * scale:(top + lq_size) * scale, left * scale:(left + lq_size) * scale]
    return lq_crop, hq_crop


def flip_rotate(images: list[np.ndarray], rng: np.random.Generator, use_flip: bool,
                use_rot: bool) -> list[np.ndarray]:
    """The same random horizontal flip and rotation by a multiple of 90° applied to every image.

    With both on, all 8 symmetries of the square are equally likely. Both draws are made even when an
    option is off, so switching one option does not change the other's choices.
    """
    flip = rng.random() < 0.5
    quarter_turns = int(rng.integers(0, 4))
    out = []
    for image in images:
        if use_flip and flip:
            image = image[:, ::-1]
        if use_rot and quarter_turns:
            image = np.rot90(image, quarter_turns)
        out.append(image)
    return out


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC float numpy -> CHW float32 tensor (contiguous, owning its memory)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
