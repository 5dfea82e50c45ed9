"""Visuals: one captioned comparison grid per logged step, columns at one size."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dlas.logging.visuals import LABEL_HEIGHT, comparison_grid, save_visuals


def state(rows: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"lq": torch.rand(rows, 3, 8, 8, generator=generator),
            "gen": torch.rand(rows, 3, 32, 32, generator=generator),
            "hq": torch.rand(rows, 1, 32, 32, generator=generator)}


def test_the_grid_has_a_captioned_column_per_key_and_a_row_per_sample():
    grid = comparison_grid(state(), max_rows=2)
    assert grid.shape == (LABEL_HEIGHT + 2 * (32 + 2) + 2, 3 * (32 + 2) + 2, 3)
    assert (grid[:LABEL_HEIGHT] < 128).any()  # the captions are drawn


def test_a_smaller_column_is_shown_bicubic_upscaled_to_the_largest_size():
    images = state()
    grid = comparison_grid(images, max_rows=1).astype(int)
    top, left = LABEL_HEIGHT + 2, 2
    expected = F.interpolate(images["lq"][:1], size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    expected = (expected[0].permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert np.abs(grid[top:top + 32, left:left + 32] - expected).max() <= 1
    gen = (images["gen"][0].permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert np.abs(grid[top:top + 32, left + 34:left + 34 + 32] - gen).max() <= 1


def test_save_visuals_writes_the_grid_and_each_key(tmp_path):
    save_visuals({**state(), "loss": torch.tensor(1.0)}, tmp_path / "visuals" / "100")
    names = sorted(p.name for p in (tmp_path / "visuals" / "100").iterdir())
    assert names == ["gen.png", "grid.png", "hq.png", "lq.png"]
    assert Image.open(tmp_path / "visuals" / "100" / "grid.png").size == (3 * 34 + 2, LABEL_HEIGHT + 3 * 34 + 2)
