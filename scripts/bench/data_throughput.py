"""Images per second of ``image_folder`` with 0, 1 and 2 loader workers.

    python scripts/bench/data_throughput.py [--samples 256] [--batch-size 16] [--workers 0 1 2]
                                            [--degradations real_esrgan bicubic] [--paths skimage:color]

Default data: the nine RGB photographs bundled with scikit-image (300x451 to 1411x1411 pixels), 128-pixel HQ
crops at scale 4, once with Real-ESRGAN's second-order chain and once with plain bicubic downscaling. Each
measurement first loads one batch (worker start-up is not counted), then times ``--samples`` samples. The
whole image is decoded for every crop, so numbers on pre-tiled data (scripts/extract_subimages.py) are higher.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from dlas.data.sampler import build_loader
from dlas.errors import UserError
from dlas.registry import DATASETS


def measure(paths: list[str], degradations: str, workers: int, samples: int, batch_size: int) -> float:
    dataset = DATASETS.build({"type": "image_folder", "paths": paths, "target_size": 128, "scale": 4,
                              "degradations": degradations})
    loader = build_loader(dataset, batch_size=batch_size, num_workers=workers, seed=0, pin_memory=False)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    seen = 0
    while seen < samples:
        seen += len(next(batches)["path"])
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", nargs="+", default=["skimage:color"], help="image folders or skimage: sets")
    parser.add_argument("--samples", type=int, default=256, help="samples timed per measurement (default 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (default 0 1 2)")
    parser.add_argument("--degradations", nargs="+", default=["real_esrgan", "bicubic"],
                        help="degradation presets to compare (default real_esrgan bicubic)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.samples < 1 or args.batch_size < 1 or min(args.workers) < 0:
        print("data_throughput: --samples and --batch-size must be >= 1, --workers >= 0", file=sys.stderr)
        return 2
    # Keep the benchmark's folder-index cache out of the user's cache.
    os.environ.setdefault("DLAS_CACHE_DIR", tempfile.mkdtemp(prefix="dlas_bench_"))
    print(f"image_folder, target_size 128, scale 4, batch {args.batch_size}, {args.samples} samples, "
          f"{os.cpu_count()} CPU cores, data {' '.join(args.paths)}")
    print(f"{'degradations':<14}" + "".join(f"{f'{w} workers':>12}" for w in args.workers))
    for degradations in args.degradations:
        try:
            rates = [measure(args.paths, degradations, w, args.samples, args.batch_size) for w in args.workers]
        except UserError as exc:  # a missing folder, an unknown preset
            print(f"data_throughput: {exc.problems[0]}", file=sys.stderr)
            return 2
        print(f"{degradations:<14}" + "".join(f"{rate:>9.1f} /s" for rate in rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
