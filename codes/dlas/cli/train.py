"""``dlas-train`` / ``python codes/train.py``: validate a config, print it, list components, or train.

Exit codes: 0 success; 2 for a user error (bad config, arguments or data: one ``error: …`` line per problem,
no traceback); 1 for anything else. Torch-heavy modules are imported only when a command needs them, so
``--help`` and config errors answer immediately.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from dlas.config.advice import config_warnings
from dlas.errors import ConfigError, UserError, did_you_mean

EXIT_OK, EXIT_FAILURE, EXIT_USER_ERROR = 0, 1, 2
TRAINER_MODULE = "dlas.trainer.run"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code is 2 as well; keep our one-line format
        self.print_usage(sys.stderr)
        raise ConfigError(f"{message} (see --help)", "arguments")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dlas-train",
        description="Train a model described by a YAML config. Trailing key.path=value arguments override "
                    "config values (YAML-typed: train.niter=100, steps.gen.optimizer.lr=1e-4, "
                    "datasets.train.paths=[/a,/b]); +key.path=value adds a key the file does not have.",
    )
    parser.add_argument("-opt", "--opt", metavar="FILE.yml", help="the config file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    parser.add_argument("--validate", action="store_true",
                        help="check the config, build every component and check the state graph; train nothing")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (bases merged, overrides applied, defaults filled in)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: rename an existing run folder to NAME.old-YYYYmmdd-HHMMSS first")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a plugin module (or .py file) so its components exist; repeatable")
    parser.add_argument("--list", nargs="?", const="all", metavar="KIND",
                        help="list registered components: all, or one of network, injector, loss, dataset, "
                             "evaluator, optimizer, scheduler, degradation, task")
    parser.add_argument("--describe", metavar="TYPE", help="print the options and documentation of a component")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    try:
        return _run(build_parser().parse_intermixed_args(argv))
    except UserError as exc:
        for problem in exc.problems:
            print(f"error: {_one_line(problem)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:  # a plain Ctrl-C, or the trainer's StopNow saying what it means
        print(str(exc) or "interrupted: stopped at once, the current step was not saved; running the same command "
              "again resumes from the newest checkpoint", file=sys.stderr)
        return 130 if getattr(exc, "lost", True) else EXIT_OK


_WORKER_ERROR = re.compile(r"\ACaught \w+ (?P<where>in DataLoader worker process \d+)\.\n.*"
                           r"^[\w.]*Error: (?P<line>[^\n]*)\s*\Z", re.S | re.M)


def _one_line(problem: Any) -> str:
    """``problem`` as one line, also when torch re-created it from a loader worker's traceback text."""
    match = _WORKER_ERROR.match(problem.message) if not problem.path else None
    return f"{match['line']} ({match['where']})" if match else str(problem)


def _run(args: argparse.Namespace) -> int:
    if args.list or args.describe:
        from dlas.config.load import plugin_path
        from dlas.registry import import_plugins

        if args.opt:  # the config's own plugins, without validating it (--describe helps fix a broken config)
            _import_config_plugins(Path(args.opt))
        import_plugins([plugin_path(m) for m in args.imports], "--import")
        if args.list:
            print(list_components(args.list))
        if args.describe:
            print(describe_component(args.describe))
        return EXIT_OK
    if not args.opt:
        files = [o for o in args.overrides if "=" not in o and o.endswith((".yml", ".yaml"))]
        hint = f"(did you mean -opt {files[0]}?)" if files else "(or --list / --describe TYPE)"
        raise ConfigError(f"give a config file: -opt FILE.yml {hint}", "-opt")

    from dlas.config import dump_config, load_config

    cfg = load_config(args.opt, args.overrides, args.imports)
    if args.print_config:
        print(dump_config(cfg), end="")
        return EXIT_OK
    trainer = _trainer()
    if trainer is None:
        print(f"error: trainer not available: the module {TRAINER_MODULE} is not installed, so only the "
              "config-level checks ran (they passed)", file=sys.stderr)
        return EXIT_FAILURE
    if args.validate:
        try:
            trainer.validate_config(cfg)
        except ConfigError as exc:
            raise ConfigError(cfg.attach_lines(exc.problems)) from None
        print(f"config OK: {args.opt} ({len(cfg['networks'])} networks, {len(cfg['steps'])} steps, "
              f"{cfg['train']['niter']} iterations)")
        for problem in cfg.attach_lines(config_warnings(cfg)):
            print(f"warning: {problem}", file=sys.stderr)
        return EXIT_OK

    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(cfg["path"]["root"]) / cfg["name"]
    from dlas.logging.console import setup_logging

    # Nothing in the run folder changes until the run has started (trainer.train calls start()): a start that
    # fails (a changed config a resume cannot honour, a checkpoint that does not fit, bad data) leaves it as it was.
    _check_run_folder_can_be_made(run_dir)
    try:
        changes = [] if args.fresh else _resume_changes(run_dir, cfg)
    except ConfigError as exc:
        raise ConfigError(cfg.attach_lines(exc.problems)) from None
    log = setup_logging(None, rank)
    early = _EarlyRecords()
    log.addHandler(early)
    log.info("run folder %s (config %s%s)", run_dir, args.opt,
             f", overrides: {' '.join(args.overrides)}" if args.overrides else "")
    for problem in cfg.attach_lines(config_warnings(cfg)):
        log.warning("%s", problem)
    if changes:
        from dlas.config.resume import describe_changes

        log.warning("the config differs from the one this run was trained with (%s): %s", run_dir / "config.yml",
                    describe_changes(changes))
    config_text = dump_config(cfg)

    def start() -> None:
        log.removeHandler(early)
        notes = []
        if rank == 0:
            try:
                notes = _prepare_run_dir(run_dir, config_text, fresh=args.fresh)
            except OSError as exc:  # a root that cannot be created or written: nothing has started yet
                raise ConfigError(f"cannot create or write the run folder {run_dir}: {exc.strerror or exc}",
                                  "path.root") from None
        setup_logging(run_dir, rank)
        early.write_to_files(log)
        for level, message in notes:
            log.log(level, message)

    from dlas.trainer.loop import TrainingStopped

    try:
        trainer.train(cfg, run_dir, fresh=args.fresh, on_start=start)
    except ConfigError as exc:
        raise ConfigError(cfg.attach_lines(exc.problems)) from None
    except TrainingStopped as exc:  # the run diverged or could not save; it says what to change
        log.error("%s", exc)
        return EXIT_FAILURE
    finally:
        log.removeHandler(early)
    return EXIT_OK


class _EarlyRecords(logging.Handler):
    """Keeps what the start-up logs, to write it into ``train.log`` once the run has started (and the file may be
    written); a start that fails has printed it to the console only."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def write_to_files(self, log: logging.Logger) -> None:
        for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            for record in self.records:
                handler.handle(record)
        self.records = []


def _check_run_folder_can_be_made(run_dir: Path) -> None:
    """A ConfigError naming ``path.root`` when ``run_dir`` could not be created or written; writes nothing."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise ConfigError(f"cannot create or write the run folder {run_dir}: {problem}", "path.root")


def _resume_changes(run_dir: Path, cfg: Any) -> list[str]:
    """The config changes since the run folder's checkpoints were saved (see :mod:`dlas.config.resume`)."""
    from dlas import checkpoint as ckpt
    from dlas.config.resume import resume_changes

    if not ckpt.has_checkpoints(run_dir):
        return []
    newest = max(ckpt.list_checkpoints(run_dir), default=None)
    return resume_changes(run_dir, cfg, str(newest[1]) if newest else "its checkpoints")


def _import_config_plugins(file: Path) -> None:
    """Import the ``imports:`` of ``file`` and its bases, for ``--list`` / ``--describe`` with ``-opt``."""
    from dlas.config.inherit import load_with_bases
    from dlas.config.load import plugin_path
    from dlas.registry import import_plugins

    if not file.is_file():
        raise ConfigError(f"config file '{file}' {'is a folder, not a file' if file.is_dir() else 'does not exist'}",
                          str(file))
    listed = load_with_bases(file)[0].get("imports") or []
    if isinstance(listed, list) and all(isinstance(m, str) for m in listed):
        import_plugins([plugin_path(m, file.parent) for m in listed])


def _trainer() -> Any:
    """The trainer's entry module, or ``None`` while it does not exist (its own import errors propagate)."""
    import importlib

    try:
        return importlib.import_module(TRAINER_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == TRAINER_MODULE:
            return None
        raise


def _prepare_run_dir(run_dir: Path, config_text: str, fresh: bool) -> list[tuple[int, str]]:
    """Create the run folder (renaming an old one aside with ``fresh``) and write the resolved ``config.yml``.

    Returns the (level, message) notes to log once logging writes into the folder. Only rank 0 calls this;
    the other ranks reach the run folder through the trainer, whose process-group rendezvous waits for rank 0,
    so they never see the old folder after a ``--fresh`` rename.
    """
    notes = []
    if fresh and run_dir.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
        suffix = 1
        while aside.exists():  # two --fresh starts in the same second must not collide
            aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{suffix}")
            suffix += 1
        run_dir.rename(aside)
        notes.append((logging.INFO, f"--fresh: moved the previous run folder to {aside}"))
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "config.yml"
    trained = any((run_dir / "checkpoints").glob("*/manifest.json"))
    if trained and config_file.is_file() and config_file.read_text(encoding="utf-8") != config_text:
        # Resuming with a changed config is allowed (e.g. a longer niter), but it must not go unnoticed. A folder
        # without a checkpoint trained nothing (its start failed): its config.yml is simply replaced.
        previous = run_dir / "config.previous.yml"
        _write_atomically(previous, config_file.read_text(encoding="utf-8"))
        notes.append((logging.INFO, f"config.yml is replaced; the one this run trained with until now is kept as "
                                    f"{previous}"))
    _write_atomically(config_file, config_text)  # config.yml exists at every moment, whole
    return notes


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- --list / --describe
def list_components(kind: str = "all", registries: Optional[dict[str, Any]] = None) -> str:
    """One line per registered component of ``kind`` (or all kinds): name and first docstring line.

    A built-in whose module fails to import is listed with the reason instead of its docstring.
    ``registries`` defaults to :data:`dlas.registry.REGISTRIES`.
    """
    if registries is None:
        from dlas.registry import REGISTRIES as registries
    lines = []
    for name in _kinds(kind, registries):
        registry = registries[name]
        lines.append(f"{'losses' if name == 'loss' else name + 's'}:")
        for component in registry.names():
            try:
                summary = (inspect.getdoc(registry.get(component)) or "(no docstring)").splitlines()[0]
            except Exception as exc:  # noqa: BLE001 (a broken module is a fact to list, not a reason to stop)
                reason = exc.problems[0].message if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
                summary = f"UNAVAILABLE: {reason}"
            lines.append(f"  {component:<24} {summary}")
    return "\n".join(lines)


def _kinds(kind: str, registries: dict[str, Any]) -> list[str]:
    if kind == "all":
        return list(registries)
    aliases = {**{k: k for k in registries}, **{f"{k}s": k for k in registries}, "losses": "loss"}
    singular = aliases.get(kind)
    if singular is None:
        raise ConfigError(f"unknown component kind '{kind}'{did_you_mean(kind, registries)}; "
                          f"kinds: {', '.join(registries)}", "--list")
    return [singular]


def describe_component(name: str) -> str:
    """``Registry.describe`` of every registry that has a component called ``name``."""
    from dlas.registry import REGISTRIES

    found = [registry for registry in REGISTRIES.values() if name in registry]
    if not found:
        every = [n for registry in REGISTRIES.values() for n in registry.names()]
        raise ConfigError(f"no component named '{name}'{did_you_mean(name, every)}; "
                          "`dlas-train --list` shows them all", "--describe")
    from dlas.config.schema import describe_framework_keys

    return "\n\n".join("\n".join([registry.describe(name), *describe_framework_keys(registry.kind)])
                       for registry in found)


if __name__ == "__main__":
    sys.exit(main())
