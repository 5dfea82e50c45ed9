"""Train once per combination of config values (a grid sweep over train.py), resumably, with a summary table.

    python scripts/sweep.py -opt options/quickstart_sr.yml \\
        --grid 'steps.generator.optimizer.lr=[1e-3, 2e-3]' --grid 'train.mega_batch_factor=[1, 2]' \\
        [--parallel N] [--gpus 0,1] [--out DIR] [--validate] [--import MODULE] [key.path=value ...]

Every combination of the ``--grid`` values is one run of ``codes/train.py`` with those values as overrides
(written ``key.path=[v1, v2, ...]`` in YAML; ``+key.path=[...]`` adds a key the file does not have). Trailing
``key.path=value`` overrides apply to every run. A run is named ``NAME-lr=1e-3-mega_batch_factor=2``: the
config's name, then each grid key's last part (more of its path where two keys end alike) and the value as
written, made path-safe; it trains in its own folder ``path.root/RUN_NAME``.

Before the first run starts, every combination is validated as ``train.py --validate`` would (config, every
component built, the state graph, one batch through every injector and loss); a bad one stops the sweep with
exit code 2 naming the combination and the key. Runs go one at a time, or ``--parallel N`` at once (CPU runs
then get ``cores / N`` torch threads each unless OMP_NUM_THREADS is set; ``--gpus 0,1`` gives each run one of
those GPUs via CUDA_VISIBLE_DEVICES and defaults ``--parallel`` to their number).

Resuming: run the same command again. A run whose newest checkpoint reached ``train.niter`` is finished and
skipped; any other starts train.py again, which resumes it from its newest checkpoint. Ctrl-C (or SIGTERM to
the sweep) is passed to the running trainers, which finish their step, save and exit; the sweep then writes
its summary and exits 130.

Results, in ``path.root/NAME-sweep/`` (or ``--out``): ``summary.md`` and ``summary.csv`` (one row per run: grid
values, status, newest checkpoint step, and the metrics of its newest ``val/STEP/metrics.json``, rewritten
after every run), ``sweep.json`` (the combinations and their overrides) and ``logs/RUN_NAME.log`` (each run's
console output, appended to on resume). Exit codes: 0 every run finished, 1 a run failed, 2 bad arguments or
a bad combination, 130 interrupted.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dlas.config import load_config
from dlas.config.yaml_io import ConfigLoader
from dlas.errors import UserError

EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
TRAIN_PY = Path(__file__).resolve().parents[1] / "codes" / "train.py"
MAX_NAME = 150  # longer run names are cut and given a hash of the whole suffix, so they stay unique


class SweepError(Exception):
    """A problem with the arguments or a combination: printed as ``error: ...`` lines, exit code 2."""

    def __init__(self, lines: list[str] | str):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


@dataclass
class Axis:
    """One ``--grid key=[...]``: the override key, its short label in run names, and the values as written."""

    key: str
    values: list[str]
    label: str = ""


@dataclass
class Combination:
    index: int
    values: list[str]
    name: str
    overrides: list[str]
    run_dir: Path = Path()
    niter: int = 0
    outcome: str = ""  # what went wrong in this invocation ("failed (exit 1)"), empty otherwise

    def describe(self, axes: list[Axis]) -> str:
        return " ".join(f"{axis.label}={value}" for axis, value in zip(axes, self.values))


# ---------------------------------------------------------------------------------------------- the plan
def parse_grid(text: str) -> Axis:
    """``key.path=[v1, v2, ...]`` -> Axis, keeping each value's text exactly as written (it becomes an override)."""
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or not key.lstrip("+"):
        raise SweepError(f"--grid '{text}': write key.path=[value, value, ...]")
    try:
        node = yaml.compose(rest, Loader=ConfigLoader)
    except yaml.YAMLError as exc:
        raise SweepError(f"--grid '{text}': the values are not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise SweepError(f"--grid '{text}': the values must be a non-empty list, key.path=[value, value, ...]")
    values = [rest[item.start_mark.index:item.end_mark.index].strip() for item in node.value]
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise SweepError(f"--grid '{text}': {', '.join(repeated)} appears more than once")
    return Axis(key, values)


def label_axes(axes: list[Axis]) -> None:
    """Give each axis the shortest tail of its key path no other axis shares (``lr``, ``generator.optimizer.lr``)."""
    parts = {id(axis): [p for p in re.split(r"[.\[\]]", axis.key.lstrip("+")) if p] for axis in axes}
    for axis in axes:
        mine = parts[id(axis)]
        for n in range(1, len(mine) + 1):
            tail = mine[-n:]
            if all(parts[id(other)][-n:] != tail for other in axes if other is not axis):
                break
        axis.label = ".".join(tail)


def path_safe(text: str) -> str:
    """``text`` as part of a folder name: brackets, quotes and spaces dropped, other odd characters as ``_``."""
    text = re.sub(r"[\s'\"\[\]{}()]", "", text)
    return re.sub(r"[^A-Za-z0-9._,+=-]", "_", text) or "_"


def run_name(base: str, axes: list[Axis], values: list[str]) -> str:
    suffix = "-".join(f"{path_safe(axis.label)}={path_safe(value)}" for axis, value in zip(axes, values))
    name = f"{base}-{suffix}"
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 9]}-{hashlib.sha1(suffix.encode()).hexdigest()[:8]}"
    return name


def plan(opt: str, axes: list[Axis], overrides: list[str], imports: list[str]) -> tuple[Any, list[Combination]]:
    """The base config and one Combination per point of the grid (the first grid varies slowest)."""
    keys = [axis.key.lstrip("+") for axis in axes]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise SweepError(f"--grid: the key {twice[0]} is given twice; give one --grid per key")
    if "name" in keys:
        raise SweepError("--grid: the sweep names each run itself (NAME-KEY=VALUE...); set the base name with name=...")
    try:
        base = load_config(opt, overrides, imports)
    except UserError as exc:
        raise SweepError([f"the base config: {p}" for p in exc.problems]) from None
    label_axes(axes)
    combos = []
    for index, point in enumerate(itertools.product(*(axis.values for axis in axes)), start=1):
        values = list(point)
        name = run_name(base["name"], axes, values)
        grid = [f"{axis.key}={value}" for axis, value in zip(axes, values)]
        combos.append(Combination(index, values, name, [*overrides, *grid, f"name={name}"]))
    names = [c.name for c in combos]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise SweepError(f"two combinations would share the run folder {clash[0]}; write their values so they "
                         "differ once brackets, quotes and spaces are dropped")
    return base, combos


def validate(opt: str, axes: list[Axis], combos: list[Combination], imports: list[str]) -> None:
    """Load and fully validate every combination (as ``train.py --validate``); raise SweepError listing the bad."""
    from dlas.trainer.run import validate_config

    problems = []
    for combo in combos:
        where = f"combination {combo.index}/{len(combos)} ({combo.describe(axes)}, run {combo.name})"
        try:
            cfg = load_config(opt, combo.overrides, imports)
        except UserError as exc:
            problems += [f"{where}: {p}" for p in exc.problems]
            continue
        try:
            validate_config(cfg)
        except UserError as exc:
            problems += [f"{where}: {p}" for p in cfg.attach_lines(exc.problems)]
            continue
        combo.run_dir = Path(cfg["path"]["root"]) / combo.name
        combo.niter = cfg["train"]["niter"]
    if problems:
        raise SweepError(problems)


# ---------------------------------------------------------------------------------------------- run state
def checkpoint_step(run_dir: Path) -> int:
    """The newest complete checkpoint's step (its manifest is written last), 0 without one."""
    from dlas.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    return found[-1][0] if found else 0


def final_metrics(run_dir: Path) -> tuple[int, dict[str, float]]:
    """The newest ``val/STEP/metrics.json``: (STEP, metrics), or (0, {}) before any validation."""
    steps = [int(p.parent.name) for p in (run_dir / "val").glob("*/metrics.json") if p.parent.name.isdigit()]
    if not steps:
        return 0, {}
    step = max(steps)
    try:
        return step, json.loads((run_dir / "val" / str(step) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return step, {}


def status(combo: Combination) -> tuple[str, int]:
    step = checkpoint_step(combo.run_dir)
    if step >= combo.niter:
        return "finished", step
    if combo.outcome:
        return combo.outcome, step
    return ("unfinished" if step else "not started"), step


def write_summary(folder: Path, axes: list[Axis], combos: list[Combination]) -> str:
    """Write summary.md and summary.csv (one row per run); return the markdown."""
    rows, metric_names = [], []
    for combo in combos:
        state, step = status(combo)
        val_step, metrics = final_metrics(combo.run_dir)
        metric_names += [m for m in metrics if m not in metric_names]
        rows.append((combo, state, step, val_step, metrics))
    header = ["run", *(axis.label for axis in axes), "status", "step", "val step", *metric_names]
    table = [[combo.name, *combo.values, state, str(step), str(val_step) if val_step else "",
              *(_number(metrics.get(m)) for m in metric_names)] for combo, state, step, val_step, metrics in rows]
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                         + ["| " + " | ".join(cells) + " |" for cells in table]) + "\n"
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for combo, state, step, val_step, metrics in rows:
        writer.writerow([combo.name, *combo.values, state, step, val_step or "",
                         *(metrics.get(m, "") for m in metric_names)])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.md").write_text(markdown, encoding="utf-8")
    (folder / "summary.csv").write_text(text.getvalue(), encoding="utf-8")
    return markdown


def _number(value: Any) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, (int, float)) else str(value)


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Running:
    process: subprocess.Popen
    combo: Combination
    log: Any
    gpu: str
    started: float


@dataclass
class Sweep:
    """Launches the unfinished combinations, ``parallel`` at a time, and forwards stop signals to them."""

    opt: str
    axes: list[Axis]
    combos: list[Combination]
    folder: Path
    parallel: int
    gpus: list[str]
    imports: list[str]
    running: list[Running] = field(default_factory=list)
    stop_signals: int = 0

    def run(self) -> int:
        total = len(self.combos)
        queue = []
        for combo in self.combos:
            step = checkpoint_step(combo.run_dir)
            if step >= combo.niter:
                print(f"[{combo.index}/{total}] {combo.name}: finished earlier (step {step}), skipped", flush=True)
            else:
                queue.append(combo)
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while (queue and not self.stop_signals) or self.running:
                while queue and not self.stop_signals and len(self.running) < self.parallel:
                    self._start(queue.pop(0), total)
                self._reap(total)
                time.sleep(0.1)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        markdown = write_summary(self.folder, self.axes, self.combos)
        print(f"\nsummary ({self.folder / 'summary.md'}, also summary.csv):\n{markdown}", end="", flush=True)
        if self.stop_signals:
            print("sweep interrupted: run the same command to resume it", file=sys.stderr)
            return EXIT_INTERRUPTED
        return EXIT_FAILED if any(status(c)[0] != "finished" for c in self.combos) else EXIT_OK

    def command(self, combo: Combination) -> list[str]:
        entry = [str(TRAIN_PY)] if TRAIN_PY.is_file() else ["-m", "dlas.cli.train"]
        return [sys.executable, *entry, "-opt", self.opt, *(f"--import={m}" for m in self.imports), *combo.overrides]

    def _start(self, combo: Combination, total: int) -> None:
        env = dict(os.environ)
        used = {run.gpu for run in self.running}
        gpu = next((g for g in self.gpus if g not in used), "")
        if gpu:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if self.parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            env["OMP_NUM_THREADS"] = str(max(1, cores // self.parallel))
        log_file = self.folder / "logs" / f"{combo.name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_file, "a", encoding="utf-8")  # noqa: SIM115 (closed in _reap, when the run ends)
        log.write(f"$ {' '.join(self.command(combo))}\n")
        log.flush()
        step = checkpoint_step(combo.run_dir)
        process = subprocess.Popen(self.command(combo), stdout=log, stderr=subprocess.STDOUT, env=env)
        self.running.append(Running(process, combo, log, gpu, time.monotonic()))
        where = f" on GPU {gpu}" if gpu else ""
        resumed = f", resuming from step {step}" if step else ""
        print(f"[{combo.index}/{total}] {combo.name}: started{where}{resumed} (log {log_file})", flush=True)

    def _reap(self, total: int) -> None:
        for run in list(self.running):
            code = run.process.poll()
            if code is None:
                continue
            self.running.remove(run)
            run.log.close()
            combo, seconds = run.combo, time.monotonic() - run.started
            step = checkpoint_step(combo.run_dir)
            if code == 0 and step >= combo.niter:
                message = f"finished in {seconds:.0f} s"
            elif code == 0:
                message = f"stopped at step {step} of {combo.niter} (run the sweep again to resume it)"
            else:
                combo.outcome = f"failed (exit {code})" if code > 0 else f"killed ({signal.Signals(-code).name})"
                message = f"{combo.outcome} after {seconds:.0f} s; the end of its log:\n{_tail(run.log.name)}"
            print(f"[{combo.index}/{total}] {combo.name}: {message}", flush=True)
            write_summary(self.folder, self.axes, self.combos)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # The trainers save on the first signal. A terminal's Ctrl-C reaches them directly as well, and they take
        # two signals within a second as one request, so forwarding it again is harmless.
        self.stop_signals += 1
        if self.stop_signals == 1:
            print(f"\nreceived {signal.Signals(signum).name}: the running trainers save and stop; no new run starts",
                  file=sys.stderr, flush=True)
        for run in self.running:
            try:
                run.process.send_signal(signum)
            except ProcessLookupError:
                pass


def _tail(path: str, lines: int = 12) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join(f"  {line}" for line in text[-lines:])


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("-opt", "--opt", required=True, metavar="FILE.yml", help="the config file")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2,...]",
                        help="a config key and the values to try; repeat for more keys (all combinations run)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides for every run")
    parser.add_argument("--parallel", type=int, default=None, metavar="N", help="runs at once (default 1)")
    parser.add_argument("--gpus", default="", metavar="0,1", help="GPU ids to spread the runs over, one per run")
    parser.add_argument("--out", default=None, metavar="DIR", help="summary and logs folder (path.root/NAME-sweep)")
    parser.add_argument("--validate", action="store_true", help="validate every combination and list them; run none")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="a plugin module (or .py file) every run imports; repeatable")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        if not args.grid:
            raise SweepError("give at least one --grid 'key.path=[value, value, ...]'")
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
        parallel = args.parallel if args.parallel is not None else max(1, len(gpus))
        if parallel < 1:
            raise SweepError(f"--parallel must be at least 1, got {parallel}")
        if gpus and parallel > len(gpus):
            raise SweepError(f"--parallel {parallel} is more runs at once than the {len(gpus)} --gpus given")
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise SweepError(f"'{bad[0]}' is not an override (key.path=value)")
        axes = [parse_grid(text) for text in args.grid]
        base, combos = plan(args.opt, axes, args.overrides, args.imports)
        print(f"validating {len(combos)} combination(s) of {', '.join(a.key for a in axes)}", flush=True)
        validate(args.opt, axes, combos, args.imports)
    except SweepError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    folder = Path(args.out) if args.out else Path(base["path"]["root"]) / f"{base['name']}-sweep"
    for combo in combos:
        print(f"  {combo.index}. {combo.name}  ({combo.describe(axes)})")
    if args.validate:
        print(f"all {len(combos)} combinations are valid")
        return EXIT_OK
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text(json.dumps({
        "config": args.opt, "grid": {a.key: a.values for a in axes}, "overrides": args.overrides,
        "imports": args.imports, "runs": [{"name": c.name, "overrides": c.overrides} for c in combos]}, indent=1))
    return Sweep(args.opt, axes, combos, folder, parallel, gpus, args.imports).run()


if __name__ == "__main__":
    sys.exit(main())
