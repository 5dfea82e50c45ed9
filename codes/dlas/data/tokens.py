"""Datasets of dVAE image tokens with their captions, for the DALL-E transformer."""
from __future__ import annotations

from typing import Any, Optional

import torch

from dlas.data.token_shards import TokenShards
from dlas.errors import ConfigError
from dlas.registry import DATASETS


@DATASETS.register("token_shards")
class TokenShardDataset(torch.utils.data.Dataset):
    """Image tokens and captions written once by ``scripts/extract_tokens.py`` (a dVAE run encoding a dataset).

    Items: ``image_tokens`` (``[rows, columns]`` int64 dVAE codes), ``caption`` (the text), ``id`` and the
    other string fields the extraction kept (the shapes dataset's ``shape``, ``color``, ...). Reading an item is
    an index into a shard kept in memory: no image is decoded and no dVAE runs, so a loader worker or none keeps
    up with any transformer. For small data, ``dvae_encode`` encodes images on the fly instead.

    Options:
      paths: token-shard folders (extraction outputs); several are concatenated and must share the token grid
        and the codebook size.
      start / stop: use items ``start .. stop - 1`` of the concatenation (null stop: to the end); e.g. a
        validation set of the first 512 items (``stop: 512``) and training on the rest (``start: 512``).
      tokens_key: the state key of the tokens (the transformer's ``image_tokens`` input).
      cache_shards: shards kept in memory per loader process; null: as many as fit in 512 MB, which is every
        shard of most extractions (a 4096-item shard of 8 x 8 tokens is 1.4 MB with its captions). A shuffled
        epoch over more shards than the cache holds reads a shard for nearly every item.
      allow_incomplete: read a folder whose extraction has not finished (its finished shards only).
    """

    def __init__(self, paths: list[str], start: int = 0, stop: Optional[int] = None,
                 tokens_key: str = "image_tokens", cache_shards: Optional[int] = None, allow_incomplete: bool = False):
        if not paths:
            raise ConfigError("name at least one token-shard folder (written by scripts/extract_tokens.py)", "paths")
        self.parts = [TokenShards(path, cache_shards, allow_incomplete) for path in paths]
        first = self.parts[0]
        for i, part in enumerate(self.parts[1:], 1):
            if (part.grid, part.codebook_size) != (first.grid, first.codebook_size):
                raise ConfigError(f"{paths[i]} has {part.grid[0]}x{part.grid[1]} tokens of a {part.codebook_size}-code "
                                  f"codebook, {paths[0]} {first.grid[0]}x{first.grid[1]} of {first.codebook_size}; "
                                  "concatenated folders must come from the same dVAE", f"paths[{i}]")
        self.grid, self.codebook_size = first.grid, first.codebook_size
        total = sum(len(part) for part in self.parts)
        stop = total if stop is None else stop
        if not 0 <= start < stop <= total:
            raise ConfigError(f"start {start} and stop {stop} select no items of the {total} in the folders "
                              "(0 <= start < stop <= count)", "stop" if stop > total else "start")
        self.start, self.stop = start, stop
        self.tokens_key = tokens_key
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"token_shards: index {index} is outside 0..{len(self) - 1}")
        position = self.start + index
        part = next(i for i in range(len(self.parts)) if position < self.offsets[i + 1])
        item = self.parts[part][position - self.offsets[part]]
        tokens = item.pop("tokens")
        return {self.tokens_key: tokens, **item}
