"""The DALL-E transformer: a GPT over a caption's text tokens followed by a dVAE's image tokens.

Sequence layout (``L = text_length``, ``N = rows * columns`` image tokens)::

    targets  t_0 ... t_{L-1}  i_0 ... i_{N-1}          what the model predicts
    inputs   <s> t_0 ... t_{L-1}  i_0 ... i_{N-2}      the same, shifted right by one learned start vector

so position ``p`` predicts target ``p``: positions ``0..L-1`` give text logits (over the text vocabulary),
positions ``L..L+N-1`` image logits (over the dVAE's codebook). Text inputs get a learned position per slot;
image inputs a learned row embedding plus a learned column embedding (2-D positions, as in DALL-E).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dlas.data.tokenizer import BYTES, CaptionTokenizer
from dlas.errors import ConfigError
from dlas.models.transformer.attention import Block, KVCache, init_weights
from dlas.models.transformer.sampling import check_sampling_options, guide, sample_next
from dlas.registry import NETWORKS

log = logging.getLogger("dlas")

Captions = Sequence[str] | torch.Tensor


class TokenizerState(nn.Module):
    """Holds the network's caption tokenizer and saves it inside the network's weights.

    The tokenizer's ``tokenizer.json`` text travels as the extra state ``tokenizer._extra_state`` (a uint8
    tensor) of every checkpoint, so a trained run keeps the exact tokenizer its embeddings were trained with:
    loading weights installs the checkpoint's tokenizer, whatever file the config names now.
    """

    def __init__(self, tokenizer: CaptionTokenizer | None, missing: str | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.missing = missing  # the configured file, when it did not exist at construction

    def get(self) -> CaptionTokenizer:
        if self.tokenizer is None:
            CaptionTokenizer.load(self.missing)  # raises the ConfigError saying how to make one
        return self.tokenizer

    def get_extra_state(self) -> torch.Tensor:
        if self.tokenizer is None:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(self.tokenizer.to_json().encode("utf-8")), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        if state.numel() == 0:  # weights saved without a tokenizer: keep the configured one
            return
        loaded = CaptionTokenizer.from_json(state.cpu().numpy().tobytes().decode("utf-8"), "the checkpoint's tokenizer")
        if self.tokenizer is not None and self.tokenizer.to_json() != loaded.to_json():
            log.warning("the weights carry a different caption tokenizer than %s; using the weights' one (the "
                        "embeddings were trained with it)", self.tokenizer.source)
        self.tokenizer = loaded


@NETWORKS.register("dalle")
class DalleTransformer(nn.Module):
    """DALL-E's transformer: writes a dVAE's image tokens for a caption, one token at a time.

    A causal, pre-norm GPT (GPT-2 initialisation, ``F.scaled_dot_product_attention``) over
    ``text_length`` caption tokens followed by ``image_grid`` image tokens. Train it with the ``generator``
    injector on ``{text: caption, image_tokens: image_tokens}`` and ``out: {text_loss: ..., image_loss: ...}``;
    its forward returns both cross-entropies (nats per token), weighted by the step's losses (DALL-E: 1/8 text,
    7/8 image). Sample it with the ``dalle`` inference task (``dlas-test --caption``), which decodes the tokens
    with the run's dVAE. ``checkpointing: true`` checkpoints each block.

    Options:
      tokenizer: the caption tokenizer: a ``tokenizer.json`` from ``scripts/train_tokenizer.py``, or ``bytes``
        (one token per UTF-8 byte, no training; about 4x longer sequences than a BPE). It is saved inside the
        weights, so a trained run does not need the file any more (a missing file is an error only when a
        caption is tokenized without loaded weights).
      text_vocab_size: rows of the text embedding; at least the tokenizer's vocabulary (``train_tokenizer.py``
        prints it; 258 for ``bytes``).
      text_length: caption tokens per sequence, ``<eot>`` included; longer captions are truncated with a
        warning (``train_tokenizer.py`` prints how many of the captions fit).
      image_vocab_size: the dVAE's ``codebook_size``.
      image_grid: the dVAE's token grid, ``rows`` or ``[rows, columns]`` (a 32 px image at downsampling 4: 8).
      width, depth, heads, mlp_ratio: the transformer's size (``width`` a multiple of ``heads``); roughly
        ``12 * depth * width**2`` parameters in the blocks.
      dropout: on attention weights, and on the attention and MLP outputs (0 for small data that is seen often).
      tie_embeddings: use each vocabulary's embedding matrix as its output head (GPT-2's weight tying); false:
        separate text and image heads.
      caption_drop: probability that a training caption is replaced by the empty caption, which teaches the
        unconditional model classifier-free guidance needs (0: guidance has nothing to contrast with).
    """

    inference_task = "dalle"

    def __init__(self, tokenizer: str = BYTES, text_vocab_size: int = 1024, text_length: int = 32,
                 image_vocab_size: int = 512, image_grid: int | list[int] = 8, width: int = 256,
                 depth: int = 4, heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0,
                 tie_embeddings: bool = False, caption_drop: float = 0.1):
        super().__init__()
        rows, columns = (image_grid, image_grid) if isinstance(image_grid, int) else (tuple(image_grid) + (0, 0))[:2]
        for option, value in (("text_length", text_length), ("image_vocab_size", image_vocab_size),
                              ("width", width), ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio)):
            if value < 1:
                raise ConfigError(f"must be >= 1, got {value}", option)
        if rows < 1 or columns < 1 or isinstance(image_grid, list) and len(image_grid) != 2:
            raise ConfigError(f"expected rows or [rows, columns] of at least 1, got {image_grid}", "image_grid")
        if width % heads:
            raise ConfigError(f"width {width} must be a multiple of heads {heads}", "width")
        if not 0 <= caption_drop < 1:
            raise ConfigError(f"must be in [0, 1), got {caption_drop}", "caption_drop")
        if not 0 <= dropout < 1:
            raise ConfigError(f"must be in [0, 1), got {dropout}", "dropout")
        if tokenizer != BYTES and not Path(tokenizer).exists():
            loaded, missing = None, tokenizer  # a trained run's weights carry it (TokenizerState)
        else:
            loaded, missing = CaptionTokenizer.load(tokenizer), None
        if loaded is not None and loaded.vocab_size > text_vocab_size:
            raise ConfigError(f"the tokenizer has {loaded.vocab_size} ids; text_vocab_size must be at least that",
                              "text_vocab_size")
        self.tokenizer = TokenizerState(loaded, missing)
        self.text_length = text_length
        self.text_vocab_size, self.image_vocab_size = text_vocab_size, image_vocab_size
        self.rows, self.columns = rows, columns
        self.image_length = rows * columns
        self.caption_drop = caption_drop
        self.depth, self.heads, self.width = depth, heads, width

        self.start_embedding = nn.Parameter(torch.zeros(width))
        self.text_embedding = nn.Embedding(text_vocab_size, width)
        self.text_position_embedding = nn.Embedding(text_length + 1, width)
        self.image_embedding = nn.Embedding(image_vocab_size, width)
        self.image_row_embedding = nn.Embedding(rows, width)
        self.image_column_embedding = nn.Embedding(columns, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width)
        self.input_dropout = nn.Dropout(dropout)
        self.text_head = nn.Linear(width, text_vocab_size, bias=False)
        self.image_head = nn.Linear(width, image_vocab_size, bias=False)
        init_weights(self, list(self.blocks))
        nn.init.normal_(self.start_embedding, 0.0, 0.02)
        if tie_embeddings:
            self.text_head.weight = self.text_embedding.weight
            self.image_head.weight = self.image_embedding.weight
        self._checked_tokens = False
        self._last_image_tokens: torch.Tensor | None = None

    # ------------------------------------------------------------------ inputs
    def text_tokens(self, captions: Captions) -> torch.Tensor:
        """``[B, text_length]`` ids of ``captions`` (strings are tokenized; an id tensor is checked and kept)."""
        device = self.start_embedding.device
        if isinstance(captions, torch.Tensor):
            if captions.dim() != 2 or captions.shape[1] != self.text_length:
                raise ConfigError(f"caption ids must be [batch, text_length={self.text_length}], got "
                                  f"{tuple(captions.shape)}", "text_length")
            return captions.to(device=device, dtype=torch.long)
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions must be a list of strings or a [batch, text_length] id tensor")
        return self.tokenizer.get().encode(list(captions), self.text_length).to(device)

    def empty_caption(self, batch: int) -> torch.Tensor:
        """``[batch, text_length]`` ids of the empty caption (``<eot>``, padding): the unconditional input."""
        ids = torch.zeros(batch, self.text_length, dtype=torch.long, device=self.start_embedding.device)
        ids[:, 0] = 1  # <eot>; <pad> is 0 (dlas.data.tokenizer)
        return ids

    def image_positions(self, first: int, count: int) -> torch.Tensor:
        """``[count, width]`` 2-D position embeddings of image tokens ``first .. first+count-1`` (raster order)."""
        index = torch.arange(first, first + count, device=self.start_embedding.device)
        return self.image_row_embedding(index // self.columns) + self.image_column_embedding(index % self.columns)

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Inputs at positions ``0..L``: the start vector, then each text token, each with its position."""
        start = self.start_embedding.expand(text_ids.shape[0], 1, -1)
        x = torch.cat([start, self.text_embedding(text_ids)], dim=1)
        return x + self.text_position_embedding.weight

    def embed_image(self, image_ids: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Inputs of image tokens ``first ..`` (each at its row and column)."""
        return self.image_embedding(image_ids) + self.image_positions(first, image_ids.shape[1])

    def hidden(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The transformer on inputs ``x [B, T, width]`` (appended to ``cache`` when given)."""
        x = self.input_dropout(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.final_norm(x)

    # ------------------------------------------------------------------ training
    def logits(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced ``(text_logits [B, L, text_vocab], image_logits [B, n, image_vocab])`` for the ids of
        a caption and the first ``n`` image tokens (raster order, ``[B, n]``)."""
        x = self.embed_text(text_ids)
        if image_ids.shape[1] > 1:
            x = torch.cat([x, self.embed_image(image_ids[:, :-1])], dim=1)
        h = self.hidden(x)
        return self.text_head(h[:, :self.text_length]), self.image_head(h[:, self.text_length:])

    def forward(self, text: Captions, image_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{text_loss, image_loss}``: mean cross-entropy (nats) of the caption's tokens (its padding excluded)
        and of the image tokens (``[B, rows, columns]`` or ``[B, rows * columns]``).

        While training, each caption is replaced by the empty one with probability ``caption_drop``.
        """
        image_ids = self._image_ids(image_tokens)
        text_ids = self.text_tokens(text)
        if self.training and self.caption_drop > 0:
            dropped = torch.rand(text_ids.shape[0], device=text_ids.device) < self.caption_drop
            text_ids = torch.where(dropped[:, None], self.empty_caption(text_ids.shape[0]), text_ids)
        text_logits, image_logits = self.logits(text_ids, image_ids)
        self._last_image_tokens = image_ids.detach()
        return {"text_loss": F.cross_entropy(text_logits.flatten(0, 1).float(), text_ids.flatten(), ignore_index=0),
                "image_loss": F.cross_entropy(image_logits.flatten(0, 1).float(), image_ids.flatten())}

    def _image_ids(self, image_tokens: torch.Tensor) -> torch.Tensor:
        image_ids = image_tokens.flatten(1).to(device=self.start_embedding.device)
        if image_ids.shape[1] != self.image_length or image_ids.is_floating_point():
            raise ConfigError(f"image tokens of shape {tuple(image_tokens.shape)} ({image_tokens.dtype}) do not fit "
                              f"image_grid [{self.rows}, {self.columns}] (integer ids); set it to the dVAE's token "
                              "grid", "image_grid")
        if not self._checked_tokens:  # one host sync, on the first batch only
            low, high = int(image_ids.min()), int(image_ids.max())
            if low < 0 or high >= self.image_vocab_size:
                raise ConfigError(f"image token ids go from {low} to {high}, outside image_vocab_size "
                                  f"{self.image_vocab_size}; set it to the dVAE's codebook_size", "image_vocab_size")
            self._checked_tokens = True
        return image_ids.long()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate_tokens(self, captions: Captions, generator: torch.Generator | None = None,
                        temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                        guidance_scale: float | None = None, use_cache: bool = True) -> torch.Tensor:
        """Sample image tokens ``[B, rows, columns]`` for ``captions`` (strings or ids), one row per caption.

        ``generator`` seeds the draws (same seed, same tokens). ``temperature`` divides the logits;
        ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest set reaching that probability.
        ``guidance_scale``: null samples the conditional model; a number s runs the empty caption alongside and
        samples ``cond + (s - 1) * (cond - uncond)`` (1: conditional, 0: unconditional, 3: typical guidance).
        ``use_cache: false`` recomputes the whole prefix for every token (the reference the cache must match).
        """
        check_sampling_options(temperature, top_k, top_p, guidance_scale)
        was_training = self.training
        self.eval()
        try:
            text_ids = self.text_tokens(captions)
            batch = text_ids.shape[0]
            if guidance_scale is not None:  # rows batch.. are the same sequences without their caption
                text_ids = torch.cat([text_ids, self.empty_caption(batch)])
            cache = KVCache(self.depth, self.text_length + self.image_length) if use_cache else None
            image_ids = text_ids.new_zeros(text_ids.shape[0], 0)
            while image_ids.shape[1] < self.image_length:
                logits = self.next_image_logits(text_ids, image_ids, cache)
                if guidance_scale is not None:
                    logits = guide(logits[:batch], logits[batch:], guidance_scale)
                token = sample_next(logits, generator, temperature, top_k, top_p)
                if guidance_scale is not None:
                    token = token.repeat(2)
                image_ids = torch.cat([image_ids, token[:, None]], dim=1)
            return image_ids[:batch].view(batch, self.rows, self.columns)
        finally:
            self.train(was_training)

    def next_image_logits(self, text_ids: torch.Tensor, image_ids: torch.Tensor,
                          cache: KVCache | None = None) -> torch.Tensor:
        """Logits ``[B, image_vocab]`` of image token ``n`` given the caption ids and the first ``n`` image ids.

        Without a cache every position is computed; with one, only those it does not hold yet (all of the
        caption on the first call, then the newest image token), and it is extended with them.
        """
        done = 0 if cache is None else cache.length  # inputs 0..L are the caption's, L+1+k image token k's
        parts = [self.embed_text(text_ids)[:, done:]] if done <= self.text_length else []
        first_image = max(done - self.text_length - 1, 0)
        if image_ids.shape[1] > first_image:
            parts.append(self.embed_image(image_ids[:, first_image:], first_image))
        return self.image_head(self.hidden(torch.cat(parts, dim=1), cache)[:, -1])

    # ------------------------------------------------------------------ protocol
    def checkpoint_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Install a weight file's tokenizer before its keys are compared with ours (its length may differ)."""
        saved = state.get("tokenizer._extra_state")
        if saved is not None:
            self.tokenizer.set_extra_state(saved)
        return state

    def debug_info(self) -> dict[str, float | torch.Tensor]:
        """``image_unigram_entropy``: the entropy (nats) of the last batch's image-token frequencies, the
        ``image_loss`` of a model that ignores all context (training should go well below it);
        ``image_token_usage``: those frequencies (a histogram); ``captions_truncated``: captions cut so far."""
        info: dict[str, float | torch.Tensor] = {}
        tokenizer = self.tokenizer.tokenizer
        if tokenizer is not None:
            info["captions_truncated"] = float(tokenizer.truncated)
        if self._last_image_tokens is not None:
            counts = torch.bincount(self._last_image_tokens.flatten(), minlength=self.image_vocab_size).float()
            probs = counts / counts.sum()
            info["image_unigram_entropy"] = -(probs[probs > 0] * probs[probs > 0].log()).sum()
            info["image_token_usage"] = counts
        return info
