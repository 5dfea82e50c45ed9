"""Weights & Biases as a second logger (``logger.wandb``): the same scalars, images and histograms as tensorboard.

Imported only when ``logger.wandb`` is set, and ``wandb`` only then, so nothing changes for runs without it.

Resuming continues the same wandb run: the run's id is kept in the run folder (``wandb_id.txt``), and every value
is logged against the trainer's iteration as its own x-axis (``define_metric("*", step_metric="iteration")``)
rather than wandb's internal step. A run resumed from checkpoint 3000 after it had logged up to 3400 therefore
logs 3001 again without wandb refusing a step that went backwards (the failure of trainers that pass
``step=iteration``); the charts show the replayed range twice, which is what happened.

``mode: auto`` (the default) logs online when a wandb API key is configured and api.wandb.ai answers within two
seconds, else offline into the run folder (``wandb sync experiments/NAME/wandb/offline-run-*`` uploads it later).
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from dlas.errors import ConfigError

log = logging.getLogger("dlas")

ID_FILE = "wandb_id.txt"


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError('logger.wandb is set but the wandb package is not installed: pip install -e ".[wandb]" '
                          "(or remove logger.wandb)", "logger.wandb") from exc
    return wandb


def _reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def choose_mode(mode: str, wandb: Any) -> str:
    """``online`` / ``offline`` / ``disabled`` as given; ``auto``: online only with an API key and the network."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = bool(wandb.api.api_key)
        except Exception:  # noqa: BLE001 (no settings file, no login: offline)
            has_key = False
    return "online" if has_key and _reachable() else "offline"


class WandbWriter:
    """Logs like :class:`dlas.logging.tensorboard.TensorboardWriter` (``add_scalars``, ``add_images``,
    ``add_histogram``, ``close``) into a wandb run that a resume continues."""

    def __init__(self, run_dir: Path, run_name: str, options: Mapping[str, Any], config: Optional[dict] = None):
        wandb = _import_wandb()
        self._wandb = wandb
        run_dir = Path(run_dir)
        id_file = run_dir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        mode = choose_mode(options.get("mode", "auto"), wandb)
        self.run = wandb.init(project=options["project"], entity=options.get("entity"),
                              name=options.get("name") or run_name, group=options.get("group"),
                              tags=list(options.get("tags") or []), notes=options.get("notes"), id=run_id,
                              resume="allow", dir=str(run_dir), mode=mode, config=config)
        id_file.write_text(run_id)
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")
        log.info("wandb: %s run %s (%s)%s", mode, run_id, options["project"],
                 "; upload later with `wandb sync` on the run folder's wandb/ folder" if mode == "offline" else "")

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log({**{k: float(v) for k, v in values.items()}, "iteration": step})

    def add_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        batch = (images.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8)
        pictures = [self._wandb.Image(image.permute(1, 2, 0).numpy()) for image in batch]
        self.run.log({tag: pictures, "iteration": step})

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        weights = values.detach().float().cpu().numpy()
        edges = np.arange(len(weights) + 1, dtype=np.float64)
        self.run.log({tag: self._wandb.Histogram(np_histogram=(weights, edges)), "iteration": step})

    def close(self) -> None:
        self.run.finish()
