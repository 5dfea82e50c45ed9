"""The recipe's training step learns: on shapes tokens, a short run's image loss goes well below the tokens'
unigram entropy (the loss of a model that ignores the caption and the image so far).

The tokens are a stand-in for a trained dVAE's, computed without training one: each 4 x 4 patch of a 16 px
shapes image becomes the index of the palette colour nearest its mean (the code a dVAE learns for a flat
patch of that colour). Training a dVAE first would take minutes; the transformer's side is the same.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from dlas.config import load_config
from dlas.data.shapes import PALETTE
from dlas.data.tokenizer import train_caption_tokenizer
from dlas.registry import DATASETS
from dlas.trainer.trainer import ExtensibleTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = REPO / "options" / "triforce_dalle_shapes.yml"
PALETTE_RGB = torch.tensor(list(PALETTE.values()), dtype=torch.float) / 255


def palette_tokens(images: torch.Tensor) -> torch.Tensor:
    """``[B, H/4, W/4]`` indices of the palette colour nearest each 4 x 4 patch's mean colour."""
    patches = F.avg_pool2d(images, 4)
    distance = ((patches[:, None] - PALETTE_RGB[None, :, :, None, None]) ** 2).sum(2)
    return distance.argmin(1)


def shapes_tokens(count: int, variant: int) -> tuple[torch.Tensor, list[str]]:
    data = DATASETS.build({"type": "shapes", "resolution": 16, "count": count, "sizes": ["large"],
                           "variant": variant})
    items = [data[i] for i in range(count)]
    return palette_tokens(torch.stack([item["hq"] for item in items])), [item["caption"] for item in items]


def unigram_entropy(tokens: torch.Tensor) -> float:
    probs = torch.bincount(tokens.flatten(), minlength=len(PALETTE)).float() / tokens.numel()
    return float(-(probs[probs > 0] * probs[probs > 0].log()).sum())


def test_a_short_run_on_shapes_tokens_goes_well_below_the_unigram_entropy(tmp_path):
    train_tokens, train_captions = shapes_tokens(512, variant=0)
    val_tokens, val_captions = shapes_tokens(128, variant=1)
    train_caption_tokenizer(train_captions, vocab_size=512).save(tmp_path / "tokenizer.json")
    cfg = load_config(str(RECIPE), [
        f"networks.dalle.tokenizer={tmp_path / 'tokenizer.json'}", f"networks.dalle.image_vocab_size={len(PALETTE)}",
        "networks.dalle.image_grid=4", "networks.dalle.width=64", "networks.dalle.depth=2",
        "networks.dvae.width=8", "networks.dvae.res_blocks=0", "train.lr_scheduler=null",
        "steps.dalle.optimizer.lr=3e-3"])
    torch.manual_seed(0)
    trainer = ExtensibleTrainer(cfg, torch.device("cpu"))
    order = torch.Generator().manual_seed(0)
    for _ in range(120):
        index = torch.randint(0, len(train_captions), (16,), generator=order)
        trainer.train_step({"caption": [train_captions[i] for i in index], "image_tokens": train_tokens[index]})
    trainer.networks["dalle"].eval()
    val = trainer.compute_losses({"caption": val_captions, "image_tokens": val_tokens})
    entropy = unigram_entropy(val_tokens)
    assert entropy > 2.0  # twelve backgrounds: the tokens are far from constant
    assert val["dalle/image"] < 0.5 * entropy, (val, entropy)
    assert val["dalle/text"] < 0.5 * math.log(512)  # and it learned the captions' grammar
    # the caption is what it learned from, not only the image tokens written so far
    blind = trainer.compute_losses({"caption": [""] * len(val_captions), "image_tokens": val_tokens})
    assert val["dalle/image"] < 0.9 * blind["dalle/image"], (val, blind)
