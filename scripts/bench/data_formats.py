"""Image folder vs LMDB vs tar shards: items/s on the same images, packing times, and opening costs at scale.

    python scripts/bench/data_formats.py [--samples 300] [--tile 192] [--keys 100000] [--json PATH]

Data: scikit-image's nine RGB photographs cut into ``--tile`` pixel PNG tiles (a DIV2K sub-image folder in
miniature), each with a side-car caption. The same tiles are packed with scripts/make_lmdb.py and
scripts/make_shards.py, then read with no loader workers by ``image_folder`` on the folder and on the LMDB
(scale 1, no flips: decode + 128-pixel crop) and by ``tar_shards`` (128-pixel crop at the stored size). The
ratios are measured in the same run, round-robin over ``--rounds`` rounds, so a busy machine affects all
three alike. The scale part times opening an LMDB of ``--keys`` keys (meta_info.txt parsed, every key checked
against the database) and indexing a shard of as many samples, then opening it again from its cached index.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np

from dlas.data.file_index import resolve_image_paths
from dlas.data.image_file import read_image, write_image
from dlas.registry import DATASETS

ROOT = Path(__file__).resolve().parents[2]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its worker functions pickle by module name
    spec.loader.exec_module(module)
    return module


def make_tiles(folder: Path, tile: int) -> int:
    folder.mkdir(parents=True)
    count = 0
    for file in resolve_image_paths(["skimage:color"], cache_index=False):
        image = read_image(file)
        for top in range(0, image.shape[0] - tile + 1, tile):
            for left in range(0, image.shape[1] - tile + 1, tile):
                name = f"{Path(file).stem}_{top:04d}_{left:04d}"
                write_image(str(folder / f"{name}.png"), image[top:top + tile, left:left + tile])
                (folder / f"{name}.txt").write_text(f"part of the {Path(file).stem} photograph\n")
                count += 1
    return count


def timed(function, *args) -> float:
    start = time.perf_counter()
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # the scripts' progress bars
        function(*args)
    return time.perf_counter() - start


def items_per_second(dataset, samples: int, rng: np.random.Generator) -> float:
    indices = rng.integers(0, len(dataset), samples)
    dataset[(0, 0)]  # opens files, databases and indexes before the clock starts
    start = time.perf_counter()
    for i, index in enumerate(indices):
        dataset[(1 + i // len(dataset), int(index))]
    return samples / (time.perf_counter() - start)


def scale_costs(tmp: Path, keys: int) -> dict[str, float]:
    """Seconds to open an LMDB of ``keys`` keys and to index / reopen a shard of ``keys`` samples."""
    import lmdb

    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, format="PNG")
    value = png.getvalue()
    folder = tmp / "big.lmdb"
    env = lmdb.open(str(folder), map_size=2**32)
    with env.begin(write=True) as txn:
        for i in range(keys):
            txn.put(f"{i:08d}".encode(), value)
    env.close()
    (folder / "meta_info.txt").write_text("".join(f"{i:08d}.png (4,4,3) 1\n" for i in range(keys)))
    start = time.perf_counter()
    DATASETS.build({"type": "single_image", "paths": [str(folder)], "scale": 1})
    lmdb_open = time.perf_counter() - start
    shard = tmp / "big.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(keys):
            for extension, data in (("png", value), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{i:08d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    start = time.perf_counter()
    DATASETS.build({"type": "tar_shards", "shards": str(shard)})
    index_build = time.perf_counter() - start
    start = time.perf_counter()
    DATASETS.build({"type": "tar_shards", "shards": str(shard)})
    index_cached = time.perf_counter() - start
    return {"lmdb_open_s": lmdb_open, "shard_index_build_s": index_build, "shard_index_cached_s": index_cached}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300, help="items read per format and round (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds (default 3)")
    parser.add_argument("--tile", type=int, default=192, help="tile side in pixels (default 192)")
    parser.add_argument("--keys", type=int, default=100_000, help="keys / samples of the scale part (default 100000)")
    parser.add_argument("--workers", type=int, default=2, help="processes of the packing scripts (default 2)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if min(args.samples, args.rounds, args.tile - 127, args.keys, args.workers) < 1:
        print("data_formats: --samples, --rounds, --keys, --workers must be >= 1 and --tile >= 128", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="dlas_bench_formats_"))
    os.environ.setdefault("DLAS_CACHE_DIR", str(tmp / "cache"))
    tiles = make_tiles(tmp / "tiles", args.tile)
    import lmdb  # noqa: F401  (imported here so that the packing times below are the scripts' work alone)
    import webdataset  # noqa: F401
    workers = ["--workers", str(args.workers)]
    pack = {"make_lmdb_s": timed(script("make_lmdb").main, [str(tmp / "tiles"), str(tmp / "tiles.lmdb"), *workers]),
            "make_shards_s": timed(script("make_shards").main, [str(tmp / "tiles"), str(tmp / "shards"),
                                                                "--per-shard", "50", *workers])}
    crop = {"target_size": 128, "scale": 1, "use_flip": False, "use_rot": False}
    datasets = {"folder": DATASETS.build({"type": "image_folder", "paths": [str(tmp / "tiles")], **crop}),
                "lmdb": DATASETS.build({"type": "image_folder", "paths": [str(tmp / "tiles.lmdb")], **crop}),
                "tar_shards": DATASETS.build({"type": "tar_shards", "shards": [str(tmp / "shards")],
                                              "target_size": 128, "resize": False})}
    rates: dict[str, list[float]] = {name: [] for name in datasets}
    for round_ in range(args.rounds):
        for name, dataset in datasets.items():
            rates[name].append(items_per_second(dataset, args.samples, np.random.default_rng(round_)))
    median = {name: float(np.median(values)) for name, values in rates.items()}
    scale = scale_costs(tmp, args.keys)
    load = os.getloadavg()
    print(f"{tiles} tiles of {args.tile}x{args.tile} px from skimage:color; {args.samples} random items x "
          f"{args.rounds} rounds, no loader workers; {os.cpu_count()} cores, load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'format':<12}{'items/s (median)':>18}{'vs folder':>11}   rounds")
    for name in datasets:
        print(f"{name:<12}{median[name]:>18.1f}{median[name] / median['folder']:>10.2f}x   "
              + " ".join(f"{r:.0f}" for r in rates[name]))
    print(f"packing {tiles} tiles with {args.workers} workers: make_lmdb.py {pack['make_lmdb_s']:.1f} s (with its "
          f"read-back), make_shards.py {pack['make_shards_s']:.1f} s")
    print(f"{args.keys} keys: LMDB open {scale['lmdb_open_s']:.2f} s; shard index built in "
          f"{scale['shard_index_build_s']:.2f} s, reopened from its cache in {scale['shard_index_cached_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"tiles": tiles, "tile": args.tile, "samples": args.samples,
                                               "rounds": rates, "median_items_per_s": median, **pack, **scale,
                                               "keys": args.keys, "loadavg": load}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
