"""Pre-norm causal transformer blocks on ``F.scaled_dot_product_attention``, with a key/value cache.

Without a cache a block attends causally over its whole input (training, and the uncached reference sampler).
With a :class:`KVCache` each call appends its keys and values at the cache's current length and attends over
everything cached so far, so generating token t costs one token's projections and MLP plus a read of t cached
keys: the per-token time stays flat as the sequence grows instead of growing with it (an uncached sampler
recomputes the whole prefix for every token, O(n²) work per token).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of every layer for the positions computed so far, room for ``max_length`` positions.

    Layer ``i`` calls :meth:`store` with the keys/values of its new positions; after the last layer the model
    calls :meth:`advance` so that the next call writes after them. Rows are independent sequences (a batch).
    The buffers are allocated on the first store, with the keys' batch, heads, dtype and device.
    """

    def __init__(self, layers: int, max_length: int):
        self.layers = layers
        self.max_length = max_length
        self.length = 0  # positions already cached (and the position of the next input)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, H, T, D]`` keys and values at the current length; return all cached ones of ``layer``."""
        if self.keys is None:
            batch, heads, _, head_dim = keys.shape
            shape = (self.layers, batch, heads, self.max_length, head_dim)
            self.keys = keys.new_zeros(shape)
            self.values = values.new_zeros(shape)
        end = self.length + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"the cache holds {self.max_length} positions; cannot add {keys.shape[2]} at "
                             f"{self.length}")
        self.keys[layer, :, :, self.length:end] = keys
        self.values[layer, :, :, self.length:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, count: int) -> None:
        """Mark ``count`` more positions as cached (after every layer has stored them)."""
        self.length += count


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused q/k/v projection, SDPA, an output projection."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.store(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if past == 0:  # the whole sequence so far is this input: a plain causal mask
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif length == 1:  # one new position sees every cached one: no mask at all
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # several new positions after a cached prefix: causal, aligned to the end (SDPA's is_causal is not)
            mask = torch.ones(length, past + length, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj_dropout(self.proj(out.transpose(1, 2).reshape(batch, length, width)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))`` (GPT-2)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, dropout)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cache, layer)
        return x + self.mlp(self.mlp_norm(x))

    def residual_projections(self) -> list[nn.Linear]:
        """The layers writing into the residual stream (initialised smaller, see :func:`init_weights`)."""
        return [self.attention.proj, self.mlp[2]]


def init_weights(module: nn.Module, blocks: list[Block], std: float = 0.02) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights and zero biases, and N(0, 0.02 / sqrt(2 * depth)) for the
    projections into the residual stream, so that the stream's variance does not grow with depth."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, 0.0, std)
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            nn.init.zeros_(sub.bias)
    for block in blocks:
        for proj in block.residual_projections():
            nn.init.normal_(proj.weight, 0.0, std / math.sqrt(2 * len(blocks)))
