"""What a run prints: the window of steps since the last print, the progress bar, and the summary at the end.

One host sync per print (the window's sums read in one go); the progress bar's losses are refreshed at most once a
second, so a fast GPU step never waits for the host to show them.
"""
from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

log = logging.getLogger("dlas")

POSTFIX_SECONDS = 1.0


def duration(seconds: float) -> str:
    """``1h02m``, ``12m34s`` or ``45s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class LogWindow:
    """The logged values of the steps since the last print, turned into a log line, scalars and warnings."""

    def __init__(self, trainer: Any, batch_size: int, niter: int, dist: Any = None, writer: Any = None,
                 dataset: Any = None, is_main: bool = True):
        self.trainer, self.batch_size, self.niter = trainer, batch_size, niter
        self.dist, self.writer, self.dataset, self.is_main = dist, writer, dataset, is_main
        self.step_names = [step.name for step in trainer.steps]
        # a step that trains one network logs its grad norm once (STEP/grad_norm), not again as grad_norm/NET
        self.single = {net for step in trainer.steps if len(step.training) == 1 for net in step.training}
        self.started = time.perf_counter()
        self.start_iteration = trainer.iteration
        self._postfix_at = 0.0
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Any] = {}
        self.count = 0
        self.data_time = 0.0
        self.opened = time.perf_counter()

    def add(self, logs: Mapping[str, torch.Tensor], data_time: float) -> None:
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.count += 1
        self.data_time += data_time

    def flush(self, step: int) -> dict[str, float]:
        """Log the window's means (one host sync), write them to the writers and start a new window."""
        n = max(self.count, 1)
        keys = list(self.sums)
        device = self.trainer.device
        sums = torch.stack([torch.as_tensor(self.sums[k]).float().to(device) for k in keys]).tolist() if keys else []
        values = {k: v / n for k, v in zip(keys, sums) if not (k.startswith("grad_norm/") and k[10:] in self.single)}
        if self.dist:
            values = self.dist.average_scalars(values)
        elapsed = max(time.perf_counter() - self.opened, 1e-9)
        values["perf/samples_per_sec"] = n * self.batch_size / elapsed
        values["perf/data_wait_fraction"] = self.data_time / elapsed
        values["perf/peak_memory_mb"] = peak_memory_mb(device)
        values["train/bad_steps_total"] = float(self.trainer.bad_total)
        if hasattr(self.dataset, "bad_count"):
            values["data/bad_images"] = float(self.dataset.bad_count)
        for step_obj in self.trainer.steps:
            values[f"lr/{step_obj.name}"] = step_obj.optimizer.param_groups[0]["lr"]
        self._debug_info(values, step)
        if self.is_main:
            self._warn_skipped(values, step)
            done = step - self.start_iteration
            rate = done / max(time.perf_counter() - self.started, 1e-9)
            eta = f" eta {duration((self.niter - step) / rate)}" if rate > 0 and step < self.niter else ""
            text = " ".join(f"{k}={v:.4g}" for k, v in values.items()
                            if "/weighted" not in k and not k.startswith("skipped/"))
            log.info("step %d/%d (%.3g it/s%s) %s", step, self.niter, rate, eta, text)
            if self.writer:
                self.writer.add_scalars(values, step)
        self.reset()
        return values

    def _debug_info(self, values: dict[str, float], step: int) -> None:
        for name, net in self.trainer.networks.items():
            if not hasattr(net, "debug_info"):
                continue
            for key, value in net.debug_info().items():
                tag = f"debug/{name}/{key}"
                if torch.is_tensor(value) and value.dim() == 4:  # images
                    if self.writer and self.is_main:
                        self.writer.add_images(tag, value, step)
                elif torch.is_tensor(value) and value.dim() == 1:  # a distribution (expert usage, codes)
                    if self.writer and self.is_main:
                        self.writer.add_histogram(tag, value, step)
                else:
                    values[tag] = float(value)

    def _warn_skipped(self, values: Mapping[str, float], step: int) -> None:
        """The NaN guard's skipped updates of the window, with the values that were not finite."""
        for name in self.step_names:
            fraction = values.get(f"skipped/{name}", 0.0)
            if fraction > 0:
                culprits = [k for k, v in values.items() if k.startswith(f"{name}/") and not math.isfinite(v)]
                log.warning("step %d: %d of the last %d updates of step '%s' were skipped (non-finite %s); %d in a "
                            "row so far", step, round(fraction * max(self.count, 1)), max(self.count, 1), name,
                            ", ".join(culprits) or "gradient", int(self.trainer.bad_steps))

    def postfix(self, progress: Any, logs: Mapping[str, torch.Tensor]) -> None:
        """Show the latest step's losses on the progress bar, at most once a second (a host sync)."""
        now = time.perf_counter()
        if not self.is_main or progress.disable or now - self._postfix_at < POSTFIX_SECONDS:
            return
        self._postfix_at = now
        keys = [k for k in logs if k.split("/")[0] in self.step_names and k.count("/") == 1
                and not k.endswith(("/grad_norm", "/total"))][:4]
        if keys:
            values = torch.stack([logs[k].float() for k in keys]).tolist()
            progress.set_postfix_str(" ".join(f"{k}={v:.4g}" for k, v in zip(keys, values)), refresh=False)


def progress_bar(name: str, start: int, total: int, is_main: bool) -> Any:
    """A tqdm bar on a terminal; none when stdout is redirected to a file (it would fill it with updates)."""
    from tqdm import tqdm

    shown = is_main and sys.stderr.isatty()
    return tqdm(total=total, initial=start, disable=not shown, dynamic_ncols=True, unit="it", desc=name,
                leave=True)


def summary_lines(cfg: Mapping[str, Any], run_dir: Path, window: LogWindow, step: int, stopped: bool,
                  best: Optional[dict], evaluator_lines: list[str], last_saved: int) -> list[str]:
    """The block every run ends with: how far and how fast, the numbers, where everything is, what to run next."""
    from dlas.inference.tasks import default_task
    from dlas.registry import TASKS

    elapsed = time.perf_counter() - window.started
    done = step - window.start_iteration
    lines = [f"{'stopped' if stopped else 'finished'} at step {step} of {cfg['train']['niter']}: {done} steps in "
             f"{duration(elapsed)} ({done / max(elapsed, 1e-9):.3g} it/s, "
             f"{done * window.batch_size / max(elapsed, 1e-9):.3g} samples/s)"]
    lines += [f"final validation {line}" for line in evaluator_lines]
    if best:
        lines.append(f"best {best['metric']} = {best['value']:.4g} at step {best['step']} (dlas-test --best uses it)")
    if cfg["train"]["ema"]:
        lines.append(f"validation scored the EMA weights (rate {cfg['train']['ema']['rate']}), as dlas-test does by "
                     "default; after few steps they lag the raw ones (--no-ema)")
    held = [f"checkpoints/{last_saved}"] if last_saved > 0 else []
    held += [f"{name}/" for name in ("val", "visuals") if (run_dir / name).is_dir()] + ["train.log"]
    where = f"run folder {run_dir}: {', '.join(held)}"
    if cfg["logger"]["tensorboard"]:
        where += f"; tensorboard --logdir {run_dir / 'tb'}"
    lines.append(where)
    run = shlex.quote(str(run_dir))
    if stopped:
        lines.append("resume: run the same command again")
    else:
        task = default_task(cfg)
        lines.append(f"try it: python codes/test.py --run {run} {TASKS.get(task).usage}")
    return lines


def log_summary(lines: list[str]) -> None:
    rule = "-" * 20
    log.info("%s run summary %s", rule, rule)
    for line in lines:
        log.info("  %s", line)
