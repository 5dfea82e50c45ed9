"""Where logged values go: tensorboard (``logger.tensorboard``) and wandb (``logger.wandb``), behind one interface."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch


class Writers:
    """Several writers (``add_scalars``, ``add_images``, ``add_histogram``, ``close``) as one: every call goes to
    each."""

    def __init__(self, writers: list[Any]):
        self.writers = writers

    def __bool__(self) -> bool:
        return bool(self.writers)

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        for writer in self.writers:
            writer.add_scalars(values, step)

    def add_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        for writer in self.writers:
            writer.add_images(tag, images, step)

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        for writer in self.writers:
            writer.add_histogram(tag, values, step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def open_writers(cfg: Mapping[str, Any], run_dir: Path) -> Optional[Writers]:
    """The run's writers per its ``logger`` section (``None`` when it logs to neither)."""
    writers: list[Any] = []
    if cfg["logger"]["tensorboard"]:
        from dlas.logging.tensorboard import TensorboardWriter

        writers.append(TensorboardWriter(Path(run_dir) / "tb"))
    if cfg["logger"]["wandb"]:
        from dlas.logging.wandb_writer import WandbWriter

        writers.append(WandbWriter(Path(run_dir), cfg["name"], cfg["logger"]["wandb"], config=dict(cfg)))
    return Writers(writers) if writers else None
