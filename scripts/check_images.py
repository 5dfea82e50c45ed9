"""Scan image folders for files that would be skipped or silently converted during training.

    python scripts/check_images.py DIR [DIR ...] [--min-size 128] [--workers 8]

Reports, one line per file:
  unreadable   zero bytes, truncated or not an image (training skips it with a warning)
  too small    a side below --min-size, e.g. the training target_size (training skips it)
  odd mode     not 8-bit RGB: grayscale, palette, alpha, 16-bit, CMYK... (training converts it; see
               docs/data.md; re-save as RGB to be sure of what the network sees)
Ends with a summary. Exit codes: 0 every image fine, 1 some problems found, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from dlas.data.file_index import list_folder

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check(job: tuple[str, int]) -> tuple[str, str, str]:
    """(file, category, detail) with category '' for a fine image."""
    path, min_size = job
    try:
        if os.path.getsize(path) == 0:
            return path, "unreadable", "file is empty (0 bytes)"
    except OSError as exc:  # a dangling symlink, a file deleted meanwhile, no permission
        return path, "unreadable", f"cannot open: {exc.strerror or exc}"
    try:
        with Image.open(path) as image:
            image.load()  # a truncated file only fails when decoded completely
            mode, (width, height) = image.mode, image.size
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        return path, "unreadable", str(exc) or type(exc).__name__
    if min(width, height) < min_size:
        return path, "too small", f"{width}x{height}, below --min-size {min_size}"
    if mode == "RGB" and _is_16bit_png(path):
        mode = "RGB 16-bit"
    if mode != "RGB":
        return path, "odd mode", f"mode {mode} ({width}x{height})"
    return path, "", ""


def _is_16bit_png(path: str) -> bool:
    with open(path, "rb") as file:
        header = file.read(26)
    return len(header) == 26 and header[:8] == _PNG_SIGNATURE and header[24] == 16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="image folders (searched recursively)")
    parser.add_argument("--min-size", type=int, default=0, help="smallest acceptable side in pixels (default 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing or args.min_size < 0 or args.workers < 1:
        reason = f"folder '{missing[0]}' does not exist" if missing else "--min-size must be >= 0, --workers >= 1"
        print(f"check_images: {reason}", file=sys.stderr)
        return 2
    files = [f for folder in args.folders for f in list_folder(folder, use_cache=False)]
    if not files:
        print(f"check_images: no images in {', '.join(args.folders)}", file=sys.stderr)
        return 2
    results = []
    with Pool(args.workers) as pool:
        jobs = [(f, args.min_size) for f in files]
        for result in tqdm(pool.imap_unordered(check, jobs, chunksize=16), total=len(jobs), unit="image",
                           disable=True if len(jobs) < 100 else None, file=sys.stderr):
            results.append(result)
    problems = sorted(r for r in results if r[1])
    for path, category, detail in problems:
        print(f"{category:<11} {path}: {detail}")
    counts = {c: sum(1 for r in problems if r[1] == c) for c in ("unreadable", "too small", "odd mode")}
    summary = ", ".join(f"{n} {c}" for c, n in counts.items())
    print(f"checked {len(files)} images: {len(files) - len(problems)} fine, {summary}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
