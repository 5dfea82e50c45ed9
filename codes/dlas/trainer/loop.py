"""The train loop: data → steps → logs → visuals → validation → checkpoints, until ``train.niter``.

Read top to bottom: :meth:`TrainLoop.run` is the whole loop; each other method does one thing.
"""
from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from dlas import checkpoint as ckpt
from dlas.data.sampler import stop_workers
from dlas.evaluators.base import Validation
from dlas.trainer.trainer import ExtensibleTrainer

log = logging.getLogger("dlas")


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps in a row, a failed save); one line says what to do."""


class StopNow(KeyboardInterrupt):
    """A stop signal that ends the process at once; ``lost`` says whether trained steps went unsaved."""

    def __init__(self, message: str, lost: bool):
        super().__init__(message)
        self.lost = lost


class ValidationInterrupted(BaseException):
    """A stop signal cut a validation short (a BaseException, so an evaluator's ``except Exception`` passes it on)."""


class StopSignals:
    """SIGINT and SIGTERM over the whole of a training process, by phase (``phase`` is set by its owner).

    * ``starting`` (building, restoring: nothing trained yet): stop at once, nothing is lost;
    * ``training``: finish the current step, save, exit 0; a second signal a second or more later stops at once
      without saving (torchrun forwards SIGINT then SIGTERM within a millisecond, and a terminal's Ctrl-C reaches
      every rank: signals closer together are one request);
    * ``validating``: a single process leaves the validation at once and saves (SLURM's ``--signal=TERM@120``
      leaves no time to finish a long one); under DDP leaving mid-evaluator would strand the other ranks in a
      collective, so the ranks skip the remaining evaluators together (:meth:`leave_validation_if_requested`);
    * ``finished`` (the last checkpoint is saved): stop at once, nothing is lost.
    """

    def __init__(self, dist: Any = None):
        self.dist = dist
        self.phase = "starting"
        self.signal_name: Optional[str] = None  # the first signal received, if any
        self._first: Optional[float] = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def installed(self) -> bool:
        return bool(self._old)

    def install(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread): no handlers
                pass
        return self

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        first = self._first is None
        if first:
            self._first, self.signal_name = now, name
        elif now - self._first < 1.0:
            return
        if self.phase == "starting":
            raise StopNow(f"stopped by {name} during start-up, before the first step: nothing was trained, so there "
                          "is nothing to save", lost=False)
        if self.phase == "finished":
            raise StopNow(f"stopped by {name} after the last checkpoint was saved: nothing is lost", lost=False)
        if not first:
            raise StopNow(f"interrupted: a second {name} stopped the run at once, the steps since the last checkpoint "
                          "were not saved; running the same command again resumes from the newest checkpoint",
                          lost=True)
        validating = self.phase == "validating"
        log.info("received %s: %s, then saving", name, "leaving the validation" if validating else
                 "finishing the current step")
        if validating and self.dist is None:
            raise ValidationInterrupted(name)

    def leave_validation_if_requested(self) -> None:
        """Between evaluators: raise :class:`ValidationInterrupted` on every rank when any rank was signalled."""
        requested = self.dist.any_true(self.requested) if self.dist else self.requested
        if requested:
            raise ValidationInterrupted(self.signal_name or "a signal to another rank")


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as plain lists and numbers.

    Plain values load under ``torch.load(weights_only=True)`` and travel through ``all_gather_object`` (which
    cannot unpickle tensors), so one format serves checkpoints and DDP alike.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def check_rng_state(state: Any) -> None:
    """Raise (any exception) when :func:`set_rng_state` could not use ``state``; changes no generator."""
    version, internal, gauss = state["python"]
    random.Random().setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.Generator().set_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and not all(isinstance(s, list) for s in state["cuda"]):
        raise TypeError("the CUDA generator states are not lists of bytes")


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
        if self.is_main and self.log_cfg["tensorboard"]:
            from dlas.logging.tensorboard import TensorboardWriter
            self.writer = TensorboardWriter(self.run_dir / "tb")

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        niter = self.train_cfg["niter"]
        trainer, signals = self.trainer, self.signals
        own_signals = not signals.installed  # train() installs them itself, to cover the start-up too
        if own_signals:
            signals.install()
        signals.phase = "training"
        window: dict[str, Any] = {"logs": {}, "n": 0, "data_time": 0.0, "start": time.perf_counter()}
        progress = self._progress(trainer.iteration, niter)
        batches = iter(self.make_loader(trainer.iteration * self.batch_size))
        try:
            while trainer.iteration < niter and not self.stop_requested:
                tick = time.perf_counter()
                batch = next(batches)
                window["data_time"] += time.perf_counter() - tick
                logs = trainer.train_step(batch)
                step = trainer.iteration
                # a signal may reach one rank only; every rank must stop (and save) together
                self.stop_requested = self.dist.any_true(signals.requested) if self.dist else signals.requested
                self._accumulate(window, logs)
                progress.update(1)
                if step % self.log_cfg["print_freq"] == 0 or step == niter:
                    self._log_window(window, step, progress)
                if self.log_cfg["visuals"] and step % self.log_cfg["visual_freq"] == 0:
                    self._write_visuals(step)
                new_best = False
                if self.validation and self.train_cfg["val_freq"] and not self.stop_requested and (
                        step % self.train_cfg["val_freq"] == 0 or step == niter):
                    new_best = self._validate(step)
                max_bad = self.train_cfg["max_bad_steps"]  # 0: never stop
                if max_bad and trainer.bad_steps >= max_bad:
                    self.save(step)
                    raise TrainingStopped(
                        f"{int(trainer.bad_steps)} steps in a row had non-finite losses or gradients (see the warnings "
                        f"above); saved checkpoint {step}. Lower the learning rate, enable grad_clip, or use bf16 "
                        f"instead of fp16, then resume.")
                if step % self.log_cfg["save_checkpoint_freq"] == 0 or new_best:
                    self.save(step)
            stop_workers(batches)  # before the last save, so that nothing after it waits for loader workers
            if self.last_saved != trainer.iteration:
                self.save(trainer.iteration)
            signals.phase = "finished"
            if self.stop_requested:
                log.info("stopped by signal at step %d; checkpoint saved, resume by running the same command",
                         trainer.iteration)
            else:
                log.info("training finished at step %d", trainer.iteration)
                self._summarize()
        finally:
            stop_workers(batches)
            progress.close()
            if own_signals:
                signals.restore()
            if self.writer:
                self.writer.close()

    # ------------------------------------------------------------------ logging
    def _progress(self, start: int, total: int):
        from tqdm import tqdm

        return tqdm(total=total, initial=start, disable=not self.is_main, dynamic_ncols=True, unit="it",
                    desc=self.cfg["name"], leave=True)

    def _accumulate(self, window: dict, logs: Mapping[str, torch.Tensor]) -> None:
        for key, value in logs.items():
            window["logs"][key] = window["logs"].get(key, 0) + value
        window["n"] += 1

    def _log_window(self, window: dict, step: int, progress) -> None:
        n = max(window["n"], 1)
        keys = list(window["logs"])
        device = self.trainer.device
        sums = torch.stack([torch.as_tensor(window["logs"][k]).float().to(device) for k in keys]).tolist() \
            if keys else []  # the window's one host sync
        values = {k: v / n for k, v in zip(keys, sums)}
        if self.dist:
            values = self.dist.average_scalars(values)
        elapsed = time.perf_counter() - window["start"]
        values["perf/samples_per_sec"] = n * self.batch_size / max(elapsed, 1e-9)
        values["perf/data_wait_fraction"] = window["data_time"] / max(elapsed, 1e-9)
        values["perf/peak_memory_mb"] = peak_memory_mb(self.trainer.device)
        values["train/bad_steps_total"] = float(self.trainer.bad_total)
        if hasattr(self.dataset, "bad_count"):
            values["data/bad_images"] = float(self.dataset.bad_count)
        for step_obj in self.trainer.steps:
            values[f"lr/{step_obj.name}"] = step_obj.optimizer.param_groups[0]["lr"]
        for name, net in self.trainer.networks.items():
            if hasattr(net, "debug_info"):
                for key, value in net.debug_info().items():
                    tag = f"debug/{name}/{key}"
                    if torch.is_tensor(value) and value.dim() == 4:  # images
                        if self.writer:
                            self.writer.add_images(tag, value, step)
                    elif torch.is_tensor(value) and value.dim() == 1:  # a distribution (expert usage, codes)
                        if self.writer:
                            self.writer.add_histogram(tag, value, step)
                    else:
                        values[tag] = float(value)
        if self.is_main:
            step_names = {step_obj.name for step_obj in self.trainer.steps}
            losses = {k: v for k, v in values.items()
                      if k.split("/")[0] in step_names and k.count("/") == 1 and not k.endswith("/grad_norm")}
            progress.set_postfix_str(" ".join(f"{k}={v:.4g}" for k, v in list(losses.items())[:4]), refresh=False)
            text = " ".join(f"{k}={v:.4g}" for k, v in values.items() if "/weighted" not in k)
            log.info("step %d %s", step, text)
            if self.writer:
                self.writer.add_scalars(values, step)
        window.update(logs={}, n=0, data_time=0.0, start=time.perf_counter())

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
            log.info("validation at step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
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
    def _summarize(self) -> None:
        """What the evaluators have to say about the final validation (an SR evaluator: PSNR against bicubic's)."""
        if self.validation and self.last_metrics:
            for line in self.validation.summary(self.last_metrics):
                log.info("final validation %s", line)

    def save(self, step: int) -> None:
        state = self.trainer.state_dict()
        state["samples"] = step * self.batch_size
        state["rng"] = self.dist.gather_rng(rng_state()) if self.dist else {0: rng_state()}
        state["types"] = component_types(self.trainer)
        self.last_saved = step
        if not self.is_main:
            return
        try:
            folder = ckpt.save_checkpoint(self.run_dir, step, self.trainer.weights(), state)
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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
