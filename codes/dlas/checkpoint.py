"""Crash-proof checkpoints: ``experiments/NAME/checkpoints/STEP/`` written atomically, verified on load.

A checkpoint is written into a hidden temporary folder (``.tmp-STEP-PID``), every file is fsynced,
``manifest.json`` (step, and each file's size and sha256) is written last, and only then is the folder renamed
into place. A folder without a manifest, or whose files do not match it, does not exist as far as resuming is
concerned: a crash or a full disk at any moment leaves the newest *complete* checkpoint untouched.

Everything here is read back as untrusted input (a run folder may come from elsewhere): a checkpoint folder is
named by its step in ASCII digits; its manifest is a JSON object listing exactly the folder's files
(``state.pt`` and ``NAME.safetensors``, plain names inside the folder); only those files are ever read;
``state.pt`` is loaded with ``weights_only=True`` and ``best.json`` is checked field by field. Each problem is a
:class:`~dlas.errors.DataError` naming the file and what is wrong with it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch

from dlas.errors import DataError

log = logging.getLogger("dlas")

MANIFEST = "manifest.json"
STATE = "state.pt"
BEST = "best.json"
WEIGHTS_SUFFIX = ".safetensors"
MAX_MANIFEST_BYTES = 1 << 20  # a real manifest is a few hundred bytes per file
MAX_BEST_BYTES = 1 << 16

_STEP_NAME = re.compile(r"0|[1-9][0-9]{0,18}")  # ASCII digits, no leading zeros: the name str(step) gives
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")  # a plain name: no separators, not hidden, not '..'
_SHA256 = re.compile(r"[0-9a-f]{64}")
# what an interrupted save or prune leaves behind: .tmp-STEP-PID (being written), .old-STEP-PID (being
# replaced), .del-STEP-PID (being deleted)
_LEFTOVER = re.compile(r"\.(tmp|old|del)-([0-9]{1,19})-([0-9]{1,10})")


class SaveError(OSError):
    """Writing a checkpoint failed (disk full, quota, permissions, a read-only file system): one line of text."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(name: str) -> Optional[int]:
    """The step a checkpoint folder called ``name`` holds, or ``None`` when the name is not a checkpoint's."""
    return int(name) if _STEP_NAME.fullmatch(name) else None


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


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------- reading: the manifest
def read_manifest(folder: Path) -> dict:
    """The checked ``manifest.json`` of ``folder``; a DataError naming it and saying what is wrong otherwise.

    A manifest is a JSON object ``{"step": N, "files": {NAME: {"size": BYTES, "sha256": HEX}}}`` whose ``step``
    is the folder's name and whose files are ``state.pt`` and ``*.safetensors``, each a plain name inside the
    folder. (That the folder holds exactly those files, with those sizes and hashes, is :func:`verify_checkpoint`.)
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise DataError("no manifest.json: an incomplete save or not a checkpoint folder", str(folder))
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise DataError(f"{path.stat().st_size} bytes, too large for a manifest (at most {MAX_MANIFEST_BYTES})",
                            str(path))
        manifest = json.loads(path.read_bytes())
    except OSError as exc:
        raise DataError(f"unreadable ({exc.strerror or exc})", str(path)) from exc
    except ValueError as exc:  # not JSON, or not UTF-8
        raise DataError(f"not valid JSON ({exc})", str(path)) from exc
    problems = _manifest_problems(manifest, step_of(folder.name))
    if problems:
        raise DataError("; ".join(problems), str(path))
    return manifest


def _manifest_problems(manifest: Any, folder_step: Optional[int]) -> list[str]:
    if not isinstance(manifest, dict):
        return [f"not a JSON object (found {type(manifest).__name__})"]
    problems = []
    step = manifest.get("step")
    if not _is_count(step):
        problems.append(f"'step' must be a step count, found {step!r}")
    elif folder_step is not None and step != folder_step:
        problems.append(f"says step {step}, but its folder is checkpoint {folder_step}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return problems + ["'files' must list the checkpoint's files (at least state.pt)"]
    for name, meta in files.items():
        if not _FILE_NAME.fullmatch(name) or name == MANIFEST or not (name == STATE or name.endswith(WEIGHTS_SUFFIX)):
            problems.append(f"lists {name!r}, which is not a checkpoint file (state.pt or NAME.safetensors) inside "
                            "its folder")
        elif not isinstance(meta, dict) or not _is_count(meta.get("size")) or \
                not isinstance(meta.get("sha256"), str) or not _SHA256.fullmatch(meta["sha256"]):
            problems.append(f"the entry of {name} needs 'size' (bytes) and 'sha256' (64 hex digits)")
    if STATE not in files:
        problems.append("does not list state.pt")
    return problems


def verify_checkpoint(folder: Path) -> list[str]:
    """Problems of one checkpoint folder against its manifest (empty list: complete and intact).

    The folder must hold exactly the files its manifest lists (plus the manifest), each a regular file (not a
    link) of the listed size and sha256.
    """
    folder = Path(folder)
    try:
        files = read_manifest(folder)["files"]
    except DataError as exc:
        return [str(p) for p in exc.problems]
    problems = []
    try:
        present = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    except OSError as exc:
        return [f"{folder}: unreadable folder ({exc.strerror or exc})"]
    for name in present:
        if name not in files:
            problems.append(f"{folder / name}: not listed in the manifest (a checkpoint holds exactly the files its "
                            "manifest lists)")
    for name, meta in files.items():
        path = folder / name
        if path.is_symlink() or not path.is_file():
            problems.append(f"{path}: {'missing' if not path.exists() else 'not a regular file'}")
        elif path.stat().st_size != meta["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {meta['size']}")
        elif _sha256(path) != meta["sha256"]:
            problems.append(f"{path}: sha256 does not match the manifest")
    return problems


# ---------------------------------------------------------------------- reading: the checkpoints folder
def _entries(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    try:
        return sorted(root.iterdir()) if root.is_dir() else []
    except OSError as exc:
        raise DataError(f"unreadable folder ({exc.strerror or exc})", str(root)) from exc


def checkpoint_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of every folder named like a checkpoint (``5000``), oldest first, checked or not."""
    found = []
    for path in _entries(run_dir):
        step = step_of(path.name)
        if step is not None and path.is_dir() and not path.is_symlink():
            found.append((step, path))
    return sorted(found)


def _has_manifest(folder: Path) -> bool:
    try:
        read_manifest(folder)
    except DataError:
        return False
    return True


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of checkpoints with a well-formed manifest, oldest first (files are not verified)."""
    return [(step, folder) for step, folder in checkpoint_folders(run_dir) if _has_manifest(folder)]


def saved_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of everything that looks like a saved checkpoint (a ``STEP/manifest.json``, well-formed
    or not), oldest first: what a resume should find usable."""
    return [(step, folder) for step, folder in checkpoint_folders(run_dir) if (folder / MANIFEST).is_file()]


def has_checkpoints(run_dir: Path) -> bool:
    """Whether the run folder holds anything that looks like a saved checkpoint (a ``STEP/manifest.json``)."""
    return bool(saved_checkpoints(run_dir))


def complete_checkpoints(run_dir: Path) -> Iterator[tuple[int, Path]]:
    """The checkpoints whose files match their manifest, newest first; each other folder is reported once.

    Verification reads every file (sha256), so the folders are checked one at a time, as the caller asks for
    the next: resuming from the newest costs one checkpoint's read.
    """
    for path in _entries(run_dir):
        name = path.name
        if step_of(name) is None and name != BEST and not _LEFTOVER.fullmatch(name) and path.is_dir():
            log.warning("ignoring %s: not a checkpoint (a checkpoint folder is named by its step, e.g. 5000)", path)
    for step, folder in reversed(checkpoint_folders(run_dir)):
        problems = verify_checkpoint(folder)
        if problems:
            log.warning("ignoring checkpoint %s: %s", folder, "; ".join(problems))
        else:
            yield step, folder


def latest_valid_checkpoint(run_dir: Path) -> Optional[tuple[int, Path]]:
    """The newest checkpoint whose files match its manifest; broken ones are reported and skipped."""
    return next(complete_checkpoints(run_dir), None)


def _process_alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negative numbers name process groups, never a saving process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError) as exc:
        return isinstance(exc, PermissionError)  # another user's live process / a number no process has
    return True


def clean_interrupted_saves(run_dir: Path) -> list[str]:
    """Remove what saves and prunes of dead processes left in ``checkpoints/``; return what was done.

    ``.tmp-STEP-PID`` and ``.del-STEP-PID`` folders of a process that no longer runs are deleted. An
    ``.old-STEP-PID`` folder is the previous copy of checkpoint STEP set aside while a re-save of that step
    renamed its replacement into place: it is put back when the replacement never arrived, else deleted. Folders
    of live processes (a save in progress) and of this process are left alone.
    """
    done = []
    root = checkpoint_root(run_dir)
    for path in _entries(run_dir):
        match = _LEFTOVER.fullmatch(path.name)
        if not match or not path.is_dir() or path.is_symlink():
            continue
        kind, step, pid = match.group(1), int(match.group(2)), int(match.group(3))
        if pid == os.getpid() or _process_alive(pid):
            continue
        target = root / str(step)
        if kind == "old" and not target.exists() and _verified_as(path, step):
            path.rename(target)
            done.append(f"restored checkpoint {target} from {path.name}, set aside by an interrupted re-save")
            continue
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path}, left by an interrupted {'save' if kind != 'del' else 'clean-up'} "
                    f"(process {pid} is gone)")
    return done


def _verified_as(folder: Path, step: int) -> bool:
    """Whether ``folder`` (not named by its step) is an intact checkpoint of ``step``."""
    return not verify_checkpoint(folder) and read_manifest(folder)["step"] == step


# ---------------------------------------------------------------------- reading: the files
def load_state(folder: Path) -> dict:
    """``state.pt`` of a checkpoint, loaded with ``weights_only=True`` (nothing in it is imported or run).

    A file that holds anything but tensors and plain values is refused, never loaded another way.
    """
    path = Path(folder) / STATE
    if path.is_symlink() or not path.is_file():
        raise DataError(f"checkpoint has no {STATE}", str(folder))
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses a foreign pickle
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"GLOBAL ([\w.]+)", str(exc))
        culprit = f" ({match.group(1)})" if match else ""
        raise DataError(f"refused: a checkpoint's state holds only tensors and plain values, but this file refers "
                        f"to Python code{culprit} that loading it would import or run; DLAS did not write it, so "
                        "treat the folder as untrusted", str(path)) from exc
    except Exception as exc:  # truncated zip, not a torch file at all, ...
        raise DataError(f"not a readable checkpoint state file ({type(exc).__name__}: {_one_line(exc)})",
                        str(path)) from exc
    if not isinstance(state, dict):
        raise DataError(f"holds a {type(state).__name__}, not the trainer's state (a mapping)", str(path))
    return state


def load_weights(folder: Path, stem: str) -> Optional[dict[str, torch.Tensor]]:
    """``STEM.safetensors`` of a checkpoint, or ``None`` when the checkpoint has no such file."""
    from safetensors.torch import load_file

    path = Path(folder) / f"{stem}{WEIGHTS_SUFFIX}"
    if path.is_symlink() or not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for truncated or corrupt files
        raise DataError(f"not a readable safetensors file ({_one_line(exc)})", str(path)) from exc


# ---------------------------------------------------------------------- writing
def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.0f} MiB free there"
    except OSError:
        return "free space unknown"


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    state: Mapping[str, Any],
) -> Path:
    """Write ``weights`` (file stem -> state dict, saved as safetensors) and ``state`` atomically.

    A failure to write (disk full, quota, permissions, read-only file system: torch and safetensors report
    these as their own errors) raises :class:`SaveError` with one line of text; other failures propagate. Either
    way the temporary folder is removed and every earlier checkpoint is left as it was: a run must never carry
    on believing it is saved.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    root = checkpoint_root(run_dir)
    final = root / str(step)
    tmp = root / f".tmp-{step}-{os.getpid()}"
    try:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)  # this process's own earlier attempt
            elif tmp.exists() or tmp.is_symlink():
                tmp.unlink()
            tmp.mkdir()
            files = {}
            for stem, tensors in weights.items():
                path = tmp / f"{stem}{WEIGHTS_SUFFIX}"
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
            if final.exists():  # re-saving a step (a resume from an older checkpoint got here again): replace it
                old = root / f".old-{step}-{os.getpid()}"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            _fsync(root)
        except (OSError, RuntimeError, SafetensorError) as exc:
            # torch's writer reports a full disk as a RuntimeError, safetensors as its own error
            raise SaveError(f"{type(exc).__name__}: {_one_line(exc)} "
                            f"({_free_space(root if root.is_dir() else Path(run_dir))})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------------- retention
def read_best(run_dir: Path) -> Optional[dict]:
    """``checkpoints/best.json`` (``{"metric", "value", "step"}``), ``None`` when there is none.

    A file that is not such an object is a DataError naming it; delete it to forget the best checkpoint.
    """
    path = checkpoint_root(run_dir) / BEST
    if not path.exists() and not path.is_symlink():
        return None
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_BEST_BYTES:
            raise ValueError("not a small regular file")
        record = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable record of the best checkpoint ({_one_line(exc)}); delete it to start keeping "
                        "the best checkpoint afresh", str(path)) from exc
    if not isinstance(record, dict) or not isinstance(record.get("metric"), str) or \
            not isinstance(record.get("value"), (int, float)) or isinstance(record.get("value"), bool) or \
            not math.isfinite(record["value"]) or not _is_count(record.get("step")):
        raise DataError('expected {"metric": NAME, "value": FINITE NUMBER, "step": STEP}; delete it to start '
                        "keeping the best checkpoint afresh", str(path))
    return {"metric": record["metric"], "value": float(record["value"]), "step": record["step"]}


def write_best(run_dir: Path, metric: str, value: float, step: int) -> None:
    path = checkpoint_root(run_dir) / BEST
    tmp = path.with_name(f".{BEST}.tmp")
    try:
        tmp.write_text(json.dumps({"metric": metric, "value": value, "step": step}))
        os.replace(tmp, path)
    except OSError as exc:
        raise SaveError(f"writing {path} failed: {exc.strerror or exc} ({_free_space(path.parent)})") from exc


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: Optional[int] = None,
                      protect: Iterable[int] = ()) -> list[int]:
    """Delete all but the newest ``keep_last`` checkpoints, milestones (step % keep_every == 0) and ``protect``.

    Returns the deleted steps. Incomplete folders are left alone (they may be a save in progress). Each deleted
    folder is first renamed to ``.del-STEP-PID``, so a crash mid-delete leaves a leftover the next start removes,
    never a half-deleted checkpoint; a folder that cannot be deleted is reported and kept.
    """
    complete = list_checkpoints(run_dir)
    keep = {step for step, _ in complete[-keep_last:]} if keep_last > 0 else set()
    keep |= set(protect)
    if keep_every:
        keep |= {step for step, _ in complete if step % keep_every == 0}
    deleted = []
    for step, folder in complete:
        if step not in keep:
            doomed = folder.with_name(f".del-{step}-{os.getpid()}")
            try:
                folder.rename(doomed)
            except OSError as exc:
                log.warning("could not delete old checkpoint %s: %s", folder, exc.strerror or exc)
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            deleted.append(step)
    return deleted
