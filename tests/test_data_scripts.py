"""The data tools in scripts/, run as a user runs them (subprocesses on small temporary folders)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlas.data.image_file import read_image
from dlas.data.sampler import ResumableSampler
from dlas.registry import DATASETS

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, cwd=None, cache=None):
    env = dict(os.environ, DLAS_CACHE_DIR=str(cache or Path(cwd or ".") / ".cache"))
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def save_rgb(path, height, width, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


# ------------------------------------------------------------------ extract_subimages
def test_extract_subimages_tiles_cover_the_image_edge_to_edge(tmp_path):
    (tmp_path / "in").mkdir()
    pixels = save_rgb(tmp_path / "in" / "photo.png", 70, 100)
    result = run("extract_subimages.py", tmp_path / "in", tmp_path / "out", "--crop", 32, "--step", 24,
                 "--workers", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tiles = sorted(os.listdir(tmp_path / "out"))
    # rows start at 0, 24 and 38 (flush with the bottom), columns at 0, 24, 48 and 68 (flush with the right)
    assert len(tiles) == 12 and tiles[0] == "photo_s001.png" and tiles[-1] == "photo_s012.png"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "photo_s001.png")), pixels[:32, :32])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "photo_s012.png")), pixels[38:70, 68:100])


def test_extract_subimages_thresh_size_drops_a_thin_remainder(tmp_path):
    (tmp_path / "in").mkdir()
    save_rgb(tmp_path / "in" / "photo.png", 70, 100)
    result = run("extract_subimages.py", tmp_path / "in", tmp_path / "out", "--crop", 32, "--step", 24,
                 "--thresh-size", 16, "--workers", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(tmp_path / "out")) == 2 * 4  # the 14-pixel bottom strip is under the threshold


def test_extract_subimages_resumes_by_skipping_existing_tiles(tmp_path):
    (tmp_path / "in").mkdir()
    save_rgb(tmp_path / "in" / "photo.png", 70, 100)
    args = ["extract_subimages.py", tmp_path / "in", tmp_path / "out", "--crop", 32, "--step", 24, "--workers", 1]
    run(*args, cwd=tmp_path)
    (tmp_path / "out" / "photo_s005.png").unlink()
    again = run(*args, cwd=tmp_path)
    assert again.returncode == 0 and "1 tiles written, 11 already present" in again.stdout


def test_extract_subimages_skips_a_truncated_jpeg_and_exits_1(tmp_path):
    (tmp_path / "in").mkdir()
    save_rgb(tmp_path / "in" / "good.png", 40, 40)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in" / "cut.jpg")
    (tmp_path / "in" / "cut.jpg").write_bytes((tmp_path / "in" / "cut.jpg").read_bytes()[:300])
    result = run("extract_subimages.py", tmp_path / "in", tmp_path / "out", "--crop", 32, "--step", 32,
                 "--workers", 1, cwd=tmp_path)
    assert result.returncode == 1 and "cut.jpg: truncated JPEG" in result.stderr
    assert all(name.startswith("good_s") for name in os.listdir(tmp_path / "out"))


def test_extract_subimages_with_the_output_inside_the_input_never_tiles_its_own_tiles(tmp_path):
    (tmp_path / "in").mkdir()
    save_rgb(tmp_path / "in" / "photo.png", 70, 100)
    args = ["extract_subimages.py", tmp_path / "in", tmp_path / "in" / "tiles", "--crop", 32, "--step", 24,
            "--workers", 1]
    first = run(*args, cwd=tmp_path)
    again = run(*args, cwd=tmp_path)  # resuming: the tiles of the first run are now below the input folder
    assert first.returncode == 0 and again.returncode == 0, again.stderr
    assert "1 images -> 0 tiles written, 12 already present" in again.stdout
    assert len(os.listdir(tmp_path / "in" / "tiles")) == 12


def test_extract_subimages_missing_input_exits_2_with_one_line(tmp_path):
    result = run("extract_subimages.py", tmp_path / "nowhere", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "nowhere" in result.stderr


@pytest.mark.parametrize("extra", [[], ["--ext", "xyz"]])
def test_extract_subimages_an_unwritable_output_or_unknown_format_exits_2_with_one_line(tmp_path, extra):
    (tmp_path / "in").mkdir()
    save_rgb(tmp_path / "in" / "photo.png", 40, 40)
    (tmp_path / "afile").write_text("a file, not a folder")
    output = tmp_path / ("out" if extra else "afile")
    result = run("extract_subimages.py", tmp_path / "in", output, "--crop", 32, "--workers", 1, *extra, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ("xyz" if extra else "afile") in result.stderr


def test_extract_subimages_refuses_two_images_that_would_give_the_same_tile_names(tmp_path):
    (tmp_path / "in" / "a").mkdir(parents=True)
    save_rgb(tmp_path / "in" / "photo.png", 40, 40)
    save_rgb(tmp_path / "in" / "photo.jpg", 40, 40, seed=1)  # would be skipped as "already present"
    save_rgb(tmp_path / "in" / "a" / "b.png", 40, 40)
    save_rgb(tmp_path / "in" / "a_b.png", 40, 40)
    result = run("extract_subimages.py", tmp_path / "in", tmp_path / "out", "--crop", 32, "--workers", 1,
                 cwd=tmp_path)
    assert result.returncode == 2 and "photo.jpg" in result.stderr and "a_b.png" in result.stderr


# ------------------------------------------------------------------ check_images
def test_check_images_reports_each_problem_and_exits_1(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    save_rgb(folder / "good.png", 40, 40)
    save_rgb(folder / "small.png", 10, 40)
    Image.fromarray(np.zeros((40, 40), np.uint8), "L").save(folder / "gray.png")
    save_rgb(folder / "cut.png", 40, 40)
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:200])
    result = run("check_images.py", folder, "--min-size", 32, "--workers", 1, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("unreadable") and "cut.png" in line for line in lines)
    assert any(line.startswith("too small") and "small.png" in line for line in lines)
    assert any(line.startswith("odd mode") and "gray.png" in line and "mode L" in line for line in lines)
    assert not any("good.png" in line for line in lines)
    assert "checked 4 images: 1 fine, 1 unreadable, 1 too small, 1 odd mode" in result.stdout


def test_check_images_reports_a_dangling_symlink_as_unreadable(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    save_rgb(folder / "good.png", 40, 40)
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")  # e.g. a link into a dataset that moved
    result = run("check_images.py", folder, "--workers", 1, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert any(line.startswith("unreadable") and "gone.png" in line for line in result.stdout.splitlines())


def test_check_images_clean_folder_exits_0(tmp_path):
    save_rgb(tmp_path / "a.png", 40, 40)
    result = run("check_images.py", tmp_path, "--workers", 1, cwd=tmp_path)
    assert result.returncode == 0 and "1 fine" in result.stdout


def test_check_images_missing_folder_exits_2(tmp_path):
    result = run("check_images.py", tmp_path / "nowhere", cwd=tmp_path)
    assert result.returncode == 2 and "nowhere" in result.stderr


# ------------------------------------------------------------------ preview_degradations
@pytest.fixture
def preview_config(tmp_path):
    (tmp_path / "hq").mkdir()
    for i in range(3):
        save_rgb(tmp_path / "hq" / f"{i}.png", 48, 48, seed=i)
    config = tmp_path / "preview.yml"
    config.write_text(f"""name: preview_test
seed: 11
datasets:
  train:
    type: image_folder
    paths: [{tmp_path / 'hq'}]
    target_size: 32
    scale: 4
    degradations:
      - {{type: blur, sigma: [0.5, 2]}}
      - {{type: noise, gaussian: [1, 10]}}
      - {{type: jpeg, quality: [40, 90]}}
    batch_size: 2
""")
    return config


def test_preview_writes_the_pairs_training_would_see_first(tmp_path, preview_config):
    result = run("preview_degradations.py", "-opt", preview_config, "-n", 2, "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["000_hq.png", "000_lq.png", "000_side.png",
                                                    "001_hq.png", "001_lq.png", "001_side.png"]
    dataset = DATASETS.build({"type": "image_folder", "paths": [str(tmp_path / "hq")], "target_size": 32,
                              "degradations": [{"type": "blur", "sigma": [0.5, 2]},
                                               {"type": "noise", "gaussian": [1, 10]},
                                               {"type": "jpeg", "quality": [40, 90]}]})
    dataset.seed = 11
    first_key = next(iter(ResumableSampler(len(dataset), shuffle=True, seed=11)))
    expected = dataset[first_key]["lq"].permute(1, 2, 0).numpy()
    written = read_image(str(tmp_path / "out" / "000_lq.png"))
    assert written.shape == (8, 8, 3) and np.abs(written - expected).max() < 1e-6


def test_preview_override_reaches_the_dataset(tmp_path, preview_config):
    result = run("preview_degradations.py", "-opt", preview_config, "-n", 1, "--out", tmp_path / "out",
                 "datasets.train.target_size=16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_image(str(tmp_path / "out" / "000_hq.png")).shape == (16, 16, 3)


def test_preview_bad_degradation_exits_2_naming_the_key(tmp_path, preview_config):
    preview_config.write_text(preview_config.read_text().replace("type: jpeg", "type: jpg"))
    result = run("preview_degradations.py", "-opt", preview_config, "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2
    assert "datasets.train.degradations[2].type" in result.stderr and "jpeg" in result.stderr


def test_preview_an_unwritable_output_exits_2_with_one_line(tmp_path, preview_config):
    (tmp_path / "afile").write_text("a file, not a folder")
    result = run("preview_degradations.py", "-opt", preview_config, "-n", 1, "--out", tmp_path / "afile" / "out",
                 cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "afile" in result.stderr


# ------------------------------------------------------------------ throughput bench
def test_throughput_bench_prints_a_table(tmp_path):
    result = run("bench/data_throughput.py", "--samples", 4, "--batch-size", 2, "--workers", 0,
                 "--degradations", "bicubic", "--paths", "skimage:coffee", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = result.stdout.strip().splitlines()[-1].split()
    assert row[0] == "bicubic" and float(row[1]) > 0 and row[2] == "/s"


@pytest.mark.parametrize("bad", [["--paths", "nowhere"], ["--degradations", "bicubc"]])
def test_throughput_bench_bad_data_or_preset_exits_2_with_one_line(tmp_path, bad):
    result = run("bench/data_throughput.py", "--samples", 2, "--batch-size", 1, "--workers", 0, *bad, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert bad[1] in result.stderr
