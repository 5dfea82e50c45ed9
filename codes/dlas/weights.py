"""Loading and saving network weights safely, in this project's format and the published SR formats.

Files are read with ``safetensors`` or ``torch.load(weights_only=True)`` only: a pickle that would import or run
Python code is refused instead of executed. Wrappers (BasicSR's ``params_ema``/``params``, ``state_dict``,
``model``) and DDP's ``module.`` prefixes are removed, and a network with ``convert_state_dict`` maps published
key layouts (e.g. the original ESRGAN release) onto its own before loading.
"""
from __future__ import annotations

import os
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from dlas.errors import DataError, UserError

# Checked in this order: BasicSR saves both and the EMA weights are the better ones (Real-ESRGAN prefers them too).
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
# DDP / DataParallel and torch.compile prefix every key of a wrapped module.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# How many keys of each kind an error message lists before "and N more".
LISTED_KEYS = 5

PathLike = Union[str, os.PathLike]


@dataclass
class LoadReport:
    """What ``load_network_weights`` did: keys it could not fill, keys it ignored, shapes that did not fit."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # in the network, not in the file: left as initialised
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the network: ignored
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, file, net

    @property
    def complete(self) -> bool:
        """True when every key matched in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line: counts, then the first few keys of each kind."""
        parts = [f"{self.loaded} tensors loaded"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing {_first(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected {_first(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k}: file {list(a)} vs network {list(b)}" for k, a, b in self.mismatched]
            parts.append(f"{len(self.mismatched)} with another shape {_first(shapes)}")
        return "; ".join(parts)

    def differences(self) -> str:
        """One line: what did not fit (the summary without the count loaded)."""
        return self.summary().partition("; ")[2]

    def __str__(self) -> str:
        return self.summary()


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:LISTED_KEYS])
    more = f", and {len(items) - LISTED_KEYS} more" if len(items) > LISTED_KEYS else ""
    return f"({shown}{more})"


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with a little-endian u64 header length followed by a JSON object."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_len < path.stat().st_size


def pretrained_weights_file(file_name: str, url: str, needed_by: str, weights_path: Optional[PathLike] = None,
                            error: type[UserError] = DataError, key: Optional[str] = None) -> Path:
    """Where the published weights ``file_name`` are: ``weights_path`` if given, else torch hub's cache.

    Nothing is ever downloaded: when the file is absent, ``error`` names it, where to put it and ``url`` (the
    problem's path is ``key``, else the file).
    """
    file = Path(os.path.expanduser(str(weights_path))) if weights_path else \
        Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not file.is_file():
        where = f"weights_path ({file})" if weights_path else f"torch hub's cache, {file}"
        raise error(f"{needed_by} needs {file_name}, not found at {where}: download {url} on a machine with "
                    "internet and put it there (or set weights_path, or TORCH_HOME)", key or str(file))
    return file


def read_weights_file(path: PathLike) -> dict[str, Any]:
    """Read a weight file without executing anything in it: the raw top-level dict (wrappers not removed)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weight file not found: {path}", str(path))
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise DataError(f"not a readable safetensors file ({exc}); re-download or re-export it", str(path)) from exc
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global outside torch's allow-list: this is exactly the "would run code" case.
        match = re.search(r"GLOBAL ([\w.]+)", str(exc))
        culprit = f" ({match.group(1)})" if match else ""
        raise DataError(
            f"refusing to load: this pickle refers to Python code{culprit} that would be imported or run when "
            "loaded; only plain tensors are read. Export a plain state dict (safetensors) with the code that "
            "made the file",
            str(path),
        ) from exc
    except Exception as exc:  # truncated zip, not a torch file at all, …
        raise DataError(f"not a readable PyTorch or safetensors weight file ({type(exc).__name__}: {exc})",
                        str(path)) from exc
    if not isinstance(data, Mapping):
        raise DataError(f"expected a dict of tensors, found a {type(data).__name__}", str(path))
    return dict(data)


def extract_state_dict(data: Mapping[str, Any], source: str = "") -> dict[str, torch.Tensor]:
    """Unwrap ``params_ema``/``params``/``state_dict``/``model`` and strip ``module.`` prefixes."""
    while not all(isinstance(v, torch.Tensor) for v in data.values()):
        inner = next((k for k in WRAPPER_KEYS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
            if tensors:
                data = tensors  # e.g. a state dict saved with a stray "epoch" entry
                break
            raise DataError(f"no weights found: top-level keys are {_first(sorted(map(str, data)))}, none of "
                            f"them tensors or one of {', '.join(WRAPPER_KEYS)}", source)
        data = data[inner]
    if not data:
        raise DataError("the file holds no tensors", source)
    out = {}
    for key, value in data.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _unwrap_network(net: nn.Module) -> nn.Module:
    """The module whose keys the file holds: inside DDP/DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            net = net.module
        elif hasattr(net, "_orig_mod") and isinstance(net._orig_mod, nn.Module):
            net = net._orig_mod
        else:
            return net


def compare_state_dicts(own: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> LoadReport:
    """How the tensors ``state`` (a file's) fit a network's state dict ``own``, by key and shape.

    Anything in ``state`` that is not a tensor counts as a mismatch (shape ``()``), so a report that is
    ``complete`` means ``net.load_state_dict(state)`` cannot fail.
    """
    report = LoadReport()
    # BatchNorm files from before PyTorch 0.4.1 have no step counter; torch fills it in, as its own strict load does.
    report.missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    report.unexpected = [k for k in state if k not in own]
    report.mismatched = [(k, tuple(v.shape) if isinstance(v, torch.Tensor) else (), tuple(own[k].shape))
                         for k, v in state.items()
                         if k in own and (not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape))]
    return report


def load_network_weights(net: nn.Module, path: PathLike, strict: bool = True) -> LoadReport:
    """Load a weight file into ``net``; return a :class:`LoadReport`.

    Accepts this project's safetensors, plain PyTorch state dicts, BasicSR checkpoints (``params_ema`` preferred
    over ``params``), the original ESRGAN release and anything a network's ``convert_state_dict`` understands.
    ``strict=True``: any missing, unexpected or wrongly shaped key raises a DataError listing them and nothing is
    loaded. ``strict=False``: every key that fits is loaded and the report says what was skipped.
    """
    path = Path(path)
    return load_network_state(net, extract_state_dict(read_weights_file(path), str(path)), str(path), strict)


def load_network_state(net: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                       strict: bool = True) -> LoadReport:
    """Load a state dict already read (from ``source``, named in errors) into ``net``, as
    :func:`load_network_weights` does a file."""
    net = _unwrap_network(net)
    if hasattr(net, "convert_state_dict"):
        state = net.convert_state_dict(state)
    own = net.state_dict()
    report = compare_state_dicts(own, state)
    if strict and not report.complete:
        raise DataError(f"weights do not fit {type(net).__name__}: {report.summary()}; fix the network options to "
                        "match the file, or load non-strictly (strict_load: false) to take what fits", source)
    skip = {k for k, _, _ in report.mismatched}
    fitting = {k: v for k, v in state.items() if k in own and k not in skip}
    net.load_state_dict(fitting, strict=False)
    report.loaded = len(fitting)
    return report


def save_network_weights(net: Union[nn.Module, Mapping[str, torch.Tensor]], path: PathLike,
                         metadata: Union[Mapping[str, str], None] = None) -> None:
    """Write a network's (or a state dict's) tensors to ``path`` as safetensors, atomically.

    Every key is kept: tensors sharing storage (tied weights) are written as separate copies, which safetensors
    requires and which ``load_network_weights`` loads back into the tied parameters.
    """
    from safetensors.torch import save_file

    state = _unwrap_network(net).state_dict() if isinstance(net, nn.Module) else net
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple[int, int]] = set()
    for key, value in state.items():
        tensor = value.detach().to("cpu")
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if storage in seen_storage or not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != \
                tensor.numel() * tensor.element_size():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen_storage.add((tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()))
        tensors[key] = tensor
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
    os.replace(tmp, path)
