"""``precision: auto`` and ``networks.NET.channels_last: auto``: chosen by measuring, on this machine, this run.

Whether bf16 or channels_last makes a step faster depends on the processor and on the network: on one 2-core
CPU bf16 with channels_last made ESRGAN's step 2.2-2.8x faster and the diffusion UNet's, in bf16 alone, 13x
slower. So nothing is guessed. Before the first step every combination of the settings left to ``auto`` (fp32
or bf16; the ``auto`` networks contiguous or channels_last) trains a few steps in a throwaway trainer on a
full-size batch of the run's own data, in interleaved rounds so that a shared machine's drift hits them alike.
The fastest wins, except that fp32 and contiguous memory (the defaults, and fp32 is the exact one) stay unless
the other setting is at least :data:`MARGIN` faster. A combination that fails (an op without a bf16 kernel, a
``view`` that channels_last breaks) or whose losses turn non-finite is left out, and the log line says why.

The run then trains exactly as if its config had said the winner: same seed, same initial weights. The choice is
logged with the times and saved in every checkpoint's ``state.pt`` (``speed``); a resume reuses it instead of
measuring again, so a resumed run continues bit-identically. Under torchrun every rank measures and rank 0's
choice is taken by all. What is measured is the eager step: ``compile`` is off in the throwaway trainers.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from typing import Any, Callable, Mapping, Optional

import torch

from dlas.errors import UserError
from dlas.trainer.rng import rng_state, set_rng_state

AUTO = "auto"
MARGIN = 1.05  # bf16 or channels_last must be this much faster than fp32 / contiguous memory to be chosen
WARMUP_STEPS = 2  # the first steps pay for allocations, lazy initialisation and autotuning
ROUNDS = 3
ROUND_SECONDS = 0.25  # steps per round: enough for about this long, 1 to MAX_ROUND_STEPS
MAX_ROUND_STEPS = 20

Choice = dict[str, Any]  # {"precision": "bf16"} and/or {"channels_last": {NET: bool}}: only the auto settings


def auto_settings(cfg: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether ``precision`` is ``auto``, and the networks whose ``channels_last`` is ``auto``."""
    return cfg["precision"] == AUTO, [n for n, ncfg in cfg["networks"].items() if ncfg["channels_last"] == AUTO]


def has_auto(cfg: Mapping[str, Any]) -> bool:
    precision, networks = auto_settings(cfg)
    return precision or bool(networks)


def apply_choice(cfg: Mapping[str, Any], choice: Choice) -> dict[str, Any]:
    """``cfg`` with its ``auto`` settings replaced by ``choice`` (the defaults, fp32 and contiguous, where
    ``choice`` says nothing)."""
    out = copy.deepcopy(dict(cfg))
    if out["precision"] == AUTO:
        out["precision"] = choice.get("precision", "fp32")
    for name, ncfg in out["networks"].items():
        if ncfg["channels_last"] == AUTO:
            ncfg["channels_last"] = bool(choice.get("channels_last", {}).get(name, False))
    return out


def describe(choice: Choice) -> str:
    parts = [choice["precision"]] if "precision" in choice else []
    layouts = choice.get("channels_last", {})
    if layouts:
        last = [n for n, on in layouts.items() if on]
        parts.append(f"channels_last for {', '.join(last)}" if last else "contiguous memory")
    return ", ".join(parts)


def label(choice: Choice) -> str:
    """A candidate's short name in the report: ``fp32``, ``bf16+channels_last``, ``channels_last``."""
    parts = [choice["precision"]] if "precision" in choice else []
    parts += ["channels_last"] if any(choice.get("channels_last", {}).values()) else []
    return "+".join(parts) or "contiguous"


def recorded_choice(cfg: Mapping[str, Any], state: Optional[Mapping[str, Any]]) -> Optional[Choice]:
    """The choice saved in a checkpoint's ``state``, if it covers exactly this config's ``auto`` settings."""
    saved = (state or {}).get("speed")
    if not isinstance(saved, dict):
        return None
    precision, networks = auto_settings(cfg)
    if ("precision" in saved) != precision or set(saved.get("channels_last", {})) != set(networks):
        return None
    return saved


def speed_problem(saved: Any) -> Optional[str]:
    """What is wrong with a checkpoint's ``speed`` entry (untrusted input); None: usable."""
    if not isinstance(saved, dict) or set(saved) - {"precision", "channels_last"}:
        return f"'speed' must be a mapping of precision and channels_last, found {saved!r}"
    if "precision" in saved and saved["precision"] not in ("fp32", "bf16"):
        return f"'speed' names precision {saved['precision']!r} (fp32 or bf16 expected)"
    layouts = saved.get("channels_last", {})
    if not isinstance(layouts, dict) or not all(isinstance(k, str) and isinstance(v, bool) for k, v in layouts.items()):
        return f"'speed.channels_last' must map network names to true/false, found {layouts!r}"
    return None


def candidates(cfg: Mapping[str, Any], device: torch.device) -> list[Choice]:
    """Every combination of this config's ``auto`` settings, the defaults (fp32, contiguous) first."""
    precision, networks = auto_settings(cfg)
    bf16 = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    precisions: list[Optional[str]] = (["fp32", "bf16"] if bf16 else ["fp32"]) if precision else [None]
    layouts: list[Optional[bool]] = [False, True] if networks else [None]
    out = []
    for p, last in itertools.product(precisions, layouts):
        choice: Choice = {}
        if p is not None:
            choice["precision"] = p
        if last is not None:
            choice["channels_last"] = {n: last for n in networks}
        out.append(choice)
    return out


def cost(choice: Choice) -> int:
    """How far ``choice`` is from the defaults: bf16 and channels_last count one each."""
    return int(choice.get("precision") == "bf16") + int(any(choice.get("channels_last", {}).values()))


def pick(times: Mapping[int, float], choices: list[Choice]) -> int:
    """The index of the choice to take given the measured seconds per step of some of them: the fastest, unless
    one with fewer departures from the defaults is within :data:`MARGIN` of it."""
    fastest = min(times.values())
    return min((i for i, t in times.items() if t <= fastest * MARGIN), key=lambda i: (cost(choices[i]), times[i]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_step(trainer: Any, batch: Mapping[str, Any], steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    _sync(device)
    return (time.perf_counter() - start) / steps


def _failure(choice: Choice, exc: BaseException) -> str:
    return f"{label(choice)} ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"


def measure(cfg: Mapping[str, Any], device: torch.device, batch: Mapping[str, Any],
            make_trainer: Callable[[Mapping[str, Any]], Any]) -> tuple[Choice, str]:
    """Time a training step of every candidate of ``cfg`` on ``batch``; returns the choice and a report line.

    ``make_trainer(cfg)`` builds a trainer (the caller's class: this module does not import the trainer). Each
    candidate trains a throwaway trainer of its own; every RNG is as it was before when this returns. The
    defaults (the first candidate) are never left out: where they fail, the run itself would, and where their
    losses turn non-finite the run's NaN guard deals with it as in any run.
    """
    choices = candidates(cfg, device)
    rng = rng_state()
    trainers: dict[int, Any] = {}
    times: dict[int, list[float]] = {}
    failed: list[str] = []

    def leave_out(i: int, exc: BaseException) -> None:
        if i == 0 or isinstance(exc, UserError):
            raise exc
        failed.append(_failure(choices[i], exc))
        trainers.pop(i, None)
        times.pop(i, None)

    def check_finite(i: int) -> None:
        if i and int(trainers[i].bad_total):
            raise FloatingPointError("non-finite losses or gradients")

    try:
        warm = 0.0
        for i, choice in enumerate(choices):
            try:
                probe_cfg = apply_choice(cfg, choice)
                for ncfg in probe_cfg["networks"].values():
                    ncfg["compile"] = False
                trainers[i] = make_trainer(probe_cfg)
                seconds = min(_seconds_per_step(trainers[i], batch, 1, device) for _ in range(WARMUP_STEPS))
                if i == 0:
                    warm = seconds
                check_finite(i)
                times[i] = []
            except Exception as exc:  # noqa: BLE001 (any failure means this combination cannot train this run)
                leave_out(i, exc)
        per_round = max(1, min(MAX_ROUND_STEPS, math.ceil(ROUND_SECONDS / max(warm, 1e-6))))
        for r in range(ROUNDS):
            order = list(times)
            for i in order if r % 2 == 0 else order[::-1]:
                try:
                    times[i].append(_seconds_per_step(trainers[i], batch, per_round, device))
                    check_finite(i)
                except Exception as exc:  # noqa: BLE001
                    leave_out(i, exc)
    finally:
        trainers.clear()
        set_rng_state(rng)
    median = {i: sorted(t)[len(t) // 2] for i, t in times.items()}
    best = pick(median, choices)
    size = next((len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list, tuple))), 0)
    report = (f"measured on a batch of {size} ({ROUNDS} rounds x {per_round} steps, {device.type}): "
              + ", ".join(f"{label(choices[i])} {1000 * t:.1f} ms" for i, t in median.items())
              + (f"; left out: {'; '.join(failed)}" if failed else ""))
    return choices[best], report
