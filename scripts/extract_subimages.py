"""Tile large images into overlapping crops (sub-images), the usual preparation of DIV2K/Flickr2K for SR.

    python scripts/extract_subimages.py INPUT_DIR OUTPUT_DIR --crop 480 --step 240 --thresh-size 0 --workers 8

Each image of INPUT_DIR (recursively) gives tiles ``STEM_s001.png``, ``STEM_s002.png``, ... in OUTPUT_DIR: a
``crop`` x ``crop`` window moved by ``step`` pixels; where the last window leaves more than ``thresh-size``
pixels uncovered at the right or bottom edge, one more window is added flush with the edge (so with the
default 0 the whole image is covered). Reading 480-pixel tiles instead of 2K images makes data loading
several times faster. Bit depth and alpha are kept (PNG output by default).

The script is resumable: a tile that already exists is not written again (tiles are written to a temporary
name and renamed, so an interrupted run leaves no half-written tile behind). Images smaller than the crop
are skipped and reported. Exit codes: 0 done, 1 some images could not be read, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from dlas.data.file_index import list_folder


def tile_origins(length: int, crop: int, step: int, thresh_size: int) -> list[int]:
    """Start offsets of the windows along one side of ``length`` pixels."""
    origins = list(range(0, length - crop + 1, step))
    if origins and length - (origins[-1] + crop) > thresh_size:
        origins.append(length - crop)
    return origins


def _is_truncated_jpeg(path: str) -> bool:
    if not path.lower().endswith((".jpg", ".jpeg")):
        return False
    with open(path, "rb") as file:
        file.seek(max(0, os.path.getsize(path) - 64))
        tail = file.read().rstrip(b"\x00\r\n ")  # some encoders pad after the marker
    return not tail.endswith(b"\xff\xd9")


def extract(job: tuple[str, str, str, int, int, int, str, int]) -> tuple[str, int, int, str]:
    """Tile one image; returns (file, tiles written, tiles already present, problem or '')."""
    path, output, stem, crop, step, thresh_size, ext, compression = job
    if _is_truncated_jpeg(path):
        # OpenCV decodes a truncated JPEG without error (the missing part gray); its tiles would be garbage.
        return path, 0, 0, "truncated JPEG (no end-of-image marker)"
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        return path, 0, 0, "unreadable"
    height, width = image.shape[:2]
    if height < crop or width < crop:
        return path, 0, 0, f"{width}x{height} is smaller than the crop {crop}"
    params = [cv2.IMWRITE_PNG_COMPRESSION, compression] if ext == ".png" else []
    written = present = 0
    index = 0
    for top in tile_origins(height, crop, step, thresh_size):
        for left in tile_origins(width, crop, step, thresh_size):
            index += 1
            target = os.path.join(output, f"{stem}_s{index:03d}{ext}")
            if os.path.exists(target):
                present += 1
                continue
            tile = np.ascontiguousarray(image[top:top + crop, left:left + crop])
            temporary = os.path.join(output, f".{stem}_s{index:03d}.tmp{os.getpid()}{ext}")
            try:
                if not cv2.imwrite(temporary, tile, params):
                    return path, written, present, f"could not write {target}"
            except cv2.error as exc:  # e.g. --ext same on a format OpenCV cannot write
                return path, written, present, f"could not write {target}: {str(exc).strip().splitlines()[-1]}"
            os.replace(temporary, target)
            written += 1
    return path, written, present, ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="folder of large images (searched recursively)")
    parser.add_argument("output", help="folder for the tiles (created if missing)")
    parser.add_argument("--crop", type=int, default=480, help="tile side in pixels (default 480)")
    parser.add_argument("--step", type=int, default=240, help="distance between tiles in pixels (default 240)")
    parser.add_argument("--thresh-size", type=int, default=0,
                        help="add an edge-flush tile when more than this many pixels remain uncovered (default 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--ext", default="png", help="tile format: png (default, lossless), or 'same' as input")
    parser.add_argument("--compression", type=int, default=3, help="PNG compression 0-9 (default 3: fast)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problems = []
    if not Path(args.input).is_dir():
        problems.append(f"input folder '{args.input}' does not exist")
    if args.crop < 1 or args.step < 1:
        problems.append(f"--crop and --step must be positive, got {args.crop} and {args.step}")
    if args.thresh_size < 0 or args.workers < 1 or not 0 <= args.compression <= 9:
        problems.append("--thresh-size must be >= 0, --workers >= 1 and --compression 0-9")
    if args.ext != "same" and not cv2.haveImageWriter("tile." + args.ext.lstrip(".")):
        problems.append(f"OpenCV cannot write '--ext {args.ext}' files; use png (lossless), jpg, webp, tif or same")
    if problems:
        print(f"extract_subimages: {'; '.join(problems)}", file=sys.stderr)
        return 2
    files = list_folder(args.input, use_cache=False)
    # An output folder inside the input one: a resumed run must not take the tiles it wrote for new images.
    output_root = os.path.realpath(args.output) + os.sep
    files = [f for f in files if not os.path.realpath(f).startswith(output_root)]
    if not files:
        print(f"extract_subimages: no images in '{args.input}'", file=sys.stderr)
        return 2
    jobs, source_of, clashes = [], {}, []
    for file in files:
        # Files of sub-folders get their folder in the tile name, so equal stems cannot collide.
        stem = os.path.splitext(os.path.relpath(file, args.input))[0].replace(os.sep, "_")
        ext = os.path.splitext(file)[1].lower() if args.ext == "same" else "." + args.ext.lstrip(".").lower()
        if (stem, ext) in source_of:  # the second image's tiles would be taken for the first's, "already present"
            clashes.append(f"'{source_of[stem, ext]}' and '{file}' (tiles {stem}_sNNN{ext})")
        source_of[stem, ext] = file
        jobs.append((file, args.output, stem, args.crop, args.step, args.thresh_size, ext, args.compression))
    if clashes:
        print(f"extract_subimages: images that would give the same tile names, rename one of each pair: "
              f"{'; '.join(clashes[:5])}{' ...' if len(clashes) > 5 else ''}", file=sys.stderr)
        return 2
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as exc:
        print(f"extract_subimages: cannot create the output folder '{args.output}': {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    written = present = 0
    failures = []
    with Pool(args.workers) as pool:
        for path, new, old, problem in tqdm(pool.imap_unordered(extract, jobs), total=len(jobs), unit="image",
                                                  disable=None):
            written, present = written + new, present + old
            if problem:
                failures.append(f"{path}: {problem}")
    for line in sorted(failures):
        print(f"skipped {line}", file=sys.stderr)
    print(f"{len(files)} images -> {written} tiles written, {present} already present, {len(failures)} skipped "
          f"(in {args.output})")
    return 1 if any(not f.endswith(f"smaller than the crop {args.crop}") for f in failures) else 0


if __name__ == "__main__":
    sys.exit(main())
