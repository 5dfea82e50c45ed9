"""State images written as PNG grids (``visuals/STEP/KEY.png``) and to tensorboard."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, max_images: int = 8, pad: int = 2) -> np.ndarray:
    """An HWC uint8 grid of up to ``max_images`` NCHW images in [0, 1] (1 or 3 channels shown, others: first 3)."""
    images = images[:max_images].detach().float().clamp(0, 1).cpu()
    if images.shape[1] not in (1, 3):
        images = images[:, :3] if images.shape[1] > 3 else images[:, :1]
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, c, h, w = images.shape
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_visuals(images: Mapping[str, torch.Tensor], folder: Path, writer: Optional[object] = None,
                 step: int = 0) -> None:
    """Write each 4-D tensor of ``images`` as ``folder/KEY.png`` (and to tensorboard when a writer is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, tensor in images.items():
        if tensor.dim() != 4:
            continue
        Image.fromarray(image_grid(tensor)).save(folder / f"{key.replace('/', '_')}.png")
        if writer is not None:
            writer.add_images(f"visuals/{key}", tensor[:8], step)
