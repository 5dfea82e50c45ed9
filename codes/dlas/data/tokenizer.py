"""Caption tokenizer: a byte-level BPE (the ``tokenizers`` library) that turns captions into fixed-length ids.

Every caption becomes exactly ``length`` ids: its BPE tokens, one end-of-text marker, then padding::

    "small red circle" -> [small, Ġred, Ġcircle, <eot>, <pad>, <pad>, ...]

A caption with more than ``length - 1`` tokens keeps its first ``length - 1`` and the marker, and the first
few such captions are logged as warnings on the ``dlas`` logger (a long caption at step 40,000 is a warning,
never an error); :attr:`CaptionTokenizer.truncated` counts them all. The empty caption ``""`` is
``[<eot>, <pad>, ...]``: it is the "no caption" input of classifier-free guidance.

Ids 0 and 1 are ``<pad>`` and ``<eot>``. A tokenizer is one ``tokenizer.json`` (the library's own format, with
the lowercasing normalizer inside it), written by ``scripts/train_tokenizer.py`` from a dataset's captions.
``bytes`` names the untrained tokenizer: one token per UTF-8 byte (258 ids), for quick tries and tests.

``tokenizers`` is an optional dependency (``pip install dlas[text]``), imported only when a tokenizer is made.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from dlas.errors import ConfigError

log = logging.getLogger("dlas")

PAD, EOT = "<pad>", "<eot>"
SPECIAL_TOKENS = (PAD, EOT)
BYTES = "bytes"  # the name of the untrained byte tokenizer
MAX_WARNINGS = 5  # distinct truncated captions named in the log; the rest are only counted


def _library() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise ConfigError("caption tokenizers need the 'tokenizers' package: pip install dlas[text] "
                          "(or pip install tokenizers)", "tokenizer") from exc
    return tokenizers


def _byte_level_parts(tokenizer: Any, lowercase: bool) -> None:
    """Give ``tokenizer`` the normalizer, pre-tokenizer and decoder every caption tokenizer shares."""
    lib = _library()
    steps = [lib.normalizers.NFKC()] + ([lib.normalizers.Lowercase()] if lowercase else [])
    tokenizer.normalizer = lib.normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = lib.decoders.ByteLevel()


class CaptionTokenizer:
    """A ``tokenizers.Tokenizer`` with this project's conventions: ``<pad>`` = 0, ``<eot>`` = 1, fixed length.

    Build one with :meth:`load` (a ``tokenizer.json`` file or ``bytes``), :meth:`from_json` (the text of such a
    file) or :func:`train_caption_tokenizer`. It pickles as its JSON text, so loader workers and EMA copies get
    their own.
    """

    def __init__(self, tokenizer: Any, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.source = source
        self.truncated = 0  # captions truncated so far (each time one is encoded)
        self._warned: set[str] = set()  # the distinct captions named in a warning
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected_id:
                raise ConfigError(f"{source} is not a caption tokenizer: it must have {PAD} as id 0 and {EOT} as id 1 "
                                  "(write one with scripts/train_tokenizer.py)", "tokenizer")
        self.pad_id, self.eot_id = 0, 1

    # ------------------------------------------------------------------ making one
    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        """The tokenizer in ``path`` (a ``tokenizer.json``), or the byte tokenizer for ``bytes``."""
        if str(path) == BYTES:
            return byte_tokenizer()
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"tokenizer file '{path}' does not exist; train one with scripts/train_tokenizer.py "
                              f"(or use tokenizer: {BYTES})", "tokenizer")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read tokenizer file '{path}': {exc}", "tokenizer") from exc
        return cls.from_json(text, str(path))

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer") -> CaptionTokenizer:
        """The tokenizer whose ``tokenizer.json`` text is ``text``."""
        try:
            tokenizer = _library().Tokenizer.from_str(text)
        except Exception as exc:  # the library raises its own exception type for malformed files
            raise ConfigError(f"{source} is not a tokenizer.json file of the tokenizers library ({exc})",
                              "tokenizer") from exc
        return cls(tokenizer, source)

    def to_json(self) -> str:
        """The ``tokenizer.json`` text of this tokenizer."""
        return self.tokenizer.to_str()

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` to ``path``."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def __getstate__(self) -> dict[str, Any]:
        return {"json": self.to_json(), "source": self.source, "truncated": self.truncated}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(_library().Tokenizer.from_str(state["json"]), state["source"])
        self.truncated = state["truncated"]

    # ------------------------------------------------------------------ using one
    @property
    def vocab_size(self) -> int:
        """How many ids the tokenizer can produce (special tokens included)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_count(self, captions: Sequence[str]) -> list[int]:
        """The BPE tokens of each caption, without the end-of-text marker (to choose a caption length)."""
        return [len(e.ids) for e in self.tokenizer.encode_batch(list(captions), add_special_tokens=False)]

    def encode(self, captions: Sequence[str], length: int) -> torch.Tensor:
        """``[len(captions), length]`` int64 ids: tokens, ``<eot>``, ``<pad>``...; longer captions are truncated."""
        if length < 1:
            raise ValueError(f"a caption length is at least 1 (room for {EOT}), got {length}")
        ids = torch.full((len(captions), length), self.pad_id, dtype=torch.long)
        for row, (caption, encoding) in enumerate(zip(captions, self.tokenizer.encode_batch(
                list(captions), add_special_tokens=False))):
            tokens = encoding.ids
            if len(tokens) > length - 1:
                self._warn_truncated(caption, len(tokens), length)
                tokens = tokens[:length - 1]
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            ids[row, len(tokens)] = self.eot_id
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The caption of a row of ids (up to its ``<eot>``; padding dropped)."""
        kept = []
        for i in (int(i) for i in ids):
            if i == self.eot_id:
                break
            if i != self.pad_id:
                kept.append(i)
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def _warn_truncated(self, caption: str, tokens: int, length: int) -> None:
        self.truncated += 1
        if len(self._warned) < MAX_WARNINGS and caption not in self._warned:
            self._warned.add(caption)
            more = "; further ones are only counted (debug captions_truncated)" \
                if len(self._warned) == MAX_WARNINGS else ""
            log.warning("caption of %d tokens truncated to %d (text_length %d leaves room for %s): %r%s",
                        tokens, length - 1, length, EOT, caption[:120], more)


def byte_tokenizer() -> CaptionTokenizer:
    """The untrained tokenizer: ``<pad>``, ``<eot>`` and one token per byte (no merges)."""
    lib = _library()
    alphabet = sorted(lib.pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    tokenizer = lib.Tokenizer(lib.models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    _byte_level_parts(tokenizer, lowercase=True)
    return CaptionTokenizer(tokenizer, BYTES)


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2,
                            lowercase: bool = True) -> CaptionTokenizer:
    """A byte-level BPE trained on ``captions``: at most ``vocab_size`` ids (fewer when the captions have fewer
    pairs worth merging), merges of pairs seen at least ``min_frequency`` times, lowercased if asked."""
    lib = _library()
    if vocab_size < 258:
        raise ConfigError(f"a byte-level vocabulary needs at least 258 ids (256 bytes, {PAD}, {EOT}), got {vocab_size}",
                          "vocab_size")
    tokenizer = lib.Tokenizer(lib.models.BPE())
    _byte_level_parts(tokenizer, lowercase)
    trainer = lib.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=lib.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(captions, trainer)
    return CaptionTokenizer(tokenizer, "trained tokenizer")


def describe(tokenizer: CaptionTokenizer) -> dict[str, Any]:
    """A summary of a tokenizer's vocabulary (for the training script's report)."""
    data = json.loads(tokenizer.to_json())
    return {"vocab_size": tokenizer.vocab_size, "merges": len(data.get("model", {}).get("merges") or [])}
