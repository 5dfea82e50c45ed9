"""State images every ``logger.visual_freq`` steps: one captioned comparison grid, and each key on its own.

``visuals/STEP/grid.png`` puts the ``logger.visuals`` keys side by side in the order listed, one row per sample
(``lq | gen | hq`` for super-resolution): a column smaller than the largest is upscaled with bicubic
interpolation and captioned so (``lq x4``), so that every column is compared at the same size. The
same grid goes to tensorboard as ``visuals/grid``; ``visuals/STEP/KEY.png`` keeps each key's own samples at
their own size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

LABEL_HEIGHT = 14


def _displayable(images: torch.Tensor) -> torch.Tensor:
    """NCHW float in [0, 1] with 3 channels (1 channel repeated; more than 3: the first 3)."""
    images = images.detach().float().clamp(0, 1).cpu()
    if images.shape[1] not in (1, 3):
        images = images[:, :3] if images.shape[1] > 3 else images[:, :1]
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def image_grid(images: torch.Tensor, max_images: int = 8, pad: int = 2) -> np.ndarray:
    """An HWC uint8 grid of up to ``max_images`` NCHW images in [0, 1], four to a row."""
    images = _displayable(images[:max_images])
    n, c, h, w = images.shape
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def comparison_grid(images: Mapping[str, torch.Tensor], max_rows: int = 4, pad: int = 2) -> np.ndarray:
    """An HWC uint8 grid: one captioned column per key (in order), one row per sample, all at the largest size.

    A smaller image is upscaled with bicubic interpolation (its caption says by how much: ``lq x4``); one of
    another aspect ratio is placed top-left on white.
    """
    columns = {key: _displayable(value[:max_rows]) for key, value in images.items() if value.dim() == 4}
    if not columns:
        raise ValueError("no 4-D image tensors to show")
    height = max(v.shape[-2] for v in columns.values())
    width = max(v.shape[-1] for v in columns.values())
    rows = min(v.shape[0] for v in columns.values())
    captions = []
    scaled = []
    for key, value in columns.items():
        factor = min(height / value.shape[-2], width / value.shape[-1])
        if factor > 1:
            size = (round(value.shape[-2] * factor), round(value.shape[-1] * factor))
            value = F.interpolate(value, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
            key = f"{key} x{factor:g}"
        captions.append(key)
        scaled.append(value)
    grid = torch.ones(3, LABEL_HEIGHT + rows * (height + pad) + pad, len(scaled) * (width + pad) + pad)
    for col, value in enumerate(scaled):
        left = pad + col * (width + pad)
        for row in range(rows):
            top = LABEL_HEIGHT + pad + row * (height + pad)
            grid[:, top:top + value.shape[-2], left:left + value.shape[-1]] = value[row]
    picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for col, caption in enumerate(captions):
        left = pad + col * (width + pad)
        text = caption
        while text and draw.textlength(text) > width:  # shorten a caption wider than its column
            text = text[:-2] + "…" if len(text) > 2 else ""
        draw.text((left, 1), text, fill=(0, 0, 0))
    return np.asarray(picture)


def save_visuals(images: Mapping[str, torch.Tensor], folder: Path, writer: Optional[object] = None,
                 step: int = 0) -> None:
    """Write the comparison grid of the 4-D tensors of ``images`` as ``folder/grid.png`` and each as
    ``folder/KEY.png``; the grid also goes to tensorboard (``visuals/grid``) when a writer is given."""
    images = {key: value for key, value in images.items() if isinstance(value, torch.Tensor) and value.dim() == 4}
    if not images:
        return
    folder.mkdir(parents=True, exist_ok=True)
    grid = comparison_grid(images)
    Image.fromarray(grid).save(folder / "grid.png")
    for key, tensor in images.items():
        Image.fromarray(image_grid(tensor)).save(folder / f"{key.replace('/', '_')}.png")
    if writer is not None:
        writer.add_images("visuals/grid", torch.from_numpy(grid.copy()).permute(2, 0, 1)[None].float() / 255, step)
