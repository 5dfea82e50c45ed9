"""Pack a ``text_image`` folder (images with ``NAME.txt`` side-car captions) into webdataset tar shards for the
``tar_shards`` dataset.

    python scripts/make_shards.py photos/ shards/ --per-shard 1000 --workers 8

Every image of INPUT (recursively) with a non-empty ``NAME.txt`` beside it becomes one sample: its file bytes as
they are (a JPEG stays a JPEG) under the member ``KEY.EXT`` and its captions under ``KEY.txt``, where KEY is the
image's path below INPUT without its extension (dots turned into ``_``, since a webdataset key ends at the
first dot). Shards are ``OUTPUT/PREFIX-000000.tar``, ... with ``--per-shard`` consecutive images of the sorted
list each; the script prints the brace pattern to put in ``shards:``.

Every image is decoded by worker processes first: undecodable images and images without a caption are left
out and listed, and the run exits 1. Resumable: each shard is written under a temporary name and renamed when
complete, and ``OUTPUT/manifest.json`` records a digest of the images each shard was made from; a rerun keeps
the shards whose images are unchanged and rewrites the others (after adding images, the shards from the first
changed one on).

Exit codes: 0 done; 1 some images were left out; 2 bad arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from dlas.data.file_index import list_folder
from dlas.data.image_file import UnreadableImage, decode_image
from dlas.data.text_image import sidecar_captions

MANIFEST = "manifest.json"


def sample_key(relative: str) -> str:
    """The webdataset key of an image at ``relative`` (POSIX, below the input folder)."""
    stem = relative.rsplit(".", 1)[0]
    folder, _, name = stem.rpartition("/")
    return (folder + "/" if folder else "") + name.replace(".", "_")


def read_captions(image: str) -> str:
    """The image's side-car captions, as the text_image dataset reads them, one per line; '' when none."""
    return "\n".join(sidecar_captions(image))


def check(path: str) -> str:
    """The reason the image at ``path`` cannot become a sample, or ''."""
    if not read_captions(path):
        return f"{path}: no caption (its .txt is missing, unreadable or empty)"
    try:
        decode_image(path)
    except UnreadableImage as exc:
        return f"{path}: {exc}"
    return ""


def digest(input_dir: str, relatives: list[str]) -> str:
    """What a shard was made from: the names, sizes and modification times of its images and captions."""
    lines = []
    for relative in relatives:
        for path in (Path(input_dir) / relative, (Path(input_dir) / relative).with_suffix(".txt")):
            stat = path.stat() if path.exists() else None
            lines.append(f"{path.relative_to(input_dir)}\t{stat and stat.st_size}\t{stat and stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def write_shard(target: Path, input_dir: str, relatives: list[str]) -> None:
    """Write the samples of ``relatives`` to ``target`` (via a temporary file renamed when complete)."""
    from webdataset import TarWriter

    temporary = target.with_name(f".{target.name}.tmp{os.getpid()}")
    with TarWriter(str(temporary), encoder=False, mtime=0, format="PAX_FORMAT") as writer:
        for relative in relatives:
            path = os.path.join(input_dir, relative)
            extension = relative.rsplit(".", 1)[1].lower()
            with open(path, "rb") as file:
                image = file.read()
            writer.write({"__key__": sample_key(relative), extension: image,
                          "txt": read_captions(path).encode("utf-8")})
    os.replace(temporary, target)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="folder of images with NAME.txt captions (searched recursively)")
    parser.add_argument("output", help="folder for the shards (created if missing)")
    parser.add_argument("--per-shard", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes checking images (default: all cores)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problems = []
    if not Path(args.input).is_dir():
        problems.append(f"input folder '{args.input}' does not exist")
    if args.per_shard < 1 or args.workers < 1:
        problems.append("--per-shard and --workers must be at least 1")
    if not args.prefix or "/" in args.prefix or "{" in args.prefix:
        problems.append(f"--prefix must be a plain file name part, got '{args.prefix}'")
    try:
        import webdataset  # noqa: F401
    except ImportError:
        problems.append('writing shards needs the \'webdataset\' package: pip install -e ".[shards]"')
    if problems:
        print(f"make_shards: {'; '.join(problems)}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output_root = os.path.realpath(output) + os.sep
    relatives = [Path(os.path.relpath(f, args.input)).as_posix() for f in list_folder(args.input, use_cache=False)
                 if not os.path.realpath(f).startswith(output_root)]
    keys: dict[str, str] = {}
    for relative in relatives:
        if sample_key(relative) in keys:
            print(f"make_shards: '{keys[sample_key(relative)]}' and '{relative}' would share the key "
                  f"'{sample_key(relative)}'; rename one", file=sys.stderr)
            return 2
        keys[sample_key(relative)] = relative
    if not relatives:
        print(f"make_shards: no images in '{args.input}'", file=sys.stderr)
        return 2
    try:
        output.mkdir(parents=True, exist_ok=True)
        return build(args, output, relatives)
    except OSError as exc:
        print(f"make_shards: cannot write in '{args.output}': {exc.strerror or exc}", file=sys.stderr)
        return 2


def build(args: argparse.Namespace, output: Path, relatives: list[str]) -> int:
    groups = [relatives[i:i + args.per_shard] for i in range(0, len(relatives), args.per_shard)]
    names = [f"{args.prefix}-{i:06d}.tar" for i in range(len(groups))]
    try:
        recorded = json.loads((output / MANIFEST).read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = {}
    sources = {name: digest(args.input, group) for name, group in zip(names, groups)}
    done = {name for name in names
            if (output / name).is_file() and recorded.get(name, {}).get("sources") == sources[name]}
    pending = [(name, group) for name, group in zip(names, groups) if name not in done]
    shards = {name: recorded[name] for name in done}
    stale = [p for p in output.glob(f"{args.prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar") if p.name not in sources]
    for path in stale:  # from an earlier run with more shards: a folder of shards must not mix them in
        path.unlink()
        Path(str(path) + ".index.npz").unlink(missing_ok=True)
    left_out: list[str] = []
    with Pool(args.workers) as pool:
        jobs = [os.path.join(args.input, relative) for _, group in pending for relative in group]
        verdicts = iter(tqdm(pool.imap(check, jobs, chunksize=8), total=len(relatives),
                             initial=len(relatives) - len(jobs), unit="image", disable=None))
        for name, group in pending:
            problems = [next(verdicts) for _ in group]
            left_out += [p for p in problems if p]
            kept = [relative for relative, problem in zip(group, problems) if not problem]
            write_shard(output / name, args.input, kept)
            shards[name] = {"sources": sources[name], "samples": len(kept), "left_out": len(group) - len(kept)}
            write_manifest(output, args, shards)
    write_manifest(output, args, shards)
    for line in left_out:
        print(f"left out {line}", file=sys.stderr)
    samples = sum(entry["samples"] for entry in shards.values())
    missing = sum(entry["left_out"] for entry in shards.values())
    pattern = f"{args.prefix}-{{000000..{len(names) - 1:06d}}}.tar" if len(names) > 1 else names[0]
    print(f"{len(relatives)} images -> {samples} samples in {len(names)} shards ({len(pending)} written, "
          f"{len(done)} already complete{f', {len(stale)} stale removed' if stale else ''}), {missing} left out; "
          f"use shards: [{output / pattern}]")
    return 1 if missing else 0


def write_manifest(output: Path, args: argparse.Namespace, shards: dict[str, dict]) -> None:
    temporary = output / f".{MANIFEST}.tmp{os.getpid()}"
    ordered = dict(sorted(shards.items()))
    temporary.write_text(json.dumps({"per_shard": args.per_shard, "shards": ordered}, indent=1))
    os.replace(temporary, output / MANIFEST)


if __name__ == "__main__":
    sys.exit(main())
