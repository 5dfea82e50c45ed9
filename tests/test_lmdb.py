"""LMDB image data: BasicSR's layout read as it is, scripts/make_lmdb.py, and training on both that resumes exactly."""
from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dlas import checkpoint as ckpt
from dlas.config import resolve_config
from dlas.data.image_file import read_image
from dlas.data.sampler import build_loader
from dlas.errors import ConfigError, DataError
from dlas.registry import DATASETS
from dlas.trainer.run import train

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A script of scripts/ as a module, so a test calls its main() without a new interpreter."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so its functions pickle into worker processes
    spec.loader.exec_module(module)
    return module


def random_images(folder: Path, count: int = 4, size: tuple[int, int] = (24, 32),
                  seed: int = 0) -> dict[str, np.ndarray]:
    """``count`` random RGB PNGs ``im0.png ...`` in ``folder``; returns name -> pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = {}
    for i in range(count):
        images[f"im{i}.png"] = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(images[f"im{i}.png"]).save(folder / f"im{i}.png")
    return images


def write_basicsr_lmdb(folder: Path, images: dict[str, np.ndarray], meta_extra: tuple[str, ...] = (),
                       raw_values: dict[str, bytes] | None = None) -> Path:
    """An LMDB exactly as BasicSR's create_lmdb writes one: key = name without extension, value = OpenCV PNG of
    the BGR image at compression 1, meta_info.txt lines 'NAME.png (H,W,C) 1'."""
    env = lmdb.open(str(folder), map_size=2**26)
    lines = []
    with env.begin(write=True) as txn:
        for name, rgb in images.items():
            key = name.rsplit(".", 1)[0]
            _, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
            txn.put(key.encode("ascii"), (raw_values or {}).get(name, png.tobytes()))
            lines.append(f"{key}.png ({rgb.shape[0]},{rgb.shape[1]},{rgb.shape[2]}) 1\n")
    env.close()
    (folder / "meta_info.txt").write_text("".join(lines) + "".join(meta_extra))
    return folder


# ------------------------------------------------------------------ reading BasicSR's layout
def test_a_basicsr_lmdb_gives_the_images_it_holds_named_by_folder_and_name(tmp_path):
    folder = write_basicsr_lmdb(tmp_path / "hr.lmdb", random_images(tmp_path / "src", count=3))
    dataset = DATASETS.build({"type": "single_image", "paths": [str(folder)], "scale": 4}, "val")
    assert list(dataset.files) == [f"{folder}/im{i}.png" for i in range(3)]
    for index in range(3):
        item = dataset[index]
        assert item["path"] == f"{folder}/im{index}.png"
        source = read_image(str(tmp_path / "src" / f"im{index}.png"))
        assert np.array_equal(item["hq"].numpy().transpose(1, 2, 0), source)


def test_paired_folder_pairs_lq_and_hq_lmdbs_by_stem(tmp_path):
    hq = {f"{i:04d}.png": np.full((16, 16, 3), 10 * i, np.uint8) for i in range(1, 4)}
    lq = {f"{i:04d}x4.png": np.full((4, 4, 3), 10 * i, np.uint8) for i in range(1, 4)}
    dataset = DATASETS.build({"type": "paired_folder", "hq_path": str(write_basicsr_lmdb(tmp_path / "hr.lmdb", hq)),
                              "lq_path": str(write_basicsr_lmdb(tmp_path / "lr.lmdb", lq)), "lq_suffix": "x4",
                              "target_size": 8}, "train")
    item = dataset[(0, 1)]
    assert item["path"].endswith("hr.lmdb/0002.png") and item["lq_path"].endswith("lr.lmdb/0002x4.png")
    assert item["lq"].shape == (3, 2, 2) and item["hq"].shape == (3, 8, 8)
    assert torch.allclose(item["hq"], torch.tensor(20 / 255)) and torch.allclose(item["lq"], torch.tensor(20 / 255))


def test_a_key_in_meta_info_missing_from_the_database_is_an_error_naming_both(tmp_path):
    folder = write_basicsr_lmdb(tmp_path / "hr.lmdb", random_images(tmp_path / "src", count=2),
                                meta_extra=("0042_s007.png (480,480,3) 1\n",))
    with pytest.raises(DataError) as error:
        DATASETS.build({"type": "image_folder", "paths": [str(folder)]}, "train")
    message = str(error.value)
    assert "meta_info.txt lists '0042_s007.png'" in message and "data.mdb has no key '0042_s007'" in message
    assert str(folder) in message and "1 of 3" in message


def test_a_malformed_meta_info_line_is_a_config_error_naming_the_line(tmp_path):
    folder = write_basicsr_lmdb(tmp_path / "hr.lmdb", random_images(tmp_path / "src", count=1),
                                meta_extra=("0002.png 480x480x3 1\n",))
    with pytest.raises(ConfigError, match=r"meta_info.txt line 2: expected 'NAME \(H,W,C\) LEVEL'"):
        DATASETS.build({"type": "image_folder", "paths": [str(folder)]}, "train")


def test_an_lmdb_without_meta_info_is_refused_as_unfinished(tmp_path):
    folder = write_basicsr_lmdb(tmp_path / "hr.lmdb", random_images(tmp_path / "src", count=1))
    (folder / "meta_info.txt").unlink()
    with pytest.raises(ConfigError, match="has no meta_info.txt.*run it again"):
        DATASETS.build({"type": "image_folder", "paths": [str(folder)]}, "train")


def test_an_undecodable_image_in_an_lmdb_is_skipped_and_counted(tmp_path, caplog):
    images = random_images(tmp_path / "src", count=3, size=(32, 32))
    folder = write_basicsr_lmdb(tmp_path / "hr.lmdb", images, raw_values={"im1.png": b"\x89PNG\r\n\x1a\ntruncated"})
    dataset = DATASETS.build({"type": "image_folder", "paths": [str(folder)], "target_size": 16}, "train")
    logging.getLogger("dlas").addHandler(caplog.handler)  # the dlas logger does not propagate to pytest's
    try:
        item = dataset[(0, 1)]
    finally:
        logging.getLogger("dlas").removeHandler(caplog.handler)
    assert item["path"] != f"{folder}/im1.png" and dataset.bad_count == 1
    assert any(f"skipping {folder}/im1.png" in record.getMessage() for record in caplog.records)


def test_without_the_lmdb_package_an_lmdb_path_names_the_extra(tmp_path, monkeypatch):
    folder = write_basicsr_lmdb(tmp_path / "hr.lmdb", random_images(tmp_path / "src", count=1))
    monkeypatch.setitem(sys.modules, "lmdb", None)  # what `import lmdb` meets when the package is absent
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[lmdb\]"'):
        DATASETS.build({"type": "image_folder", "paths": [str(folder)]}, "train")


# ------------------------------------------------------------------ scripts/make_lmdb.py
@pytest.fixture(scope="module")
def made_lmdb(tmp_path_factory):
    """A source folder (8-bit RGB, gray, RGBA, 16-bit RGB, a JPEG, one broken file) and make_lmdb.py's LMDB of it."""
    tmp = tmp_path_factory.mktemp("made")
    images = random_images(tmp / "src", count=3, size=(32, 40))
    rng = np.random.default_rng(5)
    (tmp / "src" / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 40), dtype=np.uint8)).save(tmp / "src" / "sub" / "gray.png")
    Image.fromarray(rng.integers(0, 256, (32, 40, 4), dtype=np.uint8)).save(tmp / "src" / "sub" / "alpha.png")
    deep = rng.integers(0, 65536, (32, 40, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp / "src" / "deep.png"), deep)
    Image.fromarray(images["im0.png"]).save(tmp / "src" / "photo.jpg", quality=90)
    (tmp / "src" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    code = load_script("make_lmdb").main([str(tmp / "src"), str(tmp / "made.lmdb"), "--workers", "1"])
    return tmp, code


def test_make_lmdb_stores_every_readable_image_losslessly_in_basicsr_layout(made_lmdb, capsys):
    tmp, code = made_lmdb
    assert code == 1  # broken.png could not be read: left out and reported
    lines = (tmp / "made.lmdb" / "meta_info.txt").read_text().splitlines()
    assert lines == ["deep.png (32,40,3) 1", "im0.png (32,40,3) 1", "im1.png (32,40,3) 1", "im2.png (32,40,3) 1",
                     "photo.png (32,40,3) 1", "sub/alpha.png (32,40,4) 1", "sub/gray.png (32,40,1) 1"]
    dataset = DATASETS.build({"type": "single_image", "paths": [str(tmp / "made.lmdb")], "scale": 1}, "val")
    sources = ["deep.png", "im0.png", "im1.png", "im2.png", "photo.jpg", "sub/alpha.png", "sub/gray.png"]
    for index, source in enumerate(sources):  # 16-bit, alpha (composited on white) and gray come back exactly
        assert np.array_equal(dataset[index]["hq"].numpy().transpose(1, 2, 0), read_image(str(tmp / "src" / source)))


def test_make_lmdb_resumes_an_interrupted_database_without_rewriting_it(made_lmdb, capsys):
    tmp, _ = made_lmdb
    copy = Path(shutil.copytree(tmp / "made.lmdb", tmp / "copy.lmdb"))
    env = lmdb.open(str(copy), map_size=2**26)  # as if killed after committing all but one image
    with env.begin(write=True) as txn:
        txn.delete(b"im2")
    env.close()
    (tmp / "src" / "broken.png").unlink()
    assert load_script("make_lmdb").main([str(tmp / "src"), str(copy), "--workers", "1"]) == 0
    assert "7 images -> 1 written, 6 already present, 0 skipped; 7 verified" in capsys.readouterr().out
    assert (copy / "meta_info.txt").read_text() == (tmp / "made.lmdb" / "meta_info.txt").read_text()


# ------------------------------------------------------------------ training and resuming
def training_config(name: str, root: Path, dataset: dict, niter: int, workers: int = 0, source: str = "lq") -> dict:
    """A tiny run: ``test_conv`` (same-size in and out) learns ``hq`` from ``source`` on ``dataset``, EMA on."""
    return {"name": name, "seed": 5, "imports": ["trainer_components"],
            "datasets": {"train": {**dataset, "batch_size": 2, "num_workers": workers, "shuffle": True}},
            "networks": {"gen": {"type": "test_conv", "nf": 4}},
            "steps": {"gen": {"training": ["gen"], "optimizer": {"type": "adam", "lr": 1e-2},
                              "injectors": {"g": {"type": "generator", "network": "gen", "in": source, "out": "fake"}},
                              "losses": {"pix": {"type": "pix", "criterion": "l1", "real": "hq", "fake": "fake"}}}},
            "train": {"niter": niter, "ema": {"rate": 0.9, "networks": ["gen"]}},
            "logger": {"print_freq": 1, "save_checkpoint_freq": 3, "tensorboard": False},
            "path": {"root": str(root)}}


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = ckpt.checkpoint_root(run_dir) / str(step)
    return {f"{f.stem}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_resumes_exactly(tmp: Path, dataset: dict, workers: int = 0, source: str = "lq") -> None:
    """Training to 3, then resuming to 6, gives the weights (raw and EMA) of training to 6 in one go."""
    runs = tmp / "experiments"
    train(resolve_config(training_config("whole", runs, dataset, 6, workers, source)), runs / "whole")
    train(resolve_config(training_config("split", runs, dataset, 3, workers, source)), runs / "split")
    assert [step for step, _ in ckpt.list_checkpoints(runs / "split")] == [3]
    train(resolve_config(training_config("split", runs, dataset, 6, workers, source)), runs / "split")
    whole, split = final_weights(runs / "whole", 6), final_weights(runs / "split", 6)
    assert whole.keys() == split.keys() and {"gen", "gen_ema"} <= {k.split("/")[0] for k in whole}
    differing = [key for key in whole if not torch.equal(whole[key], split[key])]
    assert not differing, differing


def test_loader_workers_open_their_own_reader_of_an_lmdb_the_main_process_reads(made_lmdb):
    tmp, _ = made_lmdb
    dataset = DATASETS.build({"type": "image_folder", "paths": [str(tmp / "made.lmdb")], "target_size": 16,
                              "scale": 1}, "train")
    first = dataset[(0, 0)]["hq"]  # the main process's reader is open now, and the worker inherits it
    batch = next(iter(build_loader(dataset, 2, num_workers=1, shuffle=False, training=False)))
    assert torch.equal(batch["hq"][0], first)


def test_training_on_a_made_lmdb_resumes_exactly(made_lmdb, tmp_path, one_torch_thread):
    tmp, _ = made_lmdb
    assert_resumes_exactly(tmp_path, {"type": "image_folder", "paths": [str(tmp / "made.lmdb")], "target_size": 16,
                                      "scale": 1})


def test_training_on_a_basicsr_lmdb_resumes_exactly(tmp_path, one_torch_thread):
    folder = write_basicsr_lmdb(tmp_path / "hr.lmdb", random_images(tmp_path / "src", count=5, size=(24, 24)))
    assert_resumes_exactly(tmp_path, {"type": "image_folder", "paths": [str(folder)], "target_size": 16, "scale": 1})
