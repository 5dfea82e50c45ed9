"""Warnings about a valid config that will not do what its author most likely meant.

These are not errors (the run is well defined), but each is the kind of thing that silently wastes a run: a cosine
schedule longer than the run never decays, a milestone after the last step never applies, visuals asked for at a
frequency the run never reaches are never written. ``dlas-train`` prints them with ``--validate`` and logs them
when a run starts.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from dlas.errors import Problem


def config_warnings(cfg: Mapping[str, Any]) -> list[Problem]:
    """What in the resolved ``cfg`` is inconsistent with its length, ``train.niter``, one problem per finding."""
    niter = cfg["train"]["niter"]
    found: list[Problem] = []
    entries = [("train.lr_scheduler", cfg["train"].get("lr_scheduler"))]
    entries += [(f"steps.{name}.lr_scheduler", step.get("lr_scheduler")) for name, step in cfg["steps"].items()]
    for path, entry in entries:
        for where, scheduler in _nested(path, entry):
            found += _scheduler_warnings(where, scheduler, niter)
    logger = cfg["logger"]
    if logger["visuals"] and logger["visual_freq"] > niter:
        found.append(Problem("logger.visual_freq", f"{logger['visual_freq']} is more than train.niter ({niter}): "
                                                   f"no visuals will be written; set logger.visual_freq={niter}"))
    return found


def _nested(path: str, entry: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """A scheduler entry and those it wraps (``linear_warmup``'s ``scheduler``)."""
    while isinstance(entry, Mapping):
        yield path, entry
        path, entry = f"{path}.scheduler", entry.get("scheduler")


def _scheduler_warnings(path: str, scheduler: Mapping[str, Any], niter: int) -> list[Problem]:
    found = []
    periods = scheduler.get("periods")
    if isinstance(periods, list) and all(isinstance(p, int) for p in periods) and sum(periods) > niter:
        found.append(Problem(f"{path}.periods", f"the periods add up to {sum(periods)} steps, more than train.niter "
                                                f"({niter}): the learning rate is cut off before it decays; set "
                                                f"{path}.periods=[{niter}]"))
    milestones = scheduler.get("milestones")
    if isinstance(milestones, list):
        late = [m for m in milestones if isinstance(m, int) and m >= niter]
        if late:
            found.append(Problem(f"{path}.milestones", f"{', '.join(map(str, late))} not before train.niter "
                                                       f"({niter}): never applied"))
    warmup = scheduler.get("warmup_steps")
    if isinstance(warmup, int) and warmup >= niter:
        found.append(Problem(f"{path}.warmup_steps", f"{warmup} is not below train.niter ({niter}): the whole run "
                                                     "is warm-up"))
    return found
