"""The train loop: data → steps → logs → visuals → validation → checkpoints, until ``train.niter``.

Read top to bottom: :meth:`TrainLoop.run` is the whole loop; each other method does one thing.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from dlas import checkpoint as ckpt
from dlas.data.sampler import stop_workers
from dlas.evaluators.base import Validation
from dlas.trainer.logs import LogWindow, log_summary, progress_bar, summary_lines
from dlas.trainer.rng import rng_state
from dlas.trainer.signals import StopSignals, ValidationInterrupted
from dlas.trainer.trainer import ExtensibleTrainer

log = logging.getLogger("dlas")


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps in a row, a failed save); one line says what to do."""


def component_types(trainer: ExtensibleTrainer) -> dict[str, dict[str, Optional[str]]]:
    """The class of each step's optimizer and scheduler: saved with the state, so a resume can say what changed."""
    def name(obj: Any) -> Optional[str]:
        return None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"

    return {"optimizers": {step.name: name(step.optimizer) for step in trainer.steps},
            "schedulers": {step.name: name(step.scheduler) for step in trainer.steps}}


class TrainLoop:
    """Runs an :class:`ExtensibleTrainer` over the train loader with logging, validation and checkpoints."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, trainer: ExtensibleTrainer, make_loader,
                 validation: Optional[Validation] = None, dist=None, dataset=None,
                 signals: Optional[StopSignals] = None):
        self.cfg, self.run_dir, self.trainer = cfg, Path(run_dir), trainer
        self.make_loader = make_loader  # start_samples -> iterable of batches (resumes mid-epoch)
        # step -> {metric: value} (the same on every rank); None or empty: no validation
        self.validation = validation if validation else None
        self.dataset = dataset  # the train set, for its count of skipped bad images
        # a restored trainer sits on its checkpoint
        self.last_saved = trainer.iteration if trainer.iteration > 0 else -1
        self.last_metrics: dict[str, float] = {}
        self.warned_missing_best = False
        self.dist = dist
        self.is_main = dist is None or dist.rank == 0
        self.train_cfg, self.log_cfg = cfg["train"], cfg["logger"]
        self.batch_size = cfg["datasets"]["train"]["batch_size"]
        self.stop_requested = False
        self.signals = signals if signals is not None else StopSignals(dist)
        self.best = ckpt.read_best(self.run_dir)
        self.writer = None
        if self.is_main:
            from dlas.logging.writers import open_writers

            self.writer = open_writers(cfg, self.run_dir)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        niter = self.train_cfg["niter"]
        trainer, signals = self.trainer, self.signals
        own_signals = not signals.installed  # train() installs them itself, to cover the start-up too
        if own_signals:
            signals.install()
        signals.phase = "training"
        window = LogWindow(trainer, self.batch_size, niter, self.dist, self.writer, self.dataset, self.is_main)
        progress = progress_bar(self.cfg["name"], trainer.iteration, niter, self.is_main)
        batches = iter(self.make_loader(trainer.iteration * self.batch_size))
        try:
            while trainer.iteration < niter and not self.stop_requested:
                tick = time.perf_counter()
                batch = next(batches)
                data_time = time.perf_counter() - tick
                logs = trainer.train_step(batch)
                step = trainer.iteration
                # a signal may reach one rank only; every rank must stop (and save) together
                self.stop_requested = self.dist.any_true(signals.requested) if self.dist else signals.requested
                window.add(logs, data_time)
                progress.update(1)
                window.postfix(progress, logs)
                if step % self.log_cfg["print_freq"] == 0 or step == niter:
                    window.flush(step)
                    self._stop_if_diverged(step)  # the guard's counters are read when the window is
                if self.log_cfg["visuals"] and step % self.log_cfg["visual_freq"] == 0:
                    self._write_visuals(step)
                new_best = False
                if self.validation and self.train_cfg["val_freq"] and not self.stop_requested and (
                        step % self.train_cfg["val_freq"] == 0 or step == niter):
                    new_best = self._validate(step)
                if step % self.log_cfg["save_checkpoint_freq"] == 0 or new_best:
                    self._stop_if_diverged(step)
                    self.save(step)
            stop_workers(batches)  # before the last save, so that nothing after it waits for loader workers
            if self.last_saved != trainer.iteration:
                self.save(trainer.iteration)
            signals.phase = "finished"
            if self.is_main:
                evaluators = self.validation.summary(self.last_metrics) if self.validation and self.last_metrics \
                    else []
                log_summary(summary_lines(self.cfg, self.run_dir, window, trainer.iteration, self.stop_requested,
                                          self.best, evaluators, self.last_saved))
        finally:
            stop_workers(batches)
            progress.close()
            if own_signals:
                signals.restore()
            if self.writer:
                self.writer.close()

    # ------------------------------------------------------------------ logging
    def _stop_if_diverged(self, step: int) -> None:
        """``train.max_bad_steps`` non-finite steps in a row: save and stop with advice (0: never stop)."""
        max_bad = self.train_cfg["max_bad_steps"]
        bad = int(self.trainer.bad_steps)  # the same on every rank: the guard's verdict is all-reduced
        if max_bad and bad >= max_bad:
            self.save(step)
            raise TrainingStopped(
                f"{bad} steps in a row had non-finite losses or gradients (see the warnings above); saved "
                f"checkpoint {step}. Lower the learning rate, enable grad_clip, or use bf16 instead of fp16, then "
                "resume.")

    def _write_visuals(self, step: int) -> None:
        if not self.is_main:
            return
        from dlas.logging.visuals import save_visuals

        state = self.trainer.last_state
        keys = [k for k in self.log_cfg["visuals"] if isinstance(state.get(k), torch.Tensor)]
        save_visuals({k: state[k] for k in keys}, self.run_dir / "visuals" / str(step), self.writer, step)

    # ------------------------------------------------------------------ validation
    def _validate(self, step: int) -> bool:
        """Run the evaluators; return whether the ``logger.keep_best`` metric improved.

        A stop signal leaves the validation (see :class:`StopSignals`): what remains of it is skipped, no metric is
        recorded, and the loop saves at once.
        """
        self.signals.phase = "validating"
        try:
            metrics = self.validation(step)
        except ValidationInterrupted as exc:
            log.warning("validation at step %d left early (%s): its remaining work is skipped", step, exc)
            self.stop_requested = True
            return False
        finally:
            self.signals.phase = "training"
        self.last_metrics = metrics
        if self.is_main and self.writer:
            for key, images in self.validation.images.items():
                self.writer.add_images(f"val/{key}", images, step)
        if self.is_main and metrics:
            out = self.run_dir / "val" / str(step)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
            log.info("validation at step %d%s: %s", step, " (EMA weights)" if self.trainer.ema else "",
                     " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if self.writer:
                self.writer.add_scalars({f"val/{k}": v for k, v in metrics.items()}, step)
        # every rank has the same metrics, so every rank takes the same decision (saving is collective)
        key = self.log_cfg["keep_best"]
        if key and metrics and key not in metrics and not self.warned_missing_best:
            log.warning("logger.keep_best is '%s', but validation reported only %s: no best checkpoint is kept "
                        "(does the evaluator compute that metric?)", key, ", ".join(sorted(metrics)))
            self.warned_missing_best = True
        if not key or key not in metrics or not math.isfinite(metrics[key]):
            return False
        higher = self.validation.higher_is_better(key)
        value = metrics[key]
        if self.best is None or (value > self.best["value"] if higher else value < self.best["value"]):
            self.best = {"metric": key, "value": value, "step": step}
            return True
        return False

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int) -> None:
        state = self.trainer.state_dict()
        state["samples"] = step * self.batch_size
        state["rng"] = self.dist.gather_rng(rng_state()) if self.dist else {0: rng_state()}
        state["types"] = component_types(self.trainer)
        weights = self.trainer.weights()  # on every rank: under FSDP gathering the shards is collective
        self.last_saved = step
        if not self.is_main:
            return
        try:
            folder = ckpt.save_checkpoint(self.run_dir, step, weights, state)
            if self.best and self.best["step"] == step:
                ckpt.write_best(self.run_dir, self.best["metric"], self.best["value"], step)
        except ckpt.SaveError as exc:  # disk full, quota, permissions: stop loudly, never train on unsaved
            raise TrainingStopped(f"saving checkpoint {step} under {ckpt.checkpoint_root(self.run_dir)} failed: "
                                  f"{exc}. Earlier checkpoints are intact; free space or fix permissions, then "
                                  "run the same command to resume.") from exc
        protect = [self.best["step"]] if self.best else []
        deleted = ckpt.prune_checkpoints(self.run_dir, self.log_cfg["keep_checkpoints"], self.log_cfg["keep_every"],
                                         protect)
        log.info("saved checkpoint %s%s", folder, f" (pruned {deleted})" if deleted else "")
