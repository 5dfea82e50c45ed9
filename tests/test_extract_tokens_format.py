"""The token-shard format: what the writer writes the reader gives back, resuming, and refusing mismatches."""
from __future__ import annotations

import json

import pytest
import torch

from dlas.data.token_shards import TokenShards, TokenShardWriter, read_manifest
from dlas.errors import DataError

INFO = {"grid": [2, 3], "codebook_size": 300, "dvae": {"run": "experiments/x", "network": "dvae", "step": 5},
        "source": {"dataset": {"type": "shapes"}, "epochs": 1}}


def batch(start: int, count: int):
    tokens = (torch.arange(start, start + count)[:, None, None] + torch.arange(6).view(1, 2, 3)) % 300
    records = [{"id": f"item{i}", "caption": f"caption {i}", "color": "red"} for i in range(start, start + count)]
    return tokens, records


def write(folder, total: int, shard_size: int = 4, step: int = 3):
    writer = TokenShardWriter(folder, INFO, shard_size)
    for start in range(writer.done, total, step):
        writer.add(*batch(start, min(step, total - start)))
    writer.close()
    return writer


def test_the_reader_returns_what_the_writer_wrote_in_item_order(tmp_path):
    write(tmp_path, 10)
    shards = TokenShards(tmp_path)
    assert len(shards) == 10 and shards.grid == (2, 3) and shards.codebook_size == 300
    for i in (0, 3, 4, 9, -1):
        item = shards[i]
        tokens, records = batch(i % 10, 1)
        assert item["tokens"].dtype == torch.int64 and torch.equal(item["tokens"], tokens[0])
        assert item["caption"] == records[0]["caption"] and item["id"] == records[0]["id"] and item["color"] == "red"
    with pytest.raises(IndexError):
        shards[10]


def test_shards_hold_shard_size_items_and_the_manifest_lists_them(tmp_path):
    write(tmp_path, 10, shard_size=4)
    manifest = read_manifest(tmp_path)
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["complete"] and manifest["count"] == 10 and manifest["token_dtype"] == "int16"
    assert all((tmp_path / s["tokens"]).is_file() and (tmp_path / s["captions"]).is_file() for s in manifest["shards"])
    assert len((tmp_path / "shard_00000.jsonl").read_text().splitlines()) == 4


def test_an_interrupted_extraction_resumes_at_the_first_unfinished_shard(tmp_path):
    writer = TokenShardWriter(tmp_path, INFO, shard_size=4)
    writer.add(*batch(0, 6))  # one shard written, two items still buffered: then the process dies
    del writer
    assert read_manifest(tmp_path)["complete"] is False
    with pytest.raises(DataError, match="has not finished"):
        TokenShards(tmp_path)
    assert len(TokenShards(tmp_path, allow_incomplete=True)) == 4
    resumed = write(tmp_path, 10)
    assert resumed.done == 10
    fresh = tmp_path / "fresh"
    write(fresh, 10)
    a, b = TokenShards(tmp_path), TokenShards(fresh)
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) and a[i]["id"] == b[i]["id"] for i in range(10))


def test_resuming_with_another_dvae_or_data_is_refused(tmp_path):
    write(tmp_path, 5)
    other = json.loads(json.dumps(INFO))
    other["dvae"]["step"] = 6
    with pytest.raises(DataError, match="another dvae"):
        TokenShardWriter(tmp_path, other, shard_size=4)


def test_a_folder_without_a_manifest_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="no manifest.json") as info:
        TokenShards(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_large_codebooks_are_stored_as_int32(tmp_path):
    info = dict(INFO, codebook_size=40000)
    writer = TokenShardWriter(tmp_path, info, shard_size=2)
    writer.add(torch.full((2, 2, 3), 39999), [{"id": "a", "caption": ""}, {"id": "b", "caption": ""}])
    writer.close()
    assert read_manifest(tmp_path)["token_dtype"] == "int32" and int(TokenShards(tmp_path)[1]["tokens"].max()) == 39999


def test_a_shuffled_epoch_reads_each_shard_once_by_default(tmp_path, monkeypatch):
    # A small cache under random access re-reads a shard for nearly every item (it made the loader,
    # not the transformer, the bottleneck of triforce_dalle_shapes).
    write(tmp_path, 40, shard_size=4)
    shards = TokenShards(tmp_path)
    reads = []
    original = TokenShards._shard

    def counting(self, index):
        if index not in self._cache:
            reads.append(index)
        return original(self, index)

    monkeypatch.setattr(TokenShards, "_shard", counting)
    for i in torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist():
        assert shards[i]["id"] == f"item{i}"
    assert sorted(reads) == list(range(10))


def test_captions_keep_unicode_line_separators_and_a_corrupt_record_names_its_file(tmp_path):
    writer = TokenShardWriter(tmp_path, INFO, shard_size=4)
    records = [{"id": "a", "caption": "one\u2028two"}, {"id": "b", "caption": "x"}]
    writer.add(torch.zeros(2, 2, 3, dtype=torch.long), records)
    writer.close()
    assert TokenShards(tmp_path)[0]["caption"] == "one\u2028two" and TokenShards(tmp_path)[1]["id"] == "b"
    lines = (tmp_path / "shard_00000.jsonl").read_text(encoding="utf-8").split("\n")
    lines[1] = lines[1][:-3]
    (tmp_path / "shard_00000.jsonl").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match="line 2 of shard_00000.jsonl is not JSON"):
        TokenShards(tmp_path)[1]
