"""What the device benchmarks share: their command-line options, a synchronised timer, the report header.

Imported by ``flow_warp.py``, ``norm_step_time.py`` and ``trainer_overhead.py`` from this folder
(``python scripts/bench/NAME.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def add_options(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed calls per variant (default {repeats})")
    parser.add_argument("--device", nargs="+", default=["cpu", "cuda"], help="devices (cuda skipped if absent)")
    add_report_options(parser)


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """``--threads`` (see :func:`set_threads`) and ``--json`` (see :func:`finish`)."""
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")


def set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def load_average(values: Sequence[float] | None = None) -> str:
    """The load average (now, or ``values`` read earlier) as the tables print it."""
    return " ".join(f"{x:.2f}" for x in (os.getloadavg() if values is None else values))


def start(args: argparse.Namespace, title: str) -> tuple[list[torch.device], dict[str, Any]]:
    """Check the options, set the threads, print the header; return the devices and the report to fill in."""
    if args.repeats < 1:
        print(f"{title}: --repeats must be >= 1", file=sys.stderr)
        raise SystemExit(2)
    set_threads(args)
    devices = [torch.device(d) for d in args.device if d != "cuda" or torch.cuda.is_available()]
    print(f"{title}, fastest of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"load average {load_average()}")
    report = {"load_average": os.getloadavg(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "results": []}
    return devices, report


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def timed(fn: Callable[..., Any], *args: Any, device: torch.device) -> float:
    """Seconds one ``fn(*args)`` takes, with CUDA work finished before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - begin


def finish(report: dict[str, Any], path: str | None) -> None:
    report["load_average_after"] = os.getloadavg()
    print(f"load average after: {load_average()}")
    if path:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=1)
