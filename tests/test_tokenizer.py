"""Caption tokenizer: a byte-level BPE with padding, an end-of-text marker and a fixed caption length."""
from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch

from dlas.data.tokenizer import (
    CaptionTokenizer,
    byte_tokenizer,
    train_caption_tokenizer,
)
from dlas.errors import ConfigError

CAPTIONS = [f"a {size} {color} {shape} on a {ground} background"
            for size in ("small", "large") for color in ("red", "green", "blue")
            for shape in ("circle", "square") for ground in ("white", "black")]


@pytest.fixture(scope="module")
def trained() -> CaptionTokenizer:
    return train_caption_tokenizer(CAPTIONS * 3, vocab_size=400)


def test_encode_decode_round_trip(trained):
    ids = trained.encode(CAPTIONS, length=16)
    assert [trained.decode(row) for row in ids] == CAPTIONS


def test_training_merges_the_captions_words_into_few_tokens(trained):
    # byte-level: 'small' would be 5 tokens; the BPE learned it (and ' red', ' circle', ...) as one each
    assert trained.token_count(["a small red circle"]) == [4]
    assert trained.vocab_size <= 400


def test_captions_become_tokens_then_eot_then_padding(trained):
    ids = trained.encode(["a small red circle"], length=8)[0]
    assert ids.dtype == torch.long and ids.shape == (8,)
    assert ids[4] == trained.eot_id == 1
    assert (ids[5:] == trained.pad_id).all() and trained.pad_id == 0
    assert (ids[:4] > 1).all()


def test_the_empty_caption_is_end_of_text_then_padding(trained):
    assert trained.encode([""], length=5).tolist() == [[1, 0, 0, 0, 0]]


def test_a_long_caption_is_truncated_with_a_warning_not_an_error(trained, caplog):
    long = " and ".join(CAPTIONS[:4])
    with caplog.at_level(logging.WARNING, logger="dlas"):
        ids = trained.encode([long, "a red circle"], length=6)
    assert ids.shape == (2, 6)
    assert ids[0, 5] == trained.eot_id  # the marker still ends it
    assert trained.decode(ids[0]) == trained.decode(trained.encode([long], length=50)[0, :5])
    assert trained.truncated >= 1
    assert "truncated" in caplog.text and "a small red circle" in caplog.text


def test_a_repeated_long_caption_is_warned_about_once_but_counted_each_time(caplog):
    tokenizer = byte_tokenizer()
    with caplog.at_level(logging.WARNING, logger="dlas"):
        tokenizer.encode(["x" * 20] * 3, length=4)
    assert tokenizer.truncated == 3
    assert caplog.text.count("truncated") == 1


def test_the_byte_tokenizer_needs_no_training_and_round_trips_unicode():
    tokenizer = byte_tokenizer()
    assert tokenizer.vocab_size == 258
    ids = tokenizer.encode(["Grün — ok"], length=16)
    assert tokenizer.decode(ids[0]) == "grün — ok"  # lowercased, like the trained ones


def test_a_saved_tokenizer_loads_back_identical(trained, tmp_path):
    trained.save(tmp_path / "tokenizer.json")
    loaded = CaptionTokenizer.load(tmp_path / "tokenizer.json")
    assert torch.equal(loaded.encode(CAPTIONS, 12), trained.encode(CAPTIONS, 12))


def test_a_pickled_tokenizer_encodes_the_same(trained):
    # loader workers and EMA copies receive pickled copies
    copy = pickle.loads(pickle.dumps(trained))
    assert torch.equal(copy.encode(CAPTIONS, 12), trained.encode(CAPTIONS, 12))


def test_a_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="train_tokenizer.py"):
        CaptionTokenizer.load(tmp_path / "nope.json")


def test_a_tokenizer_without_the_special_tokens_is_refused(trained, tmp_path):
    data = json.loads(trained.to_json())
    data["added_tokens"] = []
    data["model"]["vocab"] = {token: i + 2 for token, i in data["model"]["vocab"].items()}
    (tmp_path / "other.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="not a caption tokenizer"):
        CaptionTokenizer.load(tmp_path / "other.json")
