"""Step-dependent switches and numbers of a config: loss-weight schedules and the ``after/before/every`` gates.

Both work on the trainer's step counter, which is 1-based: ``ctx.step`` is the number of the iteration being
computed, so while step ``s`` runs, ``s - 1`` optimizer steps are complete. The conventions below all follow from
reading ``after: N`` as "once N steps have been completed":

* ``Gate(after=100000)`` is off for steps 1 … 100000 and on from step 100001;
* ``Gate(before=200000)`` is on for steps 1 … 200000 and off from step 200001, so ``after: 100000,
  before: 200000`` runs exactly 100000 steps;
* ``Gate(every=4)`` is on for steps 4, 8, 12, …;
* a weight schedule holds ``from`` up to and including step ``start`` and reaches ``to`` at step ``end``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

from dlas.errors import ConfigError, did_you_mean

ScheduleKind = Literal["linear", "cosine", "step"]
_SCHEDULE_KINDS = ("linear", "cosine", "step")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@dataclass(frozen=True)
class Gate:
    """When a step, injector or loss runs, from its ``after``, ``before`` and ``every`` keys.

    ``active(step)`` is true when ``step > after`` (it starts once ``after`` steps are done), ``step <= before``
    (it stops once ``before`` steps are done) and ``step % every == 0``; a key that is ``None`` does not restrict.
    A gate holds no state, so nothing about it needs saving in a checkpoint.
    """

    after: Optional[int] = None
    before: Optional[int] = None
    every: Optional[int] = None
    path: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for key, minimum in (("after", 0), ("before", 1), ("every", 1)):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < minimum):
                raise ConfigError(f"'{key}' must be an integer >= {minimum} (a step count), got {value!r}",
                                  _join(self.path, key))
        if self.after is not None and self.before is not None and self.before <= self.after:
            raise ConfigError(f"'before: {self.before}' must be greater than 'after: {self.after}', "
                              "otherwise this never runs", _join(self.path, "before"))

    def active(self, step: int) -> bool:
        """Whether the gated thing runs during the 1-based iteration ``step``."""
        if self.after is not None and step <= self.after:
            return False
        if self.before is not None and step > self.before:
            return False
        return self.every is None or step % self.every == 0


@dataclass(frozen=True)
class ConstantWeight:
    """A loss weight that does not change."""

    value: float

    def __call__(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class ScheduledWeight:
    """A loss weight moving from ``start_value`` to ``end_value`` between the steps ``start`` and ``end``.

    ``linear`` interpolates linearly; ``cosine`` follows half a cosine (flat at both ends, fastest in the
    middle); ``step`` jumps from ``start_value`` to ``end_value`` right after step ``start`` (``end`` unused).
    """

    kind: ScheduleKind
    start_value: float
    end_value: float
    start: int
    end: int

    def __call__(self, step: int) -> float:
        if step <= self.start:
            return self.start_value
        if self.kind == "step" or step >= self.end:
            return self.end_value
        progress = (step - self.start) / (self.end - self.start)
        if self.kind == "cosine":
            progress = (1.0 - math.cos(math.pi * progress)) / 2.0
        return self.start_value + (self.end_value - self.start_value) * progress


def build_weight(spec: Any, path: str) -> Callable[[int], float]:
    """A loss weight as a function of the 1-based step, from a config value.

    ``spec`` is a number (a constant weight) or a mapping
    ``{schedule: linear|cosine|step, from: 0.0, to: 1.0, start: 1000, end: 5000}``: the weight is ``from``
    up to and including step ``start``, ``to`` from step ``end`` on, and in between follows the schedule
    (``linear``: straight line; ``cosine``: half cosine). ``step`` jumps to ``to`` right after step ``start``
    and takes no ``end``. Anything else raises :class:`ConfigError` naming ``path``.
    """
    if _is_number(spec):
        return ConstantWeight(float(spec))
    if not isinstance(spec, dict):
        raise ConfigError(f"a loss weight is a number or a schedule mapping "
                          f"{{schedule: linear|cosine|step, from, to, start, end}}, got {spec!r}", path)
    kind = spec.get("schedule")
    if kind not in _SCHEDULE_KINDS:
        raise ConfigError(f"'schedule' must be one of {', '.join(_SCHEDULE_KINDS)}, got {kind!r}"
                          f"{did_you_mean(kind, _SCHEDULE_KINDS) if kind else ''}", _join(path, "schedule"))
    needed = ["schedule", "from", "to", "start"] + ([] if kind == "step" else ["end"])
    for key in spec:
        if key not in needed:
            hint = "; a 'step' schedule jumps at 'start' and takes no 'end'" if key == "end" else \
                did_you_mean(key, needed)
            raise ConfigError(f"unknown key{hint}; a {kind} weight schedule takes {', '.join(needed)}",
                              _join(path, key))
    for key in needed[1:]:
        if key not in spec:
            raise ConfigError(f"a {kind} weight schedule needs '{key}'", _join(path, key))
    for key in ("from", "to"):
        if not _is_number(spec[key]):
            raise ConfigError(f"'{key}' must be a number, got {spec[key]!r}", _join(path, key))
    for key in needed[3:]:
        if not _is_int(spec[key]) or spec[key] < 0:
            raise ConfigError(f"'{key}' must be a step count (an integer >= 0), got {spec[key]!r}", _join(path, key))
    end = spec.get("end", spec["start"])
    if kind != "step" and end <= spec["start"]:
        raise ConfigError(f"'end: {end}' must be greater than 'start: {spec['start']}'", _join(path, "end"))
    return ScheduledWeight(kind, float(spec["from"]), float(spec["to"]), spec["start"], end)
