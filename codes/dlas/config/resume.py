"""What may change in a config when a run resumes, and what may not.

A resumed run restores from its checkpoint the weights of its networks, the state of each step's optimizer and
learning-rate scheduler, the EMA averages, the RNGs and the data position; everything else is read from the
config afresh. So:

* **may change**: ``train.niter`` and the rest of ``train`` (except ``lr_scheduler``), ``datasets``, losses
  (weights, gates), injectors, gates of steps, ``eval``, ``logger``, ``path``, ``seed``, ``precision``, new
  steps (their optimizers start fresh), removed steps and networks, a network's options as long as its weights
  keep their names and shapes (the trainer checks that against the checkpoint);
* **may not**: a network's ``type``, a new network (the checkpoint has no weights for it), what a step trains
  (``training``: its optimizer state belongs to those parameters), a step's ``optimizer`` and its learning-rate
  scheduler (``steps.NAME.lr_scheduler`` or ``train.lr_scheduler``): their state comes from the checkpoint, which
  would silently override a changed ``lr`` or ``milestones``, or not fit another ``type`` at all.

:func:`resume_changes` is called before anything in the run folder is written: the changes that are allowed
are returned to be reported, the others raise one :class:`~dlas.errors.ConfigError` line each.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from dlas.config.yaml_io import dump_yaml, parse_value, read_yaml
from dlas.errors import ConfigError, DataError, Problem, UserError

_MISSING = object()
LISTED_CHANGES = 12  # a longer list of allowed changes ends in "and N more"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted.path: value}`` of the leaves of nested mappings (lists and empty mappings are leaves)."""
    if isinstance(data, dict) and data:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: data}


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(not set)"
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).removesuffix("\n...\n")
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def _scheduler(cfg: Mapping[str, Any], step: str) -> tuple[str, Any]:
    """Where step ``step``'s learning-rate scheduler comes from, and what it is."""
    own = (cfg.get("steps") or {}).get(step, {}).get("lr_scheduler")
    if own is not None:
        return f"steps.{step}.lr_scheduler", own
    return "train.lr_scheduler", (cfg.get("train") or {}).get("lr_scheduler")


def _frozen_part(path: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> Optional[tuple[str, str]]:
    """``(part, why)`` when the change at ``path`` belongs to a part of the config a resume cannot change."""
    parts = path.split(".")
    if parts[0] == "networks" and len(parts) == 3 and parts[2] == "type" and parts[1] in (old.get("networks") or {}):
        return path, "the checkpoint holds the weights of another kind of network"
    if parts[0] == "steps" and len(parts) >= 3 and parts[1] in (old.get("steps") or {}) and \
            parts[1] in (new.get("steps") or {}):
        if parts[2] == "training":
            return ".".join(parts[:3]), "the step's optimizer state belongs to the parameters of the networks it " \
                                        "trained"
        if parts[2] == "optimizer":
            return ".".join(parts[:3]), "a resumed step restores its optimizer, settings included, from the " \
                                        "checkpoint"
    return None


def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[Problem]]:
    """The changes from the config ``old`` (a run's ``config.yml``) to ``new`` a resume allows (as text), and a
    :class:`Problem` for each part of the config it cannot change (one per network, optimizer, scheduler)."""
    flat_old, flat_new = flatten(dict(old)), flatten(dict(new))
    changed = [p for p in dict.fromkeys([*flat_old, *flat_new])
               if flat_old.get(p, _MISSING) != flat_new.get(p, _MISSING)]
    added = [name for name in new.get("networks") or {} if name not in (old.get("networks") or {})]
    allowed: list[str] = []
    frozen: dict[str, tuple[str, list[str]]] = {f"networks.{name}": ("a network the checkpoint has no weights for",
                                                                      []) for name in added}
    for path in changed:
        if any(path.startswith(f"networks.{name}.") for name in added):
            continue
        change = f"{_show(flat_old.get(path, _MISSING))} -> {_show(flat_new.get(path, _MISSING))}"
        part = _frozen_part(path, old, new)
        if part:
            rest = path[len(part[0]):].lstrip(".")
            frozen.setdefault(part[0], (part[1], []))[1].append(f"{rest}: {change}" if rest else change)
        else:
            allowed.append(f"{path}: {change}")
    for step in new.get("steps") or {}:
        if step in (old.get("steps") or {}):
            old_where, old_scheduler = _scheduler(old, step)
            new_where, new_scheduler = _scheduler(new, step)
            if old_scheduler != new_scheduler:
                why = f"step '{step}' restores its learning-rate scheduler, settings included, from the checkpoint"
                change = f"{_show(old_scheduler)} -> {_show(new_scheduler)}"
                frozen[new_where] = (why, [change if old_where == new_where else f"{old_where}: {change}"])
    problems = [Problem(part, f"changed ({'; '.join(texts)}): {why}" if texts else why)
                for part, (why, texts) in frozen.items()]
    return allowed, problems


def resume_changes(run_dir: Path, cfg: Mapping[str, Any], checkpoint: str) -> list[str]:
    """Compare ``cfg`` with the ``config.yml`` of the run folder being resumed (from ``checkpoint``, for messages).

    Returns the allowed changes as ``path: old -> new`` lines; raises a ConfigError with one line per change a
    resume cannot honour (naming what to do instead), or a DataError when ``config.yml`` cannot be read. Reads
    only: nothing is written.
    """
    file = Path(run_dir) / "config.yml"
    if not file.is_file():
        return []
    try:
        old, _ = read_yaml(file, str(file))
    except UserError as exc:
        raise DataError(f"{exc.problems[0].message}; it records the config the run was trained with: restore it, "
                        "or move it aside to resume without comparing configs", str(file)) from None
    if not isinstance(old, dict):
        raise DataError("does not hold a mapping of config sections; restore it, or move it aside to resume "
                        "without comparing configs", str(file))
    allowed, problems = compare(old, parse_value(dump_yaml(dict(cfg))))
    if problems:
        hint = (f"; a resume from {checkpoint} cannot change that: start a new run from its weights instead (another "
                f"name or --fresh, with path.pretrain_model_NET={checkpoint}/NET.safetensors)")
        raise ConfigError([Problem(p.path, p.message + hint) for p in problems])
    return allowed


def describe_changes(changes: list[str]) -> str:
    """The allowed changes of a resume as one line."""
    shown = "; ".join(changes[:LISTED_CHANGES])
    more = f"; and {len(changes) - LISTED_CHANGES} more" if len(changes) > LISTED_CHANGES else ""
    return shown + more
