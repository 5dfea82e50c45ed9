"""Specification of the image datasets: reproducibility, shapes, alignment, conversions, bad files, paths."""
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dlas.data.file_index import SKIMAGE_SETS, resolve_image_paths
from dlas.data.image_file import read_image
from dlas.data.sampler import build_loader
from dlas.errors import ConfigError, DataError
from dlas.registry import DATASETS


@pytest.fixture(autouse=True)
def private_index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DLAS_CACHE_DIR", str(tmp_path / "cache"))


def save_rgb(path, height, width, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def hq_folder(tmp_path):
    folder = tmp_path / "hq"
    (folder / "sub").mkdir(parents=True)
    for i in range(4):
        save_rgb(folder / f"img{i}.png", 80, 96, seed=i)
    save_rgb(folder / "sub" / "deep.png", 72, 72, seed=9)
    return folder


def build(cfg):
    return DATASETS.build(cfg)


# ------------------------------------------------------------------ reproducibility
def test_same_key_gives_the_same_item(hq_folder):
    ds = build({"type": "image_folder", "paths": [str(hq_folder)], "target_size": 32, "degradations": "real_esrgan"})
    first, again = ds[(3, 2)], ds[(3, 2)]
    assert torch.equal(first["lq"], again["lq"]) and torch.equal(first["hq"], again["hq"])


def test_different_epochs_give_different_crops(hq_folder):
    ds = build({"type": "image_folder", "paths": [str(hq_folder)], "target_size": 32})
    assert not torch.equal(ds[(0, 1)]["hq"], ds[(1, 1)]["hq"])


def test_plain_int_key_means_epoch_zero(hq_folder):
    ds = build({"type": "image_folder", "paths": [str(hq_folder)], "target_size": 32})
    assert torch.equal(ds[3]["hq"], ds[(0, 3)]["hq"])


def test_seed_changes_the_items(hq_folder):
    ds = build({"type": "image_folder", "paths": [str(hq_folder)], "target_size": 32})
    before = ds[(0, 0)]["hq"]
    ds.seed = 1
    assert not torch.equal(before, ds[(0, 0)]["hq"])


def test_zero_and_two_workers_give_the_same_batches(hq_folder):
    ds = build({"type": "image_folder", "paths": [str(hq_folder)], "target_size": 32, "degradations": "real_esrgan"})
    batches = {}
    for workers in (0, 2):
        loader = build_loader(ds, batch_size=2, num_workers=workers, seed=5)
        iterator = iter(loader)
        batches[workers] = [next(iterator) for _ in range(3)]
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["hq"], b["hq"]) and a["path"] == b["path"]


# ------------------------------------------------------------------ image_folder
def test_image_folder_finds_images_recursively_in_sorted_order(hq_folder):
    (hq_folder / "notes.txt").write_text("not an image")
    ds = build({"type": "image_folder", "paths": [str(hq_folder)], "target_size": 32})
    names = [os.path.relpath(f, hq_folder) for f in ds.files]
    assert names == ["img0.png", "img1.png", "img2.png", "img3.png", os.path.join("sub", "deep.png")]


def test_image_folder_shapes_follow_target_size_and_scale(hq_folder):
    ds = build({"type": "image_folder", "paths": [str(hq_folder)], "target_size": 48, "scale": 4})
    item = ds[(0, 0)]
    assert item["hq"].shape == (3, 48, 48) and item["lq"].shape == (3, 12, 12)
    assert item["hq"].dtype == torch.float32 and 0 <= item["lq"].min() and item["lq"].max() <= 1


def test_image_folder_lq_is_the_downscaled_hq_crop(hq_folder):
    ds = build({"type": "image_folder", "paths": [str(hq_folder)], "target_size": 32, "scale": 2})
    item = ds[(0, 0)]
    block_means = item["hq"].reshape(3, 16, 2, 16, 2).mean(dim=(2, 4))
    # Random pixels make bicubic and box averages differ a little; a misaligned crop would differ a lot.
    assert (item["lq"] - block_means).abs().mean() < 0.06


def test_target_size_must_be_a_multiple_of_scale(hq_folder):
    with pytest.raises(ConfigError) as error:
        build({"type": "image_folder", "paths": [str(hq_folder)], "target_size": 30, "scale": 4})
    assert error.value.problems[0].path == "target_size"


def test_flips_and_rotations_produce_all_eight_orientations(tmp_path):
    # A 2x2 image cropped whole shows which of the 8 symmetries was applied.
    Image.fromarray(np.array([[[0] * 3, [60] * 3], [[120] * 3, [180] * 3]], np.uint8)).save(tmp_path / "a.png")
    ds = build({"type": "image_folder", "paths": [str(tmp_path / "a.png")], "target_size": 2, "scale": 1})
    seen = {tuple(ds[(epoch, 0)]["hq"][0].flatten().tolist()) for epoch in range(64)}
    assert len(seen) == 8


def test_skimage_prefix_names_single_bundled_photographs():
    ds = build({"type": "image_folder", "paths": ["skimage:coffee", "skimage:astronaut"], "target_size": 64})
    assert [os.path.basename(f) for f in ds.files] == ["coffee.png", "astronaut.png"]


def test_skimage_color_set_names_nine_rgb_photographs_that_exist():
    files = resolve_image_paths(["skimage:color"])
    assert len(files) == len(SKIMAGE_SETS["color"]) == 9
    assert all(os.path.isfile(f) and read_image(f).shape[2] == 3 for f in files)


def test_unknown_skimage_name_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError) as error:
        resolve_image_paths(["skimage:color", "skimage:cofee"])
    assert error.value.problems[0].path == "paths[1]" and "coffee" in str(error.value)


def test_empty_folder_is_a_config_error_naming_its_entry(tmp_path, hq_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as error:
        build({"type": "image_folder", "paths": [str(hq_folder), str(tmp_path / "empty")]})
    assert error.value.problems[0].path == "paths[1]"


def test_missing_path_is_a_config_error_naming_its_entry(tmp_path):
    with pytest.raises(ConfigError) as error:
        build({"type": "image_folder", "paths": [str(tmp_path / "nowhere")]})
    assert error.value.problems[0].path == "paths[0]" and "does not exist" in str(error.value)


def test_list_file_names_images_relative_to_itself(hq_folder):
    (hq_folder / "list.txt").write_text("# training images\nimg1.png\n\nsub/deep.png\n")
    files = resolve_image_paths([str(hq_folder / "list.txt")])
    assert [os.path.basename(f) for f in files] == ["img1.png", "deep.png"]


def test_a_list_whose_first_entry_does_not_exist_is_a_config_error_naming_the_line(hq_folder, tmp_path):
    # BasicSR's meta_info files ("NAME (H,W,C)", relative to the data root) are not our lists
    (tmp_path / "meta_info.txt").write_text("img1.png (80,96,3)\nimg2.png (80,96,3)\n")
    with pytest.raises(ConfigError) as error:
        resolve_image_paths([str(tmp_path / "meta_info.txt")])
    assert error.value.problems[0].path == "paths[0]"
    assert "line 1" in str(error.value) and "img1.png (80,96,3)" in str(error.value)


def test_a_path_that_is_a_file_but_not_an_image_is_a_config_error(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    with pytest.raises(ConfigError) as error:
        build({"type": "image_folder", "paths": [str(tmp_path / "data.zip")]})
    assert error.value.problems[0].path == "paths[0]" and "data.zip" in str(error.value)


def test_folder_index_cache_notices_a_new_file(hq_folder):
    assert len(resolve_image_paths([str(hq_folder)])) == 5
    save_rgb(hq_folder / "sub" / "new.png", 40, 40)
    assert len(resolve_image_paths([str(hq_folder)])) == 6


def test_folder_index_cache_is_reused_while_nothing_changed(hq_folder, tmp_path):
    resolve_image_paths([str(hq_folder)])
    [cache_file] = list((tmp_path / "cache" / "index").iterdir())
    cache_file.write_text(cache_file.read_text().replace("img0.png", "renamed.png"))
    # The cache (and not a new walk) answered: it still holds the edited name.
    assert "renamed.png" in [os.path.basename(f) for f in resolve_image_paths([str(hq_folder)])]


def count_decodes(monkeypatch):
    from dlas.data import file_index

    names = []
    real = file_index.decode_image
    # a writable copy, as some decoders give (Pillow's arrays happen to be read-only already)
    monkeypatch.setattr(file_index, "decode_image", lambda name: names.append(name) or np.array(real(name)))
    return names


def test_image_folder_decodes_each_image_once_per_process_and_gives_the_same_items(hq_folder, monkeypatch):
    decoded = count_decodes(monkeypatch)
    cfg = {"type": "image_folder", "paths": [str(hq_folder)], "target_size": 32}
    cached, uncached = build(cfg), build({**cfg, "cache_mb": 0})
    for epoch in range(3):
        for index in range(len(cached)):
            a, b = cached[(epoch, index)], uncached[(epoch, index)]
            assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["hq"], b["hq"])
    assert len(decoded) == 5 + 15  # the cached dataset decoded each of its 5 files once; the other every time
    with pytest.raises(ValueError, match="read-only"):  # a dataset writing into a cached image fails loudly
        cached.files.decode(cached.files[0])[0, 0] = 0


def test_the_decoded_image_cache_keeps_what_fits_its_budget(hq_folder, monkeypatch):
    decoded = count_decodes(monkeypatch)
    files = resolve_image_paths([str(hq_folder)])
    files.cache_decoded(2.5 * 80 * 96 * 3 / 2**20)  # two of the 80 x 96 images fit, not three
    for _ in range(2):
        for name in files:
            files.decode(name)
    assert len(decoded) == 5 + 3 and sum(a.nbytes for a in files._decoded.values()) <= files.cache_bytes


def test_a_negative_cache_budget_is_a_config_error_naming_cache_mb(hq_folder):
    with pytest.raises(ConfigError, match="cache_mb"):
        build({"type": "image_folder", "paths": [str(hq_folder)], "cache_mb": -1})


# ------------------------------------------------------------------ paired_folder
@pytest.fixture
def pairs(tmp_path):
    hq_dir, lq_dir = tmp_path / "pair_hq", tmp_path / "pair_lq"
    hq_dir.mkdir()
    lq_dir.mkdir()
    for i in range(3):
        hq = np.random.default_rng(i).integers(0, 256, (64, 48, 3), dtype=np.uint8)
        Image.fromarray(hq).save(hq_dir / f"{i:04d}.png")
        # An exact box-downscaled partner, so alignment can be checked pixel by pixel.
        lq = hq.reshape(16, 4, 12, 4, 3).astype(np.float64).mean(axis=(1, 3))
        np.save(lq_dir / f"{i:04d}x4.npy", lq)
        Image.fromarray(np.rint(lq).astype(np.uint8)).save(lq_dir / f"{i:04d}x4.png")
    return lq_dir, hq_dir


def test_paired_crops_are_aligned_at_the_scale(pairs):
    lq_dir, hq_dir = pairs
    ds = build({"type": "paired_folder", "lq_path": str(lq_dir), "hq_path": str(hq_dir), "scale": 4,
                "target_size": 32, "lq_suffix": "x4"})
    for epoch in range(4):
        item = ds[(epoch, 1)]
        assert item["hq"].shape == (3, 32, 32) and item["lq"].shape == (3, 8, 8)
        block_means = item["hq"].reshape(3, 8, 4, 8, 4).mean(dim=(2, 4))
        assert (item["lq"] - block_means).abs().max() <= 0.5 / 255 + 1e-6


def test_paired_whole_images_without_target_size(pairs):
    lq_dir, hq_dir = pairs
    ds = build({"type": "paired_folder", "lq_path": str(lq_dir), "hq_path": str(hq_dir), "target_size": None,
                "lq_suffix": "x4"})
    item = ds[0]
    assert item["hq"].shape == (3, 64, 48) and item["lq"].shape == (3, 16, 12)


def test_paired_mismatched_sizes_raise_a_data_error_naming_the_pair(pairs):
    lq_dir, hq_dir = pairs
    save_rgb(hq_dir / "0002.png", 60, 48)  # no longer 4x its LQ partner
    ds = build({"type": "paired_folder", "lq_path": str(lq_dir), "hq_path": str(hq_dir), "lq_suffix": "x4",
                "target_size": 16})
    with pytest.raises(DataError) as error:
        ds[(0, 2)]
    message = str(error.value)
    assert "0002.png" in message and "0002x4.png" in message


def test_paired_hq_without_lq_partner_is_a_config_error(pairs):
    lq_dir, hq_dir = pairs
    with pytest.raises(ConfigError) as error:
        build({"type": "paired_folder", "lq_path": str(lq_dir), "hq_path": str(hq_dir)})  # lq_suffix missing
    assert error.value.problems[0].path == "hq_path" and "lq_suffix" in str(error.value)


def test_paired_hq_files_sharing_a_stem_are_a_config_error_not_a_silent_wrong_pair(pairs):
    lq_dir, hq_dir = pairs
    (hq_dir / "other").mkdir()
    save_rgb(hq_dir / "other" / "0001.png", 64, 48, seed=7)  # a different picture, no LQ of its own
    with pytest.raises(ConfigError) as error:
        build({"type": "paired_folder", "lq_path": str(lq_dir), "hq_path": str(hq_dir), "lq_suffix": "x4"})
    assert error.value.problems[0].path == "hq_path" and "0001" in str(error.value)


# ------------------------------------------------------------------ single_image
def test_single_image_crops_hq_to_a_multiple_of_scale(tmp_path):
    save_rgb(tmp_path / "a.png", 77, 103)
    item = build({"type": "single_image", "paths": [str(tmp_path)], "scale": 4})[0]
    assert item["hq"].shape == (3, 76, 100) and item["lq"].shape == (3, 19, 25)


def test_single_image_force_multiple_number(tmp_path):
    save_rgb(tmp_path / "a.png", 77, 103)
    item = build({"type": "single_image", "paths": [str(tmp_path)], "scale": 4, "force_multiple": 12})[0]
    assert item["hq"].shape == (3, 72, 96) and item["lq"].shape == (3, 18, 24)


def test_single_image_without_force_multiple_rejects_odd_sizes(tmp_path):
    save_rgb(tmp_path / "a.png", 77, 103)
    ds = build({"type": "single_image", "paths": [str(tmp_path)], "force_multiple": False})
    with pytest.raises(DataError, match="a.png"):
        ds[0]


def test_single_image_is_the_same_in_every_epoch():
    ds = build({"type": "single_image", "paths": ["skimage:chelsea"], "degradations": "real_esrgan"})
    assert torch.equal(ds[(0, 0)]["lq"], ds[(5, 0)]["lq"])


# ------------------------------------------------------------------ conversions
def test_grayscale_becomes_three_equal_channels(tmp_path):
    Image.fromarray(np.full((8, 8), 200, np.uint8), "L").save(tmp_path / "g.png")
    image = read_image(str(tmp_path / "g.png"))
    assert image.shape == (8, 8, 3) and np.allclose(image, 200 / 255)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red...
    rgba[:2, :, 3] = 255  # ...opaque in the top half, fully transparent below
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image(str(tmp_path / "a.png"))
    assert np.allclose(image[0, 0], [1, 0, 0]) and np.allclose(image[3, 3], [1, 1, 1])


def test_palette_image_gives_its_palette_colours(tmp_path):
    image = Image.new("P", (4, 4))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 2), 1)
    image.save(tmp_path / "p.png")
    array = read_image(str(tmp_path / "p.png"))
    assert np.allclose(array[2, 1] * 255, [10, 200, 30]) and np.allclose(array[0, 0], 0)


def test_16_bit_grayscale_keeps_its_precision(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "g16.png"), np.full((4, 4), 1000, np.uint16))
    image = read_image(str(tmp_path / "g16.png"))
    assert image.shape == (4, 4, 3) and np.allclose(image, 1000 / 65535, atol=1e-7)


def test_16_bit_color_keeps_its_precision_and_channel_order(tmp_path):
    import cv2

    bgr = np.zeros((4, 4, 3), np.uint16)
    bgr[..., 2] = 1000  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "c16.png"), bgr)
    image = read_image(str(tmp_path / "c16.png"))
    assert np.allclose(image[0, 0], [1000 / 65535, 0, 0], atol=1e-7)


# ------------------------------------------------------------------ bad files
@pytest.fixture
def folder_with_bad_files(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        save_rgb(folder / f"good{i}.png", 40, 40, seed=i)
    save_rgb(folder / "truncated.png", 40, 40)
    data = (folder / "truncated.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "truncated.jpg", quality=90)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero.png").write_bytes(b"")
    save_rgb(folder / "small.png", 16, 16)
    return folder


BAD_NAMES = {"truncated.png", "truncated.jpg", "zero.png", "small.png"}


def test_bad_files_are_skipped_counted_and_warned_once(folder_with_bad_files, caplog):
    ds = build({"type": "image_folder", "paths": [str(folder_with_bad_files)], "target_size": 32})
    with caplog.at_level(logging.WARNING, logger="dlas"):
        items = [ds[(epoch, i)] for epoch in range(2) for i in range(len(ds))]
    assert all(os.path.basename(item["path"]).startswith("good") for item in items)
    assert all(item["hq"].shape == (3, 32, 32) for item in items)
    assert ds.bad_count == 4
    warned = [r.getMessage() for r in caplog.records if r.name == "dlas"]
    assert len(warned) == 4 and all(any(name in m for m in warned) for name in BAD_NAMES)


def test_replacement_of_a_bad_file_is_deterministic(folder_with_bad_files):
    ds = build({"type": "image_folder", "paths": [str(folder_with_bad_files)], "target_size": 32})
    other = build({"type": "image_folder", "paths": [str(folder_with_bad_files)], "target_size": 32})
    bad_index = [os.path.basename(f) for f in ds.files].index("zero.png")
    ds[(0, bad_index)]  # first meeting: decoded and found bad; second: skipped without decoding
    assert torch.equal(ds[(0, bad_index)]["hq"], other[(0, bad_index)]["hq"])


def test_bad_files_found_by_workers_are_counted_in_the_main_process(folder_with_bad_files):
    ds = build({"type": "image_folder", "paths": [str(folder_with_bad_files)], "target_size": 32})
    loader = build_loader(ds, batch_size=7, num_workers=2, shuffle=False, training=False)
    batches = list(loader)
    assert sum(len(b["path"]) for b in batches) == 7
    assert ds.bad_count >= 4


@pytest.mark.parametrize("name", sorted(BAD_NAMES))
def test_on_bad_image_error_raises_a_data_error_naming_the_file(folder_with_bad_files, name):
    ds = build({"type": "image_folder", "paths": [str(folder_with_bad_files)], "target_size": 32,
                "on_bad_image": "error"})
    index = [os.path.basename(f) for f in ds.files].index(name)
    with pytest.raises(DataError) as error:
        ds[(0, index)]
    assert error.value.problems[0].path.endswith(name)


def test_a_folder_of_only_bad_files_stops_with_a_data_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"not a png")
    ds = build({"type": "image_folder", "paths": [str(tmp_path)], "target_size": 32})
    with pytest.raises(DataError, match="unusable images in a row"):
        ds[(0, 0)]


def test_a_dataset_survives_pickling_with_its_bad_count(folder_with_bad_files):
    import pickle

    ds = build({"type": "image_folder", "paths": [str(folder_with_bad_files)], "target_size": 32})
    for i in range(len(ds)):
        ds[(0, i)]
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.bad_count == ds.bad_count == 4 and torch.equal(copy[(0, 1)]["hq"], ds[(0, 1)]["hq"])
