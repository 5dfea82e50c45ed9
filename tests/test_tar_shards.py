"""Captioned images in webdataset tar shards: scripts/make_shards.py, the tar_shards dataset, exact resumes."""
from __future__ import annotations

import io
import logging
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_lmdb import assert_resumes_exactly, load_script

from dlas.data.image_file import read_image
from dlas.errors import ConfigError
from dlas.registry import DATASETS


def text_image_folder(folder: Path, count: int = 5, size: tuple[int, int] = (20, 28)) -> dict[str, np.ndarray]:
    """``count`` random PNGs ``imN.png`` with two-line side-car captions ``imN.txt``; returns name -> pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    images = {}
    for i in range(count):
        images[f"im{i}"] = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(images[f"im{i}"]).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text(f"photo {i} first caption\n\n  photo {i} second caption  \n")
    return images


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A shard holding ``members`` (name -> bytes) in the given order, written with the standard tarfile module."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Five captioned images packed two per shard by make_shards.py (shards 0, 1 and 2)."""
    tmp = tmp_path_factory.mktemp("shards")
    images = text_image_folder(tmp / "photos")
    assert load_script("make_shards").main([str(tmp / "photos"), str(tmp / "out"), "--per-shard", "2",
                                            "--workers", "1"]) == 0
    return tmp, images


# ------------------------------------------------------------------ scripts/make_shards.py
def test_make_shards_stores_each_image_and_its_captions_as_webdataset_members(shards):
    tmp, images = shards
    assert sorted(os.listdir(tmp / "out")) == ["manifest.json", "shard-000000.tar", "shard-000001.tar",
                                               "shard-000002.tar"]
    with tarfile.open(tmp / "out" / "shard-000001.tar") as tar:
        assert tar.getnames() == ["im2.png", "im2.txt", "im3.png", "im3.txt"]
        assert tar.extractfile("im2.png").read() == (tmp / "photos" / "im2.png").read_bytes()  # stored as it is
        assert tar.extractfile("im3.txt").read().decode() == "photo 3 first caption\nphoto 3 second caption"


def test_make_shards_resumes_keeping_the_shards_whose_images_did_not_change(shards, tmp_path, capsys):
    tmp, _ = shards
    photos, out = tmp_path / "photos", tmp_path / "out"
    text_image_folder(photos)
    make_shards = load_script("make_shards")
    make_shards.main([str(photos), str(out), "--per-shard", "2", "--workers", "1"])
    (out / "shard-000000.tar").unlink()  # as if interrupted while writing it
    (photos / "im4.txt").write_text("a new caption\n")  # shard 2's captions changed
    capsys.readouterr()
    assert make_shards.main([str(photos), str(out), "--per-shard", "2", "--workers", "1"]) == 0
    assert "5 samples in 3 shards (2 written, 1 already complete)" in capsys.readouterr().out
    with tarfile.open(out / "shard-000002.tar") as tar:
        assert tar.extractfile("im4.txt").read() == b"a new caption"


def test_make_shards_leaves_out_images_without_a_caption_and_exits_1(tmp_path, capsys):
    text_image_folder(tmp_path / "photos", count=2)
    (tmp_path / "photos" / "im1.txt").write_text("\n \n")
    assert load_script("make_shards").main([str(tmp_path / "photos"), str(tmp_path / "out"), "--workers", "1"]) == 1
    assert "im1.png: no caption" in capsys.readouterr().err
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert tar.getnames() == ["im0.png", "im0.txt"]


# ------------------------------------------------------------------ the tar_shards dataset
def test_items_are_the_stored_image_a_caption_line_and_the_shard_and_key(shards):
    tmp, _ = shards
    dataset = DATASETS.build({"type": "tar_shards", "shards": str(tmp / "out" / "shard-{000000..000002}.tar")}, "d")
    assert len(dataset) == 5
    item = dataset[(0, 3)]
    assert item["path"] == f"{tmp / 'out' / 'shard-000001.tar'}/im3"
    assert item["caption"] in ("photo 3 first caption", "photo 3 second caption")
    assert np.array_equal(item["hq"].numpy().transpose(1, 2, 0), read_image(str(tmp / "photos" / "im3.png")))


def test_a_caption_is_drawn_per_epoch_from_the_item_seed(shards):
    tmp, _ = shards
    dataset = DATASETS.build({"type": "tar_shards", "shards": [str(tmp / "out")]}, "d")
    drawn = [dataset[(epoch, 0)]["caption"] for epoch in range(12)]
    assert set(drawn) == {"photo 0 first caption", "photo 0 second caption"}
    assert drawn == [dataset[(epoch, 0)]["caption"] for epoch in range(12)]


def test_target_size_resizes_the_shorter_side_then_crops(shards):
    tmp, _ = shards
    center = DATASETS.build({"type": "tar_shards", "shards": [str(tmp / "out")], "target_size": 10,
                             "crop": "center"}, "d")
    hq = center[(0, 0)]["hq"]
    assert hq.shape == (3, 10, 10) and 0 <= float(hq.min()) and float(hq.max()) <= 1
    native = DATASETS.build({"type": "tar_shards", "shards": [str(tmp / "out")], "target_size": 10,
                             "resize": False, "crop": "center"}, "d")
    source = read_image(str(tmp / "photos" / "im0.png"))  # 20 x 28: the center 10 x 10 starts at (5, 9)
    assert np.array_equal(native[(0, 0)]["hq"].numpy().transpose(1, 2, 0), source[5:15, 9:19])


def test_a_flipped_item_has_left_and_right_swapped_in_its_caption(tmp_path):
    pixels = np.zeros((6, 6, 3), np.uint8)
    pixels[:, :3] = 255  # white on the left
    shard = write_tar(tmp_path / "s.tar", {"x.png": png_bytes(pixels), "x.txt": b"white on the left"})
    dataset = DATASETS.build({"type": "tar_shards", "shards": str(shard), "use_flip": True}, "d")
    items = [dataset[(epoch, 0)] for epoch in range(8)]
    assert {item["caption"] for item in items} == {"white on the left", "white on the right"}
    for item in items:
        white_left = bool(item["hq"][:, :, 0].mean() > 0.5)
        assert item["caption"] == ("white on the left" if white_left else "white on the right")


def test_the_index_is_cached_next_to_a_shard_and_rebuilt_when_the_shard_changes(tmp_path):
    pixels = np.full((6, 6, 3), 40, np.uint8)
    shard = write_tar(tmp_path / "a.tar", {"x.png": png_bytes(pixels), "x.txt": b"one"})
    assert DATASETS.build({"type": "tar_shards", "shards": str(shard)}, "d")[0]["caption"] == "one"
    assert (tmp_path / "a.tar.index.npz").is_file()
    write_tar(shard, {"y.txt": b"two", "y.png": png_bytes(pixels), "z.png": png_bytes(pixels), "z.txt": b"three"})
    os.utime(shard, ns=(1, 1))  # a different modification time, as any rewrite gives
    dataset = DATASETS.build({"type": "tar_shards", "shards": str(shard)}, "d")
    assert [dataset[i]["caption"] for i in range(len(dataset))] == ["two", "three"]


@pytest.mark.parametrize("broken", ["undecodable image", "empty caption", "truncated shard"])
def test_a_corrupt_member_is_skipped_and_counted(tmp_path, broken, caplog):
    good = png_bytes(np.full((8, 8, 3), 200, np.uint8))
    members = {"a.png": good, "a.txt": b"fine", "b.png": good, "b.txt": b"fine too"}
    if broken == "undecodable image":
        members["b.png"] = good[:20] + bytes(len(good) - 20)
    elif broken == "empty caption":
        members["b.txt"] = b"\n"
    shard = write_tar(tmp_path / "s.tar", members)
    if broken == "truncated shard":  # the shard ends inside b.png, whose header says more bytes follow
        with tarfile.open(shard) as tar:
            cut = tar.getmember("b.png").offset_data + 10
        shard.write_bytes(shard.read_bytes()[:cut])
    dataset = DATASETS.build({"type": "tar_shards", "shards": str(shard)}, "d")
    logging.getLogger("dlas").addHandler(caplog.handler)  # the dlas logger does not propagate to pytest's
    try:
        item = dataset[(0, 1)]
    finally:
        logging.getLogger("dlas").removeHandler(caplog.handler)
    assert item["path"] == f"{shard}/a" and dataset.bad_count == 1
    assert any(f"skipping {shard}/b" in record.getMessage() for record in caplog.records)


def test_shard_mistakes_are_one_line_config_errors(tmp_path):
    write_tar(tmp_path / "s-0.tar", {"a.png": png_bytes(np.zeros((4, 4, 3), np.uint8)), "a.txt": b"x"})
    with pytest.raises(ConfigError, match=r"shards: '.*s-\{0\.\.1\}\.tar' names '.*s-1\.tar', which does not exist"):
        DATASETS.build({"type": "tar_shards", "shards": str(tmp_path / "s-{0..1}.tar")}, "d")
    (tmp_path / "c.tar.gz").write_bytes(b"")
    with pytest.raises(ConfigError, match="compressed tar cannot be read by index"):
        DATASETS.build({"type": "tar_shards", "shards": [str(tmp_path / "c.tar.gz")]}, "d")


def test_without_webdataset_the_dataset_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # what `import webdataset` meets when it is absent
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[shards\]"'):
        DATASETS.build({"type": "tar_shards", "shards": str(tmp_path / "s.tar")}, "d")


# ------------------------------------------------------------------ training
def test_training_on_shards_resumes_exactly(shards, tmp_path, one_torch_thread):
    tmp, _ = shards
    assert_resumes_exactly(tmp_path, {"type": "tar_shards", "shards": [str(tmp / "out")], "target_size": 12},
                           source="hq")
