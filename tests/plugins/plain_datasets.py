"""Datasets written the ordinary PyTorch way (int indices, global RNG, tuples), knowing nothing of DLAS."""
from __future__ import annotations

import torch

from dlas.registry import DATASETS, NETWORKS


@DATASETS.register("plain_noisy_pairs")
class PlainNoisyPairs(torch.utils.data.Dataset):
    """``length`` fixed images with noise drawn from the global torch RNG on every access; refuses non-int keys."""

    def __init__(self, length: int = 10, size: int = 8):
        generator = torch.Generator().manual_seed(7)
        self.images = torch.rand(length, 3, size, size, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        if type(index) is not int:
            raise TypeError(f"expected an int index, got {index!r}")
        hq = self.images[index]
        return {"lq": (hq + 0.1 * torch.rand_like(hq)).clamp(0, 1), "hq": hq}


@DATASETS.register("plain_tuple_pairs")
class PlainTuplePairs(torch.utils.data.Dataset):
    """``(lq, hq)`` tuples, as torchvision-style datasets return them."""

    def __init__(self, length: int = 8, size: int = 8):
        self.images = torch.rand(length, 3, size, size, generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index] * 0.5, self.images[index]


@DATASETS.register("plain_odd_items")
class PlainOddItems(torch.utils.data.Dataset):
    """Items that cannot be batched: ``mixed`` sizes of 'hq' (``mixed_late``: from item 2 on, so the first batch
    passes the start-up check), or a ``none`` value under 'extra'."""

    def __init__(self, problem: str = "mixed", length: int = 8):
        self.problem, self.length = problem, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        mixed = self.problem == "mixed" or (self.problem == "mixed_late" and index >= 2)
        size = 8 + (index % 2) * 2 if mixed else 8
        item = {"lq": torch.zeros(3, 8, 8), "hq": torch.zeros(3, size, size)}
        if self.problem == "none":
            item["extra"] = None if index % 2 else 1.0
        return item


@NETWORKS.register("plain_identity_conv")
class PlainIdentityConv(torch.nn.Module):
    """One 3x3 convolution: the smallest trainable image-to-image network."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
