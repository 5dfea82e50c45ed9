"""Tensorboard event files for a run (``experiments/NAME/tb``); imported only when logging is on."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch


class TensorboardWriter:
    """A thin wrapper over ``SummaryWriter`` that takes dicts of scalars and NCHW image batches in [0, 1]."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(log_dir))

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def add_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        self._writer.add_images(tag, images.detach().float().clamp(0, 1).cpu(), step)

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """A histogram of ``values``; a 1-D tensor of per-bin weights (expert usage) is drawn bin by bin."""
        values = values.detach().float().cpu()
        self._writer.add_histogram_raw(tag, min=0, max=len(values), num=float(values.sum()),
                                       sum=float((values * torch.arange(len(values))).sum()),
                                       sum_squares=float((values * torch.arange(len(values)) ** 2).sum()),
                                       bucket_limits=[float(i + 1) for i in range(len(values))],
                                       bucket_counts=values.tolist(), global_step=step)

    def close(self) -> None:
        self._writer.close()
