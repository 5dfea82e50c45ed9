"""The ``text_image`` dataset: side-car captions, caption tables, missing captions, crops and caption-aware flips."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlas.data.text_image import TextImageDataset, mirror_caption
from dlas.errors import ConfigError, DataError


def write_image(path: Path, size: tuple[int, int] = (24, 16), left_color=(255, 0, 0)) -> np.ndarray:
    """A width x height RGB image whose left half is ``left_color`` and right half blue."""
    width, height = size
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = left_color
    array[:, width // 2:] = (0, 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def captioned_folder(folder: Path) -> Path:
    write_image(folder / "a.png")
    (folder / "a.txt").write_text("a red square on the left\n\n  a photo of red and blue  \n")
    write_image(folder / "sub" / "b.png")
    (folder / "sub" / "b.txt").write_text("only one caption\n")
    return folder


def test_side_car_captions_give_one_of_their_lines_per_item(tmp_path):
    data = TextImageDataset([str(captioned_folder(tmp_path))])
    assert len(data) == 2 and data.keys == ("hq", "caption", "path")
    item = data[0]
    assert item["hq"].shape == (3, 16, 24) and item["path"].endswith("a.png")
    drawn = {data[(epoch, 0)]["caption"] for epoch in range(20)}
    assert drawn == {"a red square on the left", "a photo of red and blue"}  # stripped, blank line ignored
    assert data[1]["caption"] == "only one caption"
    first = TextImageDataset([str(tmp_path)], caption_choice="first")
    assert {first[(epoch, 0)]["caption"] for epoch in range(5)} == {"a red square on the left"}


def test_an_image_without_a_caption_is_reported_by_name_and_skipped(tmp_path, caplog):
    captioned_folder(tmp_path)
    write_image(tmp_path / "nocaption.png")
    write_image(tmp_path / "empty.png")
    (tmp_path / "empty.txt").write_text("\n  \n")
    data = TextImageDataset([str(tmp_path)])
    assert len(data) == 4
    with caplog.at_level(logging.WARNING, logger="dlas"):
        items = [data[i] for i in range(4)]
    assert all(item["caption"] for item in items)  # replaced by captioned images
    assert not any(item["path"].endswith(("nocaption.png", "empty.png")) for item in items)
    assert "nocaption.png" in caplog.text and "empty.png" in caplog.text and "no caption" in caplog.text
    assert data.bad_count == 2
    with pytest.raises(DataError, match="no caption"):
        TextImageDataset([str(tmp_path)], on_bad_image="error")[2]


def test_missing_caption_empty_keeps_uncaptioned_images(tmp_path):
    write_image(tmp_path / "x.png")
    item = TextImageDataset([str(tmp_path)], missing_caption="empty")[0]
    assert item["caption"] == "" and item["path"].endswith("x.png")


def test_a_captions_jsonl_in_the_folder_is_the_caption_table(tmp_path):
    write_image(tmp_path / "img" / "one.png")
    write_image(tmp_path / "img" / "two.png")
    write_image(tmp_path / "img" / "unlisted.png")
    rows = [{"file": "img/two.png", "caption": "second"}, {"image": "img/one.png", "text": "first"},
            {"file": "img/one.png", "caption": ["first again", ""]}]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = TextImageDataset([str(tmp_path)])
    assert [Path(f).name for f in data.files] == ["two.png", "one.png"]  # the table's images, in table order
    assert data.captions_of(1) == ["first", "first again"]
    assert data[0]["caption"] == "second"


@pytest.mark.parametrize("header", [True, False])
def test_a_csv_caption_table_with_or_without_a_header(tmp_path, header):
    write_image(tmp_path / "p.png")
    lines = (["image,caption"] if header else []) + ['p.png,"a caption, with a comma"']
    (tmp_path / "table.csv").write_text("\n".join(lines) + "\n")
    data = TextImageDataset([str(tmp_path / "table.csv")])
    assert len(data) == 1 and data[0]["caption"] == "a caption, with a comma"


def test_a_malformed_table_row_is_a_data_error_naming_the_line(tmp_path):
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n{"file": "b.png"}\n')
    with pytest.raises(DataError, match="line 2"):
        TextImageDataset([str(tmp_path)])


def test_target_size_scales_the_shorter_side_then_crops_a_square(tmp_path):
    write_image(tmp_path / "wide.png", size=(40, 20))
    (tmp_path / "wide.txt").write_text("wide\n")
    item = TextImageDataset([str(tmp_path)], target_size=10, crop="center")[0]
    assert item["hq"].shape == (3, 10, 10)
    # the centre crop of the half-red, half-blue image scaled to 20 x 10 straddles the boundary
    assert float(item["hq"][0, 5, 0]) > 0.9 and float(item["hq"][2, 5, -1]) > 0.9


def test_without_resize_an_image_smaller_than_target_size_is_skipped(tmp_path):
    write_image(tmp_path / "small.png", size=(8, 8))
    (tmp_path / "small.txt").write_text("small\n")
    with pytest.raises(DataError, match="smaller than target_size"):
        TextImageDataset([str(tmp_path)], target_size=16, resize=False, on_bad_image="error")[0]


def test_a_flip_mirrors_the_image_and_swaps_left_and_right_in_the_caption(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red on the Left, blue on the right\n")
    data = TextImageDataset([str(tmp_path)], use_flip=True)
    items = [data[(epoch, 0)] for epoch in range(12)]
    flipped = [item for item in items if item["caption"] == "red on the Right, blue on the left"]
    plain = [item for item in items if item["caption"] == "red on the Left, blue on the right"]
    assert flipped and plain and len(flipped) + len(plain) == len(items)
    assert torch.equal(flipped[0]["hq"], plain[0]["hq"].flip(-1))


def test_mirror_caption_swaps_only_whole_words():
    assert mirror_caption("LEFT and right, leftover") == "RIGHT and left, leftover"


def test_a_folder_without_images_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        TextImageDataset([str(tmp_path)])
