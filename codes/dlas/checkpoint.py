"""Crash-proof checkpoints: ``experiments/NAME/checkpoints/STEP/`` written atomically, verified on load.

A checkpoint is written into a hidden temporary folder, every file is fsynced, ``manifest.json`` (step, and
each file's size and sha256) is written last, and only then is the folder renamed into place. A folder without
a manifest, or whose files do not match it, does not exist as far as resuming is concerned: a crash or a full
disk at any moment leaves the newest *complete* checkpoint untouched.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from dlas.errors import DataError

log = logging.getLogger("dlas")

MANIFEST = "manifest.json"
STATE = "state.pt"
BEST = "best.json"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of checkpoints that have a manifest, oldest first (contents are not verified)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(p.name), p) for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / MANIFEST).is_file()]
    return sorted(found)


def verify_checkpoint(folder: Path) -> list[str]:
    """Problems of one checkpoint folder against its manifest (empty list: complete and intact)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return [f"{folder / MANIFEST}: unreadable manifest ({exc})"]
    problems = []
    for name, meta in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != meta["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {meta['size']}")
        elif _sha256(path) != meta["sha256"]:
            problems.append(f"{path}: sha256 does not match the manifest")
    return problems


def latest_valid_checkpoint(run_dir: Path) -> Optional[tuple[int, Path]]:
    """The newest checkpoint whose files match its manifest; broken ones are reported and skipped."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for stray in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.isdigit()):
            if stray.name.startswith(".tmp-"):
                log.warning("ignoring %s: an interrupted save (no manifest)", stray)
        for p in sorted(root.iterdir()):
            if p.is_dir() and p.name.isdigit() and not (p / MANIFEST).is_file():
                log.warning("ignoring checkpoint %s: it has no manifest.json (incomplete)", p)
    for step, folder in reversed(list_checkpoints(run_dir)):
        problems = verify_checkpoint(folder)
        if not problems:
            return step, folder
        log.warning("ignoring checkpoint %s: %s", folder, "; ".join(problems))
    return None


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    state: Mapping[str, Any],
) -> Path:
    """Write ``weights`` (file stem -> state dict, saved as safetensors) and ``state`` atomically.

    Any failure (disk full, permissions) raises: a run must never carry on believing it is saved.
    """
    from safetensors.torch import save_file

    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / str(step)
    tmp = root / f".tmp-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = {}
        for stem, tensors in weights.items():
            path = tmp / f"{stem}.safetensors"
            # safetensors refuses shared or non-contiguous storage; a clone per tensor is cheap next to disk I/O.
            save_file({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}, str(path))
            files[path.name] = path
        torch.save(dict(state), tmp / STATE)
        files[STATE] = tmp / STATE
        manifest = {"step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": {}}
        for name, path in files.items():
            _fsync(path)
            manifest["files"][name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        if final.exists():  # re-saving a step (e.g. final save right after a periodic one): replace it
            old = root / f".old-{step}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_state(folder: Path) -> dict:
    """``state.pt`` of a checkpoint, loaded with ``weights_only=True`` (nothing in it is executed)."""
    path = Path(folder) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise DataError(f"checkpoint has no {STATE}", str(folder)) from exc
    except Exception as exc:
        raise DataError(f"cannot load {path}: {exc}", str(path)) from exc


def load_weights(folder: Path, stem: str) -> Optional[dict[str, torch.Tensor]]:
    """``STEM.safetensors`` of a checkpoint, or ``None`` when the checkpoint has no such file."""
    from safetensors.torch import load_file

    path = Path(folder) / f"{stem}.safetensors"
    return load_file(str(path)) if path.is_file() else None


# ---------------------------------------------------------------------- retention
def read_best(run_dir: Path) -> Optional[dict]:
    path = checkpoint_root(run_dir) / BEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_best(run_dir: Path, metric: str, value: float, step: int) -> None:
    path = checkpoint_root(run_dir) / BEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"metric": metric, "value": value, "step": step}))
    os.replace(tmp, path)


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: Optional[int] = None,
                      protect: Iterable[int] = ()) -> list[int]:
    """Delete all but the newest ``keep_last`` checkpoints, milestones (step % keep_every == 0) and ``protect``.

    Returns the deleted steps. Incomplete folders are left alone (they may be a save in progress).
    """
    complete = list_checkpoints(run_dir)
    keep = {step for step, _ in complete[-keep_last:]} if keep_last > 0 else set()
    keep |= set(protect)
    if keep_every:
        keep |= {step for step, _ in complete if step % keep_every == 0}
    deleted = []
    for step, folder in complete:
        if step not in keep:
            # Remove the manifest first: a crash mid-delete leaves an incomplete (ignored) folder, not a corrupt one.
            (folder / MANIFEST).unlink()
            shutil.rmtree(folder)
            deleted.append(step)
    return deleted
