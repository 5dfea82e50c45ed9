"""The DALL-E transformer's data: token-shard datasets and the tokenizer-training script."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import REPO

from dlas.data.token_shards import TokenShardWriter
from dlas.data.tokenizer import CaptionTokenizer
from dlas.errors import ConfigError, DataError
from dlas.registry import DATASETS


def write_shards(folder, count: int, grid=(2, 3), codebook_size: int = 50, first: int = 0):
    info = {"grid": list(grid), "codebook_size": codebook_size, "dvae": {"run": "x"}, "source": {"first": first}}
    writer = TokenShardWriter(folder, info, shard_size=4)
    tokens = (torch.arange(first, first + count)[:, None, None] + torch.zeros(1, *grid, dtype=torch.long)) % 50
    writer.add(tokens, [{"id": f"item{i}", "caption": f"caption {i}", "color": "red"}
                        for i in range(first, first + count)])
    writer.close()
    return folder


def build(**options):
    return DATASETS.build({"type": "token_shards", **options})


def test_items_are_the_extracted_tokens_and_captions(tmp_path):
    data = build(paths=[str(write_shards(tmp_path, 10))])
    assert len(data) == 10
    item = data[6]
    assert item["image_tokens"].dtype == torch.long and item["image_tokens"].shape == (2, 3)
    assert (item["image_tokens"] == 6).all()
    assert item["caption"] == "caption 6" and item["color"] == "red"


def test_start_and_stop_split_a_folder_into_validation_and_training(tmp_path):
    folder = str(write_shards(tmp_path, 10))
    val, train = build(paths=[folder], stop=3), build(paths=[folder], start=3)
    assert len(val) == 3 and len(train) == 7
    assert train[0]["caption"] == "caption 3" and val[2]["caption"] == "caption 2"
    with pytest.raises(IndexError):
        val[3]


def test_several_folders_are_concatenated(tmp_path):
    a = write_shards(tmp_path / "a", 5)
    b = write_shards(tmp_path / "b", 6, first=5)
    data = build(paths=[str(a), str(b)])
    assert len(data) == 11
    assert [data[i]["caption"] for i in (4, 5, 10)] == ["caption 4", "caption 5", "caption 10"]


def test_folders_of_different_dvaes_are_refused(tmp_path):
    a = write_shards(tmp_path / "a", 5)
    b = write_shards(tmp_path / "b", 5, grid=(3, 3))
    with pytest.raises(ConfigError) as error:
        build(paths=[str(a), str(b)])
    assert error.value.problems[0].path == "paths[1]"


def test_a_folder_that_is_not_an_extraction_names_the_script(tmp_path):
    with pytest.raises(DataError, match="extract_tokens.py"):
        build(paths=[str(tmp_path)])


def run_train_tokenizer(*args: str) -> int:
    spec = importlib.util.spec_from_file_location("train_tokenizer", REPO / "scripts" / "train_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main(list(args))


def test_train_tokenizer_writes_where_the_config_looks_and_reports_the_fit(tmp_path, capsys):
    folder = write_shards(tmp_path / "tokens", 12)
    config = tmp_path / "dalle.yml"
    config.write_text(f"""name: t
datasets:
  train: {{type: token_shards, paths: ['{folder}']}}
networks:
  dalle: {{type: dalle, tokenizer: '{tmp_path / "tokenizer.json"}', text_length: 3, text_vocab_size: 300}}
""")
    assert run_train_tokenizer("-opt", str(config), "--vocab-size", "280") == 0
    out, err = capsys.readouterr()
    tokenizer = CaptionTokenizer.load(tmp_path / "tokenizer.json")
    assert tokenizer.decode(tokenizer.encode(["caption 7"], 8)[0]) == "caption 7"
    assert "12 captions" in out
    assert "text_length is 3" in err  # "caption 7" needs more than 2 tokens + <eot>


def test_train_tokenizer_without_captions_is_exit_2(capsys):
    assert run_train_tokenizer() == 2
    assert "error:" in capsys.readouterr().err
