"""From a config to running components: the one place that builds them.

Training, ``dlas-test``, the evaluators and the scripts all call these, so a network is built, a device and a
precision are chosen and a run's weights are loaded the same way everywhere:

* :func:`select_device`, :func:`autocast`, :func:`concrete_precision`: ``device:`` and ``precision:``;
* :func:`build_network`, :func:`build_datasets`, :func:`build_evaluators`: the config's sections;
* :func:`load_pretrained`: ``path.pretrain_model_NET``;
* :func:`read_run_config`, :func:`select_checkpoint`, :class:`RunNetworks`, :func:`load_trained_network`: a
  trained run folder;
* :func:`count_nonfinite`: the warning every output path gives for NaN/Inf pixels.

It sits above the components and the config and below the trainer, the evaluators, the inference tasks and the
CLI; nothing here imports those.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Optional, Union

import torch

from dlas import checkpoint as ckpt
from dlas.config.schema import LOADER_KEYS, NETWORK_KEYS
from dlas.errors import ConfigError, DataError, Problem, did_you_mean
from dlas.registry import DATASETS, EVALUATORS, NETWORKS

log = logging.getLogger("dlas")

PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------- device and precision
def select_device(choice: str = "auto", local_rank: int = 0, option: str = "device") -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` (device ``local_rank``) or ``cuda:N``.

    A CUDA choice without a GPU is a ConfigError naming ``option`` (``device`` in a config, ``--device`` on the
    command line).
    """
    if choice == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device '{choice}' (use auto, cpu, cuda or cuda:N)", option) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device is '{choice}' but no CUDA device is available (use auto or cpu)", option)
        return device if device.index is not None else torch.device("cuda", local_rank)
    if device.type != "cpu":
        raise ConfigError(f"unsupported device '{choice}' (use auto, cpu, cuda or cuda:N)", option)
    return device


def concrete_precision(precision: str) -> str:
    """``precision`` with ``auto`` read as fp32: what ``auto`` means until a training run has measured it
    (:mod:`dlas.trainer.speed`), and what evaluation outside a run uses, exactly."""
    return "fp32" if precision == "auto" else precision


def autocast(precision: str, device: torch.device, option: str = "precision") -> Callable[[], ContextManager]:
    """A factory of the autocast context of ``precision`` (``fp32``: none; ``bf16``; ``fp16``) on ``device``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'"
                          f"{did_you_mean(precision, PRECISIONS)}", option)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def count_nonfinite(images: torch.Tensor, source: str, advice: str = "the network diverged or overflowed") -> int:
    """Count NaN/Inf values of ``images`` and warn about them (they are scored and saved as black pixels)."""
    count = int((~torch.isfinite(images)).sum())
    if count:
        log.warning("%s: %d non-finite output values (NaN/Inf, saved and scored as black); %s", source, count, advice)
    return count


# ---------------------------------------------------------------------- networks, datasets, evaluators
def build_network(cfg: Mapping[str, Any], name: str, option: str = "--network") -> torch.nn.Module:
    """Construct network ``name`` of ``cfg['networks']`` (untrained), ignoring the trainer's per-network keys.

    An unknown ``name`` is a ConfigError naming ``option`` and listing the networks the config has.
    """
    networks = cfg.get("networks") or {}
    if name not in networks:
        raise ConfigError(f"no network '{name}' in the config{did_you_mean(name, networks)}; "
                          f"it has: {', '.join(networks) or '(none)'}", option)
    return NETWORKS.build(dict(networks[name]), f"networks.{name}", reserved=NETWORK_KEYS)


def build_datasets(cfg: Mapping[str, Any], names: Optional[list[str]] = None) -> dict[str, Any]:
    """Every dataset of ``datasets:`` (or the named ones); all problems reported at once.

    A dataset that declares ``epoch_keys = True`` (the framework's seeded datasets) gets the run's ``seed``.
    """
    from dlas.data.collate import wants_epoch_keys

    datasets, problems = {}, []
    for name, dcfg in (cfg.get("datasets") or {}).items():
        if names is not None and name not in names:
            continue
        try:
            dataset = DATASETS.build(dict(dcfg), f"datasets.{name}", reserved=LOADER_KEYS)
        except DataError as exc:  # a file problem names the file already
            problems += exc.problems
            continue
        except ConfigError as exc:  # the dataset knows its options, not its config name: prefix it
            problems += [p if p.path.startswith("datasets.") else
                         Problem(f"datasets.{name}.{p.path}".rstrip("."), p.message, p.line, p.file)
                         for p in exc.problems]
            continue
        if wants_epoch_keys(dataset):
            dataset.seed = cfg["seed"]
        datasets[name] = dataset
    if problems:
        raise ConfigError(problems)
    return datasets


def build_evaluators(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluators of ``eval:``, by name."""
    return {name: EVALUATORS.build(dict(ecfg), f"eval.{name}") for name, ecfg in (cfg.get("eval") or {}).items()}


def load_pretrained(cfg: Mapping[str, Any], networks: Mapping[str, torch.nn.Module]) -> list[str]:
    """Load ``path.pretrain_model_NET: FILE`` into each named network; return the names loaded.

    ``path.strict_load: false`` takes what fits and logs precisely what did not.
    """
    from dlas.weights import load_network_weights

    paths = cfg["path"]
    loaded = []
    for key, file in paths.items():
        if not key.startswith("pretrain_model_") or not file:
            continue
        name = key[len("pretrain_model_"):]
        report = load_network_weights(networks[name], file, strict=paths["strict_load"])
        if report.complete:
            log.info("loaded pretrained weights for '%s' from %s: %s", name, file, report.summary())
        else:
            log.warning("pretrained weights for '%s' from %s did not match completely (strict_load is false): %s",
                        name, file, report.summary())
        loaded.append(name)
    return loaded


def check_pretrained_files(cfg: Mapping[str, Any]) -> None:
    """A ConfigError for each ``path.pretrain_model_NET`` file that does not exist (checked before training)."""
    problems = [Problem(f"path.{key}", f"pretrained weights file '{file}' does not exist")
                for key, file in (cfg.get("path") or {}).items()
                if key.startswith("pretrain_model_") and file and not Path(file).is_file()]
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------- trained runs
def read_run_config(run_dir: Union[str, Path]) -> dict:
    """The resolved ``config.yml`` of a run folder, with its ``imports:`` plugins imported.

    It is read as untrusted input, with the config loader's limits (alias expansion, depth, size).
    """
    from dlas.config.load import plugin_path
    from dlas.config.yaml_io import read_yaml
    from dlas.registry import import_plugins

    run_dir = Path(run_dir)
    file = run_dir / "config.yml"
    if not run_dir.is_dir():
        raise DataError("run folder does not exist", str(run_dir))
    if not file.is_file():
        raise DataError("not a run folder: it has no config.yml", str(run_dir))
    try:
        cfg = read_yaml(file, str(file))[0] or {}
    except ConfigError as exc:  # the file is data here, not the user's config
        raise DataError(exc.problems) from exc
    if not isinstance(cfg, dict):
        raise DataError("config.yml does not hold a mapping of config sections", str(file))
    # A plugin file is recorded relative to the folder training ran in, which for experiments/NAME is two up.
    training_folder = run_dir.resolve().parent.parent
    import_plugins([plugin_path(m, training_folder) for m in cfg.get("imports") or []])
    return cfg


def default_network_name(cfg: Mapping[str, Any]) -> str:
    """The network the run's first evaluator with a ``network`` option scores, else ``generator``."""
    for ecfg in (cfg.get("eval") or {}).values():
        if isinstance(ecfg, dict) and isinstance(ecfg.get("network"), str):
            return ecfg["network"]
    return "generator"


def select_checkpoint(run_dir: Union[str, Path], step: Optional[int] = None, best: bool = False) -> tuple[int, Path]:
    """The checkpoint folder to use: step ``step``, the one in ``best.json``, or the newest complete one."""
    run_dir = Path(run_dir)
    found = dict(ckpt.list_checkpoints(run_dir))
    if not found:
        raise DataError("no complete checkpoint (a checkpoints/STEP folder with manifest.json); train first",
                        str(run_dir / "checkpoints"))
    if best:
        record = ckpt.read_best(run_dir)
        if not record:
            raise DataError("no best checkpoint recorded (checkpoints/best.json); set logger.keep_best when "
                            "training, or pick --step", str(run_dir / "checkpoints"))
        step = int(record["step"])
    if step is None:
        step = max(found)
    if step not in found:
        raise DataError(f"no complete checkpoint for step {step}; available: {', '.join(map(str, sorted(found)))}",
                        str(run_dir / "checkpoints"))
    return step, found[step]


@dataclass
class TrainedNetwork:
    """A network loaded from a run folder, with where it came from."""

    network: torch.nn.Module
    name: str
    step: int
    weights_file: Path
    config: dict


class RunNetworks(Mapping[str, torch.nn.Module]):
    """The networks of one checkpoint of a run, built and loaded on first use (eval mode, on ``device``).

    ``ema``: use ``NET_ema.safetensors`` where the checkpoint has it (the usual best weights), else ``NET``.
    A task asks for the networks it needs by name; the others are never built.
    """

    def __init__(self, run_dir: Union[str, Path], step: Optional[int] = None, best: bool = False, ema: bool = True,
                 device: Union[str, torch.device] = "cpu", config: Optional[dict] = None):
        self.run_dir = Path(run_dir)
        self.config = config if config is not None else read_run_config(self.run_dir)
        self.step, self.folder = select_checkpoint(self.run_dir, step, best)
        problems = ckpt.verify_checkpoint(self.folder)
        if problems:
            raise DataError(f"checkpoint {self.step} is damaged: {problems[0]}", str(self.folder))
        self.ema = ema
        self.device = torch.device(device)
        self._loaded: dict[str, TrainedNetwork] = {}

    def load(self, name: str, option: str = "--network") -> TrainedNetwork:
        """Network ``name`` with its weights (built once)."""
        if name not in self._loaded:
            from dlas.weights import load_network_state

            net = build_network(self.config, name, option)
            stems = ([f"{name}_ema"] if self.ema else []) + [name]
            stem = next((s for s in stems if (self.folder / f"{s}{ckpt.WEIGHTS_SUFFIX}").is_file()), None)
            if stem is None:
                raise DataError(f"checkpoint has no weights for network '{name}' ({name}.safetensors)",
                                str(self.folder))
            file = self.folder / f"{stem}{ckpt.WEIGHTS_SUFFIX}"
            load_network_state(net, ckpt.load_weights(self.folder, stem), str(file))
            self._loaded[name] = TrainedNetwork(net.to(self.device).eval(), name, self.step, file, self.config)
        return self._loaded[name]

    def __getitem__(self, name: str) -> torch.nn.Module:
        return self.load(name).network

    def __iter__(self) -> Iterator[str]:
        return iter(self.config.get("networks") or {})

    def __len__(self) -> int:
        return len(self.config.get("networks") or {})


def load_trained_network(run_dir: Union[str, Path], network: Optional[str] = None, step: Optional[int] = None,
                         best: bool = False, ema: bool = True,
                         device: Union[str, torch.device] = "cpu") -> TrainedNetwork:
    """Build a run's network from its ``config.yml`` and load a checkpoint's weights into it (eval mode).

    ``network`` defaults to :func:`default_network_name`.
    """
    networks = RunNetworks(run_dir, step, best, ema, device)
    return networks.load(network or default_network_name(networks.config))
