"""Using a trained network: tiled inference, image files in and out, and loading a run's checkpoint.

``dlas-test``, ``codes/process_video.py`` and the ``sr`` evaluator share these, so a model gives the same
pixels in validation, on a folder of images and on a video.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional, Union

import numpy as np
import torch

from dlas.errors import ConfigError, DataError

Forward = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------- tensors <-> images
def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """A CHW (or 1xCxHxW) RGB tensor in [0, 1] as an HWC uint8 array, rounded exactly as a saved PNG is."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
        image = image[0]
    quantised = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return quantised.permute(1, 2, 0).cpu().numpy()


def load_image(path: Union[str, Path]) -> torch.Tensor:
    """Read an image file as a CHW float32 RGB tensor in [0, 1]; an unreadable file is a :class:`DataError`."""
    from dlas.data.image_file import UnreadableImage, read_image

    try:
        array = read_image(str(path))
    except UnreadableImage as exc:
        raise DataError(f"unreadable image: {exc}", str(path)) from exc
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def save_image(path: Union[str, Path], image: Union[torch.Tensor, np.ndarray]) -> None:
    """Write a CHW [0, 1] tensor or an HWC uint8 RGB array as an 8-bit image (format from the extension)."""
    from dlas.data.image_file import write_image

    array = tensor_to_uint8(image) if isinstance(image, torch.Tensor) else image
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_image(str(path), array)
    except OSError as exc:  # a file where a folder should be, a read-only disk, a full disk
        raise DataError(f"cannot write the image: {exc.strerror or exc}; choose another output folder",
                        str(path)) from exc


def prepare_output_folder(path: Union[str, Path]) -> Path:
    """Create the output folder ``path`` (a :class:`DataError` if that is impossible) and return it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the output folder: {exc.strerror or exc}", str(path)) from exc
    return path


def list_images(path: Union[str, Path]) -> list[Path]:
    """The image files of a folder (sorted, not recursive; hidden files such as macOS ``._x.png`` stubs
    skipped, as the datasets do), or ``[path]`` for a single file."""
    from dlas.data.image_file import is_image_file

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError("no such file or folder", str(path))
    files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p.name) and not p.name.startswith("."))
    if not files:
        raise DataError("folder holds no image files (.png, .jpg, ...)", str(path))
    return files


# ---------------------------------------------------------------------- tiled inference
def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread tile origins covering [0, size) with neighbours overlapping by at least ``overlap``."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _axis_weights(start: int, length: int, size: int, blank: int, ramp: int) -> torch.Tensor:
    """Blend weights along one axis of one tile (output pixels): 1 inside, 0 then a cosine rise near an edge
    shared with a neighbour, untouched at the image border where no neighbour exists."""
    weights = torch.ones(length)
    rise = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp).float() if ramp else None
    if start > 0:
        weights[:blank] = 0
        if ramp:
            weights[blank : blank + ramp] = rise
    if start + length < size:
        weights[length - blank :] = 0
        if ramp:
            weights[length - blank - ramp : length - blank] = rise.flip(0)
    return weights


def tiled_forward(net: Forward, lq: torch.Tensor, scale: int, tile: int, overlap: int) -> torch.Tensor:
    """Run ``net`` on overlapping ``tile`` x ``tile`` crops of the NCHW batch ``lq`` and blend them seamlessly.

    Neighbouring tiles overlap by at least ``overlap`` input pixels. In each overlap the first quarter next to
    a tile's edge gets weight 0 (those outputs saw the zero padding at the tile edge), the middle half a
    cosine cross-fade, normalised so weights sum to 1: for a network whose receptive-field radius is at most
    ``overlap // 4`` input pixels the result equals untiled inference up to float rounding; beyond that the
    cross-fade hides the seams. Memory is bounded by one tile's activations plus the full output.
    ``scale`` is the output/input size ratio. A tile as large as the image runs the network once.
    """
    if lq.dim() != 4:
        raise ValueError(f"tiled_forward expects an NCHW batch, got shape {tuple(lq.shape)}")
    if tile <= 0 or overlap < 0 or 2 * overlap > tile:
        raise ConfigError(f"tile overlap must be between 0 and half the tile size, got tile {tile} and overlap "
                          f"{overlap}", "tile_overlap")
    height, width = lq.shape[-2:]
    if height <= tile and width <= tile:
        return net(lq)
    blank = (overlap // 4) * scale
    ramp = overlap * scale - 2 * blank
    out: Optional[torch.Tensor] = None
    total = torch.zeros(1, 1, height * scale, width * scale, dtype=torch.float32, device=lq.device)
    for y in _tile_starts(height, tile, overlap):
        for x in _tile_starts(width, tile, overlap):
            h, w = min(tile, height), min(tile, width)
            result = net(lq[..., y : y + h, x : x + w])
            if result.shape[-2:] != (h * scale, w * scale):
                raise ValueError(f"network output {tuple(result.shape[-2:])} is not {scale}x its input {(h, w)}")
            if out is None:
                out = torch.zeros(*result.shape[:2], height * scale, width * scale, dtype=torch.float32, device=lq.device)
            wy = _axis_weights(y * scale, h * scale, height * scale, blank, ramp).to(lq.device)
            wx = _axis_weights(x * scale, w * scale, width * scale, blank, ramp).to(lq.device)
            weight = wy[:, None] * wx[None, :]
            region = (..., slice(y * scale, (y + h) * scale), slice(x * scale, (x + w) * scale))
            out[region] += result.float() * weight
            total[region] += weight
    return (out / total).to(lq.dtype)


def infer_scale(net: Forward, lq: torch.Tensor, tile: Optional[int] = None) -> int:
    """The network's upscaling factor, measured on a corner crop of ``lq`` (at most ``tile`` pixels a side)."""
    probe = lq[..., : tile or lq.shape[-2], : tile or lq.shape[-1]]
    out = net(probe)
    scale = out.shape[-1] // probe.shape[-1]
    if scale < 1 or out.shape[-1] != scale * probe.shape[-1] or out.shape[-2] != scale * probe.shape[-2]:
        raise ValueError(f"network output {tuple(out.shape[-2:])} is not an integer multiple of its input "
                         f"{tuple(probe.shape[-2:])}")
    return scale


def run_network(net: Forward, lq: torch.Tensor, scale: int, tile: Optional[int] = None, overlap: int = 16) -> torch.Tensor:
    """``net(lq)``, tiled when ``tile`` is set and the image is larger than one tile."""
    if tile:
        return tiled_forward(net, lq, scale, tile, overlap)
    return net(lq)


# ---------------------------------------------------------------------- precision
def autocast_context(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """A factory of the autocast context for ``fp32`` (none), ``bf16`` (CPU or GPU) or ``fp16`` (GPU only)."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision not in ("bf16", "fp16"):
        raise ConfigError(f"precision must be fp32, bf16 or fp16, got '{precision}'", "precision")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 needs a CUDA device; use bf16 or fp32 on the CPU", "precision")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; an explicit ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)", "device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but no CUDA device is available (use cpu or auto)", "device")
    return device


# ---------------------------------------------------------------------- trained runs
@dataclass
class TrainedNetwork:
    """A network loaded from a run folder, with where it came from."""

    network: torch.nn.Module
    name: str
    step: int
    weights_file: Path
    config: dict


def read_run_config(run_dir: Path) -> dict:
    """The resolved ``config.yml`` of a run folder, with its ``imports:`` plugins imported."""
    import yaml

    from dlas.config.load import plugin_path
    from dlas.registry import import_plugins

    file = Path(run_dir) / "config.yml"
    if not Path(run_dir).is_dir():
        raise DataError("run folder does not exist", str(run_dir))
    if not file.is_file():
        raise DataError("not a run folder: it has no config.yml", str(run_dir))
    try:
        cfg = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"unreadable YAML: {exc}", str(file)) from exc
    # A plugin file is recorded relative to the folder training ran in, which for experiments/NAME is two up.
    training_folder = Path(run_dir).resolve().parent.parent
    import_plugins([plugin_path(m, training_folder) for m in cfg.get("imports") or []])
    return cfg


def default_network_name(cfg: dict) -> str:
    """The network of the config's first ``sr`` evaluator, else ``generator``."""
    for ecfg in (cfg.get("eval") or {}).values():
        if isinstance(ecfg, dict) and ecfg.get("type") == "sr":
            return ecfg.get("network", "generator")
    return "generator"


def build_network(cfg: dict, name: str, option: str = "--network") -> torch.nn.Module:
    """Construct network ``name`` of ``cfg['networks']`` (untrained), ignoring trainer-only keys."""
    from dlas.registry import NETWORKS
    from dlas.trainer.trainer import NETWORK_KEYS

    networks = cfg.get("networks") or {}
    if name not in networks:
        from dlas.errors import did_you_mean

        raise ConfigError(f"no network '{name}' in the config{did_you_mean(name, networks)}; "
                          f"it has: {', '.join(networks) or '(none)'}", option)
    return NETWORKS.build(dict(networks[name]), f"networks.{name}", reserved=NETWORK_KEYS)


def select_checkpoint(run_dir: Path, step: Optional[int] = None, best: bool = False) -> tuple[int, Path]:
    """The checkpoint folder to use: step ``step``, the one in ``best.json``, or the newest complete one."""
    from dlas.trainer.checkpoint import list_checkpoints, read_best

    found = dict(list_checkpoints(Path(run_dir)))
    if not found:
        raise DataError("no complete checkpoint (a checkpoints/STEP folder with manifest.json); train first",
                        str(Path(run_dir) / "checkpoints"))
    if best:
        record = read_best(Path(run_dir))
        if not record:
            raise DataError("no best checkpoint recorded (checkpoints/best.json); set logger.keep_best when "
                            "training, or pick --step", str(Path(run_dir) / "checkpoints"))
        step = int(record["step"])
    if step is None:
        step = max(found)
    if step not in found:
        raise DataError(f"no complete checkpoint for step {step}; available: {', '.join(map(str, sorted(found)))}",
                        str(Path(run_dir) / "checkpoints"))
    return step, found[step]


def load_trained_network(
    run_dir: Union[str, Path],
    network: Optional[str] = None,
    step: Optional[int] = None,
    best: bool = False,
    ema: bool = True,
    device: Union[str, torch.device] = "cpu",
) -> TrainedNetwork:
    """Build a run's network from its ``config.yml`` and load a checkpoint's weights into it (eval mode).

    ``ema``: use ``NET_ema.safetensors`` when the checkpoint has it (the usual best weights), else ``NET``.
    """
    from dlas import load_network_weights

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    name = network or default_network_name(cfg)
    net = build_network(cfg, name)
    step, folder = select_checkpoint(run_dir, step, best)
    candidates = ([folder / f"{name}_ema.safetensors"] if ema else []) + [folder / f"{name}.safetensors"]
    file = next((f for f in candidates if f.is_file()), None)
    if file is None:
        raise DataError(f"checkpoint has no weights for network '{name}' ({name}.safetensors)", str(folder))
    load_network_weights(net, file)
    return TrainedNetwork(net.to(device).eval(), name, step, file, cfg)


def batch_forward(net: torch.nn.Module, temperature: Optional[float] = None) -> Forward:
    """The callable that upscales a batch: ``net.sample(lq, temperature=T)`` for stochastic networks when a
    temperature is given, else ``net(lq)``."""
    if temperature is None:
        return net
    if not hasattr(net, "sample"):
        raise ConfigError(f"{type(net).__name__} has no sample(lq, temperature) method; drop --temperature",
                          "--temperature")
    return lambda lq: net.sample(lq, temperature=temperature)


