"""Token shards: a dataset encoded by a trained dVAE, as integer token grids plus captions, on disk.

``scripts/extract_tokens.py`` writes them (:class:`TokenShardWriter`); the transformer reads them
(:class:`TokenShards`, random access by index), so it never runs the dVAE while it trains.

Format (version 1), one folder::

    OUT/
      manifest.json            written last, atomically, after every finished shard
      shard_00000.safetensors  {"tokens": int16 or int32 tensor [n, h, w]} (int16 when the codebook fits)
      shard_00000.jsonl        n lines, one JSON object per item, in the same order:
                               {"id": "...", "caption": "...", ...}  (plus the item's other string fields,
                               e.g. the shapes dataset's "shape", "color", ...)
      shard_00001.safetensors  ...

``manifest.json``::

    {"format": "dlas-token-shards", "version": 1,
     "complete": true,                     false while extraction is running or was interrupted
     "count": 20000,                       items in all finished shards
     "grid": [8, 8],                       token grid h x w of every item
     "codebook_size": 512,                 tokens are in [0, codebook_size)
     "token_dtype": "int16",
     "shard_size": 4096,                   items per shard (the last one may hold fewer)
     "shards": [{"tokens": "shard_00000.safetensors", "captions": "shard_00000.jsonl", "count": 4096}, ...],
     "dvae": {"run": "experiments/NAME", "network": "dvae", "step": 4000, "weights": "dvae_ema.safetensors",
              "type": "dvae", "downsample": 4, "image_size": [32, 32]},
     "source": {...},                      what was encoded: the dataset config, its seed, epochs, key
     "stats": {"codes_used": 250, "codebook_usage": 0.98, "perplexity": 201.3}}   added when complete

Items ``i`` of shard ``s`` are global items ``s * shard_size + i``: shards are written in item order, so an
interrupted extraction resumes at the first item of the first unfinished shard. Each shard's two files are
written under temporary names and renamed into place before the manifest names them; a shard the manifest does
not list is ignored (and overwritten on resume).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dlas.errors import DataError

FORMAT = "dlas-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
CACHE_BYTES = 512 * 2**20  # the default shard cache of a reader, per process, by the shards' file sizes


def token_dtype(codebook_size: int) -> torch.dtype:
    """The smallest signed integer type holding every token of the codebook (safetensors has no uint16)."""
    return torch.int16 if codebook_size <= 2**15 else torch.int32


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(temporary)
    os.replace(temporary, path)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a token-shard folder; a DataError naming the folder when it is not one."""
    folder = Path(folder)
    file = folder / MANIFEST
    if not folder.is_dir():
        raise DataError("token-shard folder does not exist", str(folder))
    if not file.is_file():
        raise DataError("not a token-shard folder: it has no manifest.json (run scripts/extract_tokens.py)",
                        str(folder))
    try:
        manifest = json.loads(file.read_text())
    except ValueError as exc:
        raise DataError(f"unreadable manifest.json: {exc}", str(file)) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"manifest.json is not a {FORMAT} manifest", str(file))
    if manifest.get("version") != VERSION:
        raise DataError(f"token-shard format version {manifest.get('version')} is not supported (this DLAS "
                        f"reads version {VERSION})", str(file))
    return manifest


class TokenShardWriter:
    """Writes token shards in item order; resumes an interrupted folder written with the same settings.

    ``info`` holds the manifest's fixed fields: ``grid`` ([h, w]), ``codebook_size``, ``dvae`` and ``source``
    (see the module docstring). On an existing folder, the manifest's fields must equal ``info`` (the same
    dVAE checkpoint and the same data), else a DataError says what differs; :attr:`done` is then the number of
    items already written, and the caller continues from there. Call :meth:`add` with batches in item order and
    :meth:`close` at the end (it writes the last, partial shard and marks the folder complete).
    """

    FIXED = ("grid", "codebook_size", "dvae", "source", "shard_size")

    def __init__(self, folder: str | Path, info: Mapping[str, Any], shard_size: int = 4096):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder = Path(folder)
        self.manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "complete": False, "count": 0,
                                         "grid": list(info["grid"]), "codebook_size": int(info["codebook_size"]),
                                         "token_dtype": str(token_dtype(int(info["codebook_size"]))).split(".")[-1],
                                         "shard_size": shard_size, "shards": [], "dvae": dict(info["dvae"]),
                                         "source": dict(info["source"])}
        if (self.folder / MANIFEST).is_file():
            self._resume(read_manifest(self.folder))
        self.folder.mkdir(parents=True, exist_ok=True)
        self._tokens: list[torch.Tensor] = []
        self._records: list[dict[str, str]] = []

    def _resume(self, old: Mapping[str, Any]) -> None:
        # compare as JSON would store them (tuples become lists)
        expected = json.loads(json.dumps({k: self.manifest[k] for k in self.FIXED}))
        for key in self.FIXED:
            if old.get(key) != expected[key]:
                raise DataError(f"holds tokens written with another {key} ({old.get(key)!r}, now "
                                f"{expected[key]!r}); use a new output folder or delete this one", str(self.folder))
        self.manifest["shards"] = list(old["shards"])
        self.manifest["count"] = int(old["count"])
        self.manifest["complete"] = bool(old["complete"])

    @property
    def done(self) -> int:
        """Items already written (in finished shards)."""
        return self.manifest["count"]

    @property
    def complete(self) -> bool:
        """Whether a previous run finished this folder."""
        return self.manifest["complete"]

    def add(self, tokens: torch.Tensor, records: Sequence[Mapping[str, str]]) -> None:
        """Append a batch: ``tokens`` [B, h, w] (any integer dtype) and one record per item (``id``, ``caption``
        and any other string fields)."""
        h, w = self.manifest["grid"]
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (h, w) or len(records) != tokens.shape[0]:
            raise ValueError(f"expected tokens [B, {h}, {w}] with B records, got {tuple(tokens.shape)} and "
                             f"{len(records)} records")
        self._tokens.append(tokens.detach().to("cpu", token_dtype(self.manifest["codebook_size"])))
        self._records.extend({k: str(v) for k, v in r.items()} for r in records)
        while len(self._records) >= self.manifest["shard_size"]:
            self._flush(self.manifest["shard_size"])

    def close(self) -> None:
        """Write what is left as the last shard and mark the folder complete."""
        if self._records:
            self._flush(len(self._records))
        self.manifest["complete"] = True
        self._write_manifest()

    def annotate(self, **fields: Any) -> None:
        """Add informational fields to the manifest (``stats``, ...; never the fixed ones) and rewrite it."""
        clash = sorted(set(fields) & {*self.FIXED, "format", "version", "complete", "count", "shards"})
        if clash:
            raise ValueError(f"annotate cannot change {', '.join(clash)}")
        self.manifest.update(fields)
        self._write_manifest()

    def _flush(self, count: int) -> None:
        from safetensors.torch import save_file

        tokens = torch.cat(self._tokens)
        head, tail = tokens[:count].contiguous(), tokens[count:]
        self._tokens = [tail] if len(tail) else []
        records, self._records = self._records[:count], self._records[count:]
        index = len(self.manifest["shards"])
        entry = {"tokens": f"shard_{index:05d}.safetensors", "captions": f"shard_{index:05d}.jsonl", "count": count}
        _write_atomically(self.folder / entry["tokens"], lambda p: save_file({"tokens": head}, str(p)))
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        _write_atomically(self.folder / entry["captions"], lambda p: p.write_text(lines, encoding="utf-8"))
        self.manifest["shards"].append(entry)
        self.manifest["count"] += count
        self._write_manifest()

    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=1)
        _write_atomically(self.folder / MANIFEST, lambda p: p.write_text(text))


class TokenShards(torch.utils.data.Dataset):
    """Random access to a token-shard folder: ``shards[i] -> {"tokens": LongTensor [h, w], "caption": str,
    "id": str, ...}`` (plus the item's other string fields as extracted).

    Shards are read on first use and the ``cache_shards`` most recently used are kept in memory; by default
    (None) as many as fit in :data:`CACHE_BYTES` by their files' sizes, which is every shard of a small
    extraction (64000 items of 8 x 8 tokens are 22 MB; a 4096-item shard of 32 x 32 int16 tokens is 8 MB
    plus its captions). Random access over more shards than the cache holds reads a shard per item: keep the
    cache at least as large as the shards a shuffled epoch touches. A record's JSON is parsed when its item
    is read, not when its shard is. ``allow_incomplete`` reads a folder whose extraction has not finished
    (its finished shards); by default that is a DataError, since training on part of the data by accident is
    worse than an error. Attributes: ``grid`` (h, w), ``codebook_size``, ``manifest``.
    """

    def __init__(self, folder: str | Path, cache_shards: int | None = None, allow_incomplete: bool = False):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if not self.manifest["complete"] and not allow_incomplete:
            raise DataError(f"token extraction has not finished ({self.manifest['count']} items so far); run "
                            "scripts/extract_tokens.py again to complete it", str(self.folder))
        self.grid: tuple[int, int] = tuple(self.manifest["grid"])
        self.codebook_size: int = int(self.manifest["codebook_size"])
        self.shard_size: int = int(self.manifest["shard_size"])
        self.shards: list[dict[str, Any]] = list(self.manifest["shards"])
        for entry in self.shards:
            for key in ("tokens", "captions"):
                if not (self.folder / entry[key]).is_file():
                    raise DataError(f"the manifest lists {entry[key]}, which is missing", str(self.folder))
        self.count = sum(int(e["count"]) for e in self.shards)
        if cache_shards is None:
            sizes = [sum((self.folder / e[k]).stat().st_size for k in ("tokens", "captions")) for e in self.shards]
            largest = max(sizes, default=1)
            cache_shards = max(1, min(len(self.shards), CACHE_BYTES // max(1, largest)))
        self.cache_shards = max(1, cache_shards)
        self._cache: OrderedDict[int, tuple[torch.Tensor, list[str]]] = OrderedDict()

    def __len__(self) -> int:
        return self.count

    def _shard(self, index: int) -> tuple[torch.Tensor, list[str]]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        from safetensors.torch import load_file

        entry = self.shards[index]
        tokens = load_file(str(self.folder / entry["tokens"]))["tokens"]
        # split on "\n" alone: a caption may hold other line separators (U+2028) that splitlines() splits on
        records = (self.folder / entry["captions"]).read_text(encoding="utf-8").split("\n")
        if records and not records[-1]:
            records.pop()
        if tokens.shape[0] != entry["count"] or len(records) != entry["count"]:
            raise DataError(f"{entry['tokens']} holds {tokens.shape[0]} token grids and {entry['captions']} "
                            f"{len(records)} records, the manifest says {entry['count']}", str(self.folder))
        self._cache[index] = (tokens, records)
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return tokens, records

    def code_histogram(self) -> torch.Tensor:
        """How often each code occurs over all items: int64 [codebook_size] (reads every shard once)."""
        counts = torch.zeros(self.codebook_size, dtype=torch.int64)
        for index in range(len(self.shards)):
            tokens, _ = self._shard(index)
            counts += torch.bincount(tokens.flatten().long(), minlength=self.codebook_size)
        return counts

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.count <= index < self.count:
            raise IndexError(f"token shards: index {index} is outside 0..{self.count - 1}")
        index %= self.count
        shard, offset = divmod(index, self.shard_size)
        tokens, records = self._shard(shard)
        try:
            record = json.loads(records[offset])
        except json.JSONDecodeError as exc:
            raise DataError(f"line {offset + 1} of {self.shards[shard]['captions']} is not JSON ({exc.msg})",
                            str(self.folder)) from exc
        return {"tokens": tokens[offset].long(), **record}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # loader workers read their own shards
        return state
