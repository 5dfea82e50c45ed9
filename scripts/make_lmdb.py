"""Pack a folder of images into one LMDB in BasicSR's layout (data.mdb + meta_info.txt), which every image dataset
reads wherever it reads a folder.

    python scripts/make_lmdb.py DIV2K_train_HR_sub/ DIV2K_train_HR_sub.lmdb --workers 8

Clusters cap the number of files a job may have; an LMDB is one file however many images it holds. Each image
of INPUT (recursively; ``sub/0001.png`` gets the key ``sub/0001``) is decoded as the datasets decode files (EXIF
orientation applied; 16-bit and alpha kept) and stored as a lossless PNG at ``--compression`` (BasicSR's default
1: fast to write and to read), in sorted order. BasicSR's own tools and dataset classes read the result too.

Resumable: the database commits every ``--commit-every`` images, and a rerun (after Ctrl-C, a crash or adding
images) skips the keys it already holds. Then every stored image is read back and decoded by worker processes;
those written by this run must give exactly the pixels of their source. ``meta_info.txt`` is written last, from
what was read back, so an LMDB without it is an unfinished one (the datasets refuse it and say so). An image
that does not read back is deleted from the database (a rerun writes it again) and the run exits 1.

Exit codes: 0 done; 1 some source images could not be read (left out and listed) or did not verify; 2 bad
arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
import zlib
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from dlas.data.file_index import list_folder
from dlas.data.image_file import UnreadableImage, decode_image, decode_image_bytes
from dlas.data.lmdb_store import (
    DATA_FILE,
    META_FILE,
    database_keys,
    import_lmdb,
    meta_line,
    open_environment,
)
from dlas.errors import DataError, UserError

# One reader environment per verification worker (an LMDB environment must not cross a fork).
_reader: Any = None


def storable(array: np.ndarray) -> np.ndarray:
    """A decoded image as PNG stores it: 1, 3 or 4 channels of uint8 or uint16 (gray + alpha becomes RGBA)."""
    if array.dtype == np.int32:  # Pillow's "I" mode holds 16-bit data
        array = np.clip(array, 0, 65535).astype(np.uint16)
    elif array.dtype not in (np.uint8, np.uint16):
        array = np.clip(np.rint(array.astype(np.float64) * 65535), 0, 65535).astype(np.uint16)
    if array.shape[2] == 2:
        array = np.concatenate([array[:, :, :1]] * 3 + [array[:, :, 1:]], axis=2)
    return np.ascontiguousarray(array)


def png_parameters(compression: int) -> list[int]:
    """OpenCV's PNG options: the zlib level and, where OpenCV has the option, the 'sub' row filter only.

    With a level given, OpenCV 5 tries every PNG filter per row (Paeth too), which decodes about 30% slower than
    'sub' alone for a few percent smaller files; training decodes each image many times.
    """
    parameters = [cv2.IMWRITE_PNG_COMPRESSION, compression]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):
        parameters += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
    return parameters


def pixel_checksum(array: np.ndarray) -> int:
    return zlib.crc32(array.tobytes()) ^ zlib.crc32(repr((array.shape, array.dtype.str)).encode())


def encode(job: tuple[str, str, int]) -> tuple[str, bytes | None, int, str]:
    """Read and PNG-encode one image: (key, png bytes or None, pixel checksum, problem or '')."""
    path, key, compression = job
    try:
        array = storable(decode_image(path))
    except UnreadableImage as exc:
        return key, None, 0, f"{path}: {exc}"
    bgr = array if array.shape[2] == 1 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3
                                                          else cv2.COLOR_RGBA2BGRA)
    ok, png = cv2.imencode(".png", bgr, png_parameters(compression))
    if not ok:
        return key, None, 0, f"{path}: OpenCV could not encode it as PNG"
    return key, png.tobytes(), pixel_checksum(array), ""


def _open_reader(folder: str) -> None:
    global _reader
    _reader = open_environment(folder)


def read_back(key: str) -> tuple[str, tuple[int, int, int] | None, int, str]:
    """Decode one stored image: (key, (H, W, C) or None, pixel checksum, problem or '')."""
    with _reader.begin(buffers=False) as txn:
        value = txn.get(key.encode("ascii"))
    if value is None:
        return key, None, 0, "missing from the database"
    try:
        array = decode_image_bytes(value)
    except UnreadableImage as exc:
        return key, None, 0, str(exc)
    return key, array.shape, pixel_checksum(array), ""


def list_sources(input_dir: str, output: str) -> tuple[dict[str, str], list[str]]:
    """``key -> source file`` of every image below ``input_dir``, and the key clashes (two files, one key)."""
    output_root = os.path.realpath(output) + os.sep
    sources: dict[str, str] = {}
    clashes = []
    for file in list_folder(input_dir, use_cache=False):
        if os.path.realpath(file).startswith(output_root):
            continue
        key = Path(os.path.relpath(file, input_dir)).with_suffix("").as_posix()
        if key in sources:
            clashes.append(f"'{sources[key]}' and '{file}' (key {key})")
        sources[key] = file
    return sources, clashes


def check_arguments(args: argparse.Namespace) -> list[str]:
    problems = []
    if not Path(args.input).is_dir():
        problems.append(f"input folder '{args.input}' does not exist")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        problems.append(f"output '{args.output}' is a file; name a folder (conventionally NAME.lmdb)")
    elif output.is_dir() and any(output.iterdir()) and not (output / DATA_FILE).is_file():
        problems.append(f"output folder '{args.output}' holds other files and no {DATA_FILE}; name a new folder")
    if args.workers < 1 or args.commit_every < 1 or not 0 <= args.compression <= 9 or args.map_size_gb <= 0:
        problems.append("--workers and --commit-every must be >= 1, --compression 0-9, --map-size-gb > 0")
    return problems


def write(args: argparse.Namespace, sources: dict[str, str]) -> tuple[dict[str, int], dict[str, str], int]:
    """Store every source image the database lacks.

    Returns the pixel checksums of the images written, ``key -> problem`` of unreadable sources, and how many
    images the database held already.
    """
    lmdb = import_lmdb("output")
    env = open_environment(args.output, "output", write=True, map_size=int(args.map_size_gb * 2**30))
    present = database_keys(env)
    todo = [(sources[key], key, args.compression) for key in sorted(sources) if key.encode("ascii") not in present]
    written: dict[str, int] = {}
    unreadable: dict[str, str] = {}
    txn = env.begin(write=True)
    try:
        with Pool(args.workers) as pool:
            bar = tqdm(pool.imap(encode, todo, chunksize=4), total=len(sources), initial=len(sources) - len(todo),
                       unit="image", desc="write", disable=None)
            for key, png, checksum, problem in bar:
                if png is None:
                    unreadable[key] = problem
                    continue
                txn.put(key.encode("ascii"), png)
                written[key] = checksum
                if len(written) % args.commit_every == 0:
                    txn.commit()  # what is committed survives an interruption; a rerun skips it
                    txn = env.begin(write=True)
        txn.commit()
    except lmdb.MapFullError as exc:
        txn.abort()
        raise DataError(f"the database is full at --map-size-gb {args.map_size_gb:g}; rerun with a larger one "
                        f"(it resumes)", args.output) from exc
    except BaseException:
        txn.commit()  # Ctrl-C or a failure: keep what was encoded so far
        raise
    finally:
        env.close()
    return written, unreadable, len(sources) - len(todo)


def verify(args: argparse.Namespace, keys: list[str], written: dict[str, int]) -> tuple[list[str], list[str]]:
    """Read every key back: (meta_info lines of the good ones, problems); bad keys are deleted from the database."""
    lines, problems, bad = [], [], []
    with Pool(args.workers, initializer=_open_reader, initargs=(args.output,)) as pool:
        for key, shape, checksum, problem in tqdm(pool.imap(read_back, keys, chunksize=4), total=len(keys),
                                                   unit="image", desc="verify", disable=None):
            if not problem and key in written and checksum != written[key]:
                problem = "its pixels differ from the source image's"
            if problem:
                problems.append(f"{key}: {problem}")
                bad.append(key)
            else:
                lines.append(meta_line(f"{key}.png", shape, args.compression))
    if bad:
        env = open_environment(args.output, "output", write=True, map_size=int(args.map_size_gb * 2**30))
        with env.begin(write=True) as txn:
            for key in bad:
                txn.delete(key.encode("ascii"))
        env.close()
    return lines, problems


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="folder of images (searched recursively)")
    parser.add_argument("output", help="the LMDB folder to write or complete (conventionally NAME.lmdb)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes reading and encoding images (default: all cores)")
    parser.add_argument("--compression", type=int, default=1, help="PNG compression 0-9 (default 1, BasicSR's)")
    parser.add_argument("--commit-every", type=int, default=1000,
                        help="images per database commit: at most this many are redone after a crash (default 1000)")
    parser.add_argument("--map-size-gb", type=float, default=1024,
                        help="the database's size limit in GiB (default 1024; disk is used only as data is written)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problems = check_arguments(args)
    if problems:
        print(f"make_lmdb: {'; '.join(problems)}", file=sys.stderr)
        return 2
    sources, clashes = list_sources(args.input, args.output)
    non_ascii = [key for key in sources if not key.isascii()]
    if not sources or clashes or non_ascii:
        reason = (f"no images in '{args.input}'" if not sources else
                  f"images that would share a key, rename one of each pair: {'; '.join(clashes[:5])}" if clashes
                  else f"LMDB keys are ASCII (BasicSR's layout); rename '{sources[non_ascii[0]]}'")
        print(f"make_lmdb: {reason}", file=sys.stderr)
        return 2
    try:
        os.makedirs(args.output, exist_ok=True)
        written, unreadable, present = write(args, sources)
        lines, bad = verify(args, sorted(key for key in sources if key not in unreadable), written)
    except UserError as exc:
        print(f"make_lmdb: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"make_lmdb: cannot write '{args.output}': {exc.strerror or exc}", file=sys.stderr)
        return 2
    for key in sorted(unreadable):
        print(f"skipped {unreadable[key]}", file=sys.stderr)
    for line in bad:
        print(f"did not verify (deleted; rerun to write it again): {line}", file=sys.stderr)
    if not bad:
        meta = Path(args.output) / META_FILE
        temporary = meta.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text("".join(line + "\n" for line in lines))
        os.replace(temporary, meta)
    print(f"{len(sources)} images -> {len(written)} written, {present} already present, {len(unreadable)} skipped; "
          f"{len(lines)} verified (in {args.output})")
    return 1 if unreadable or bad else 0


if __name__ == "__main__":
    sys.exit(main())
