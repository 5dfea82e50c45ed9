"""``text_image``: real captioned images from folders, with side-car caption files or a caption table.

Where the captions come from, per entry of ``paths``:

* a folder with ``captions.jsonl`` or ``captions.csv`` at its top: that table (below);
* any other folder, image file, ``.txt`` list of images or ``skimage:`` sample: side-car files, ``NAME.txt``
  beside ``NAME.jpg``, one caption per line (the format ``scripts/make_shards.py`` packs into tar shards);
* a ``.jsonl`` or ``.csv`` file: a caption table. JSON lines are objects with the image under ``file``
  (or ``image``, ``file_name``, ``path``) and the caption under ``caption`` (or ``text``), a string or a list
  of strings; a CSV has a header naming the same columns, or exactly two columns (file, caption) without one.
  Image paths are relative to the table's folder; several rows may name one image (several captions). The
  table's images are the dataset's, in table order.

Each item draws one of its image's captions (from its seeded generator). An image without a caption (no
side-car file, an empty one, no row in the table, only empty captions) is reported once by file name and
skipped like an unreadable image (``on_bad_image``), unless ``missing_caption: empty`` keeps it with the
caption "" (to train an image-only model, such as the dVAE, on photos of which only some are captioned).
"""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dlas.data.base import BadImage, SeededDataset
from dlas.data.degradations import resize_image
from dlas.data.file_index import IMAGE_CACHE_MB, ImageFiles, resolve_image_paths
from dlas.data.image_file import UnreadableImage, to_rgb_float
from dlas.data.transforms import random_crop, to_tensor
from dlas.errors import ConfigError, DataError
from dlas.registry import DATASETS

TABLE_NAMES = ("captions.jsonl", "captions.csv")
FILE_KEYS = ("file", "image", "file_name", "path")
CAPTION_KEYS = ("caption", "text")


def sidecar_captions(image: str) -> list[str]:
    """The non-empty, stripped lines of ``NAME.txt`` beside ``image`` (empty when there is none)."""
    try:
        text = Path(image).with_suffix(".txt").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def _resolve(folder: Path, name: str) -> str:
    return os.path.normpath(name if os.path.isabs(name) else str(folder / name))


def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in row), None)


def read_caption_table(table: str | Path) -> dict[str, list[str]]:
    """``{image path: [captions]}`` of a ``.jsonl`` or ``.csv`` caption table, in table order (paths resolved
    against the table's folder, empty captions left out). A malformed row is a DataError naming the line."""
    table = Path(table)
    folder = table.parent
    captions: dict[str, list[str]] = {}

    def add(line: int, name: Any, value: Any) -> None:
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"line {line}: no image file name", str(table))
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) or v is None for v in values):
            raise DataError(f"line {line}: a caption is a string or a list of strings, got {value!r}", str(table))
        entry = captions.setdefault(_resolve(folder, name.strip()), [])
        entry += [v.strip() for v in values if v and v.strip()]

    try:
        text = table.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the caption table: {exc}", str(table)) from exc
    if table.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"line {number}: not JSON ({exc})", str(table)) from exc
            file_key = _pick(row, FILE_KEYS) if isinstance(row, dict) else None
            caption_key = _pick(row, CAPTION_KEYS + ("captions",)) if isinstance(row, dict) else None
            if file_key is None or caption_key is None:
                raise DataError(f"line {number}: expected an object with one of {', '.join(FILE_KEYS)} and one of "
                                f"{', '.join(CAPTION_KEYS)}", str(table))
            add(number, row[file_key], row[caption_key])
    else:
        rows = list(csv.reader(text.splitlines()))
        header = [cell.strip().lower() for cell in rows[0]] if rows else []
        file_column = next((header.index(k) for k in FILE_KEYS if k in header), None)
        caption_column = next((header.index(k) for k in CAPTION_KEYS if k in header), None)
        start = 2
        if file_column is None or caption_column is None:
            if header and len(header) != 2:
                raise DataError(f"the header names no {'/'.join(FILE_KEYS)} and {'/'.join(CAPTION_KEYS)} columns "
                                "(a table without a header has exactly two columns: file, caption)", str(table))
            file_column, caption_column, start = 0, 1, 1
        for number, row in enumerate(rows[start - 1:], start=start):
            if not row:
                continue
            if len(row) <= max(file_column, caption_column):
                raise DataError(f"line {number}: {len(row)} column(s), expected {len(header) or 2}", str(table))
            add(number, row[file_column], row[caption_column])
    return captions


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored image: "left" and "right" swapped (keeping their capitalisation)."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
    return _LEFT_RIGHT.sub(swap, caption)


@DATASETS.register("text_image")
class TextImageDataset(SeededDataset):
    """Captioned photographs: images from folders with side-car ``NAME.txt`` captions or a caption table.

    Items: ``hq`` (float CHW RGB in [0, 1]), ``caption`` (one of the image's captions, drawn per item) and
    ``path`` (the image file). Where captions come from: the module docstring and ``docs/dvae.md``.

    paths: folders (recursive; one holding ``captions.jsonl``/``captions.csv`` uses that table), image files,
        ``.txt`` lists of images, ``skimage:`` samples, or ``.jsonl``/``.csv`` caption tables.
    target_size: output side in pixels; null (default) gives whole images (batch size 1, or equal sizes).
    resize: with target_size, first scale the image (bicubic, antialiased) so that its shorter side is
        target_size, so a crop keeps most of what the caption describes (default true); false crops at the
        stored resolution and skips images smaller than target_size.
    crop: ``random`` (default) or ``center`` square crop of target_size.
    use_flip: random horizontal flips, with "left" and "right" swapped in the caption (default false).
    caption_choice: ``random`` (default: one of the image's captions per item) or ``first``.
    missing_caption: ``skip`` (default: reported by file name and skipped like a bad image) or ``empty``
        (kept, with caption "").
    on_bad_image: ``skip`` (default) or ``error``, for undecodable, truncated or too-small images and missing
        captions.
    cache_index: cache folder listings (default true).
    cache_mb: decoded images kept in memory per loader process, in MB (default 256): a dataset of a few photos
        is decoded once per worker instead of once per item; 0 turns it off.
    """

    keys = ("hq", "caption", "path")  # the state keys of every item (the trainer checks its graph against them)

    def __init__(self, paths: list[str], target_size: int | None = None, resize: bool = True,
                 crop: Literal["random", "center"] = "random", use_flip: bool = False,
                 caption_choice: Literal["random", "first"] = "random",
                 missing_caption: Literal["skip", "empty"] = "skip", on_bad_image: Literal["skip", "error"] = "skip",
                 cache_index: bool = True, cache_mb: int = IMAGE_CACHE_MB):
        super().__init__(on_bad_image)
        if target_size is not None and target_size < 1:
            raise ConfigError(f"must be a positive number of pixels or null, got {target_size}", "target_size")
        if isinstance(paths, str):
            paths = [paths]
        self.files = ImageFiles()  # decodes files and LMDB images alike
        self.files.cache_decoded(cache_mb)
        self.tables: dict[str, list[str]] = {}  # image -> captions, for the images of caption tables
        for i, entry in enumerate(paths):
            self._add_entry(str(entry), f"paths[{i}]", cache_index)
        if not self.files:
            raise ConfigError("no images found", "paths")
        self.target_size, self.resize, self.crop, self.use_flip = target_size, resize, crop, use_flip
        self.caption_choice = caption_choice
        self.missing_caption = missing_caption

    def _add_entry(self, entry: str, key: str, cache_index: bool) -> None:
        path = Path(entry).expanduser()
        table = None
        if path.is_file() and path.suffix.lower() in (".jsonl", ".csv"):
            table = path
        elif path.is_dir():
            table = next((path / name for name in TABLE_NAMES if (path / name).is_file()), None)
        if table is None:
            found = resolve_image_paths([entry], key, cache_index)
            self.files += found
            self.files.stores += found.stores
            return
        captions = read_caption_table(table)
        if not captions:
            raise ConfigError(f"caption table '{table}' names no images", key)
        self.files += list(captions)
        self.tables.update(captions)

    def __len__(self) -> int:
        return len(self.files)

    def files_of(self, index: int) -> list[str]:
        return [self.files[index]]

    def captions_of(self, index: int) -> list[str]:
        """Every caption of image ``index`` (its table rows, else its side-car file)."""
        path = self.files[index]
        return self.tables[path] if path in self.tables else sidecar_captions(path)

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        path = self.files[index]
        captions = self.captions_of(index)
        if not captions and self.missing_caption == "skip":
            where = "its row in the caption table has no caption" if path in self.tables else \
                f"{Path(path).with_suffix('.txt').name} is missing or empty"
            raise BadImage(path, f"no caption ({where}; missing_caption: empty keeps such images)")
        try:
            image = self.files.decode(path)
        except UnreadableImage as exc:
            raise BadImage(path, str(exc)) from exc
        caption = "" if not captions else captions[0] if self.caption_choice == "first" else \
            captions[int(rng.integers(len(captions)))]
        image, flipped = self._square(image, path, rng)
        return {"hq": to_tensor(image), "caption": mirror_caption(caption) if flipped else caption, "path": path}

    def _square(self, image: np.ndarray, path: str, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        """The float RGB image scaled and cropped to target_size (when set), and whether it was mirrored."""
        side = self.target_size
        if side is not None and not self.resize and min(image.shape[:2]) < side:
            raise BadImage(path, f"{image.shape[1]}x{image.shape[0]} is smaller than target_size {side} "
                                 "(resize: true scales it)")
        image = to_rgb_float(image)
        if side is not None:
            image = shorter_side_to(image, side) if self.resize else image
            image = random_crop(image, side, rng) if self.crop == "random" else center_crop(image, side)
        flipped = bool(self.use_flip and rng.random() < 0.5)
        return np.ascontiguousarray(image[:, ::-1] if flipped else image), flipped


def shorter_side_to(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` scaled (bicubic, antialiased when shrinking) so that its shorter side is ``side`` pixels."""
    height, width = image.shape[:2]
    factor = side / min(height, width)
    size = (max(side, round(height * factor)), max(side, round(width * factor)))
    return np.clip(resize_image(image, *size, "bicubic"), 0.0, 1.0)


def center_crop(image: np.ndarray, side: int) -> np.ndarray:
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    return image[top:top + side, left:left + side]
