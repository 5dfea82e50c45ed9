"""The fixed sections of a config, written as dataclasses, and the checker that validates a config against them.

Why dataclasses and not pydantic: they cost no extra dependency, and the schema only has to describe the few
fixed sections. Every entry chosen by ``type:`` (a network, a loss, an optimizer, …) is validated by the registry
against its constructor's signature, so the schema marks those places with :class:`Component` and hands them on.
A small walker over dataclass fields then gives all-errors-at-once reports with dotted paths and did-you-mean
suggestions in exactly the form the registry uses.

Field conventions: a field without a default is required; ``metadata={"min": n, "max": m, "above": a}`` bounds
a number (``above``: strictly greater); a trailing underscore (``from_``) is a YAML key that is a Python keyword.

Numbers everywhere, components' options included, are checked up front (:func:`number_problem`): NaN is never a
value, an integer must fit in 64 bits, and a float must be finite, except a component option whose default is
itself infinite (``max_norm: float = math.inf`` says infinity means something there). Options that mean the same
in every optimizer (``lr``, ``eps``, ``weight_decay``, ``momentum``, ``betas``) are range-checked by name
(:data:`OPTIMIZER_RULES`), plugins' optimizers included.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from dlas.config.source import KeyPath, format_path
from dlas.errors import Problem, did_you_mean
from dlas.registry import REGISTRIES, python_name, type_error, yaml_name

_NoneType = type(None)
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
INT64_MAX = 2**63 - 1
MAX_BATCH_SIZE = 2**20  # no machine holds a larger global batch; a typo like 1e9 should not hang the loader
MAX_NUM_WORKERS = 256


@dataclass(frozen=True)
class Bound:
    """A range an option's number (or each number of its list) must lie in; ``what`` says what the option is."""

    what: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # the low end itself is excluded
    high_open: bool = False

    def problem(self, value: Any) -> Optional[str]:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(item, (int, float)) or isinstance(item, bool):
                continue  # the type check reports it
            too_low = self.low is not None and (item <= self.low if self.low_open else item < self.low)
            too_high = self.high is not None and (item >= self.high if self.high_open else item > self.high)
            if too_low or too_high:
                return f"must be {self.text()} ({self.what}), got {item}"
        return None

    def text(self) -> str:
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " and ".join(part for part in (low, high) if part)


# Options that mean the same in every optimizer, checked wherever an optimizer (built-in or plugin) takes them.
OPTIMIZER_RULES = (
    ("lr", Bound("a learning rate", low=0, low_open=True)),
    ("eps", Bound("a term added for numerical stability", low=0, low_open=True)),
    ("weight_decay", Bound("a decay factor", low=0)),
    ("momentum", Bound("a momentum factor", low=0, high=1, high_open=True)),
    ("betas", Bound("decay rates of running averages", low=0, high=1, high_open=True)),
)


@dataclass(frozen=True)
class Component:
    """Marks a mapping chosen by ``type:`` from the registry of ``kind``.

    ``keys`` is a dataclass of the keys the framework handles in this entry (never passed to the constructor);
    ``provided`` names constructor arguments the framework passes itself (an optimizer's ``params``); ``rules``
    range-check options by name, whichever component of the kind takes them.
    """

    kind: str
    keys: Optional[type] = None
    provided: tuple[str, ...] = ()
    rules: tuple[tuple[str, Bound], ...] = ()


def _min(value: int, default: Any = dataclasses.MISSING, max: Optional[int] = None) -> Any:
    return field(default=default, metadata={"min": value, "max": max})


def number_problem(value: Any, allow_infinite: bool = False) -> Optional[str]:
    """Why ``value`` (or a number inside its lists and mappings) cannot be a config number, else ``None``.

    NaN is never a value; an integer must fit in 64 bits (torch and numpy take nothing larger); a float must be
    finite unless ``allow_infinite``.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isnan(value):
        return "must be a number, got NaN"
    if isinstance(value, float) and math.isinf(value) and not allow_infinite:
        return f"must be a finite number, got {value}"
    if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
        return f"must fit in 64 bits (at most {INT64_MAX}), got {value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        problem = number_problem(item, allow_infinite)
        if problem:
            return f"{'item ' if isinstance(key, int) else ''}{key}: {problem}"
    return None


# ------------------------------------------------------------------------------------------ framework keys
@dataclass
class Gates:
    """``after: N`` runs once N steps are done; ``before: N`` stops once N are done; ``every: N`` on multiples."""

    after: Optional[int] = _min(0, None)
    before: Optional[int] = _min(1, None)
    every: Optional[int] = _min(1, None)

    @staticmethod
    def check(values: dict, path: KeyPath, checker: "Checker") -> None:
        after, before = values.get("after"), values.get("before")
        if isinstance(after, int) and isinstance(before, int) and before <= after:
            checker.problem(path + ("before",), f"must be greater than 'after: {after}', otherwise this never runs")


@dataclass
class WeightSchedule:
    """A loss weight moving from ``from`` (until step ``start``) to ``to`` (from step ``end``)."""

    schedule: Literal["linear", "cosine", "step"]
    from_: float
    to: float
    start: int = _min(0)
    end: Optional[int] = _min(0, None)

    @staticmethod
    def check(values: dict, path: KeyPath, checker: "Checker") -> None:
        kind, start, end = values.get("schedule"), values.get("start"), values.get("end")
        if kind == "step" and end is not None:
            checker.problem(path + ("end",), "a 'step' schedule jumps right after 'start' and takes no 'end'")
        elif kind in ("linear", "cosine") and end is None:
            checker.problem(path + ("end",), f"a {kind} weight schedule needs 'end' (the step where it reaches 'to')")
        elif kind in ("linear", "cosine") and isinstance(start, int) and isinstance(end, int) and end <= start:
            checker.problem(path + ("end",), f"must be greater than 'start: {start}'")


@dataclass
class LossKeys(Gates):
    """A loss entry's framework keys: the gates and ``weight`` (a number or a :class:`WeightSchedule`)."""

    weight: Union[float, WeightSchedule] = 1.0


@dataclass
class FrozenWindow:
    """``frozen: {after: N, before: M}``: the network's weights do not change after step N / before step M."""

    after: Optional[int] = _min(0, None)
    before: Optional[int] = _min(1, None)

    @staticmethod
    def check(values: dict, path: KeyPath, checker: "Checker") -> None:
        if values.get("after") is None and values.get("before") is None:
            checker.problem(path, "give 'after', 'before' or both (or write frozen: true / false)")


@dataclass
class NetworkKeys:
    """Per-network switches handled by the trainer."""

    channels_last: Union[bool, Literal["auto"]] = False  # auto: measured at the start (dlas.trainer.speed)
    # torch.compile: true (mode default), or a mode; reduce-overhead captures CUDA graphs
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune"]] = False
    checkpointing: bool = False
    frozen: Union[bool, FrozenWindow] = False
    ema: bool = True


@dataclass
class LoaderKeys:
    """Data-loader keys of a dataset entry; ``batch_size`` is the global batch (split across ranks)."""

    batch_size: int = _min(1, 1, max=MAX_BATCH_SIZE)
    num_workers: int = _min(0, 0, max=MAX_NUM_WORKERS)
    shuffle: Optional[bool] = None  # null: true for the `train` dataset, false for the others
    item_keys: Optional[list[str]] = None  # state keys naming the parts of an item that is a tuple or a tensor


SchedulerEntry = Annotated[dict, Component("scheduler", provided=("optimizer",))]


def reserved_keys(section: type) -> tuple[str, ...]:
    """The YAML keys of a dataclass of framework keys: what the trainer handles and a constructor never sees."""
    return tuple(yaml_name(f.name) for f in dataclasses.fields(section))


NETWORK_KEYS = reserved_keys(NetworkKeys)
LOADER_KEYS = reserved_keys(LoaderKeys)
GATE_KEYS = reserved_keys(Gates)
LOSS_KEYS = reserved_keys(LossKeys)

# component kind -> the framework keys every entry of that kind accepts besides its constructor's options
FRAMEWORK_KEYS: dict[str, type] = {"network": NetworkKeys, "dataset": LoaderKeys, "loss": LossKeys,
                                   "injector": Gates}


def describe_framework_keys(kind: str) -> list[str]:
    """``--describe``'s lines for the framework keys of a ``kind`` entry (empty for kinds without any)."""
    from dlas.registry import hint_name

    section = FRAMEWORK_KEYS.get(kind)
    if section is None:
        return []
    hints = typing.get_type_hints(section)
    lines = [f"  framework keys (any {kind} entry; the trainer handles them, docs/config.md):",
             "    " + (inspect.getdoc(section) or "").splitlines()[0]]
    for f in dataclasses.fields(section):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"    {yaml_name(f.name)}: {hint_name(hints[f.name])} = {default!r}")
    return lines


# ------------------------------------------------------------------------------------------ sections
@dataclass
class StepSection:
    """One optimizer step per iteration: what it trains, what it computes and what it minimises."""

    training: Union[str, list[str]]
    optimizer: Annotated[dict, Component("optimizer", provided=("params",), rules=OPTIMIZER_RULES)]
    lr_scheduler: Optional[SchedulerEntry] = None  # null: use train.lr_scheduler
    grad_clip: Optional[float] = None
    after: Optional[int] = _min(0, None)
    before: Optional[int] = _min(1, None)
    every: Optional[int] = _min(1, None)
    injectors: dict[str, Annotated[dict, Component("injector", keys=Gates)]] = field(default_factory=dict)
    losses: dict[str, Annotated[dict, Component("loss", keys=LossKeys)]] = field(default_factory=dict)

    @staticmethod
    def check(values: dict, path: KeyPath, checker: "Checker") -> None:
        Gates.check(values, path, checker)
        clip = values.get("grad_clip")
        if isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip <= 0:
            checker.problem(path + ("grad_clip",), f"must be positive (a gradient norm), got {clip}; "
                                                   "use null for no clipping")
        if isinstance(values.get("training"), str):
            values["training"] = [values["training"]]


@dataclass
class EmaSection:
    """Exponential moving averages of network weights."""

    rate: Union[float, list[float]]
    networks: Optional[list[str]] = None  # null: every network a step trains (those with ema: true)
    warmup: int = _min(0, 0)
    start: int = _min(0, 0)

    @staticmethod
    def check(values: dict, path: KeyPath, checker: "Checker") -> None:
        rates = values.get("rate")
        for rate in rates if isinstance(rates, list) else [rates]:
            if isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate) and \
                    not 0 < rate < 1:
                checker.problem(path + ("rate",), f"an EMA rate is between 0 and 1 (e.g. 0.999), got {rate}")


@dataclass
class TrainSection:
    """How long and how to train."""

    niter: int = _min(1)
    mega_batch_factor: int = _min(1, 1)
    ema: Optional[EmaSection] = None
    lr_scheduler: Optional[SchedulerEntry] = None
    val_freq: Optional[int] = _min(1, None)
    max_bad_steps: int = _min(0, 10)
    allow_tf32: bool = False
    # seconds a rank waits for the others before the job fails (DDP)
    dist_timeout: float = field(default=600.0, metadata={"above": 0})
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate trained networks, or shard them


@dataclass
class LoggerSection:
    """Console, checkpoint and image logging."""

    print_freq: int = _min(1, 100)
    save_checkpoint_freq: int = _min(1, 5000)
    keep_checkpoints: int = _min(1, 5)
    keep_best: Optional[str] = None
    keep_every: Optional[int] = _min(1, None)
    visuals: list[str] = field(default_factory=list)
    visual_freq: int = _min(1, 500)
    tensorboard: bool = True
    wandb: Optional[WandbSection] = None  # a second logger with the same scalars and images


@dataclass
class WandbSection:
    """``logger.wandb``: log to Weights & Biases too (``pip install -e ".[wandb]"``); a resume continues the run."""

    project: str
    entity: Optional[str] = None
    name: Optional[str] = None  # null: the run's name
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    notes: Optional[str] = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: offline without an API key or network


@dataclass
class PathSection:
    """Where runs go and which weights to start from (``pretrain_model_NET: FILE`` per network)."""

    root: str = "experiments"
    resume_state: Optional[str] = None
    strict_load: bool = True
    results: Optional[str] = None  # dlas-test -opt: where results go (null: results/NAME)

    prefixed_keys = {"pretrain_model_": Optional[str]}


@dataclass
class ConfigSchema:
    """The top level of a config file."""

    name: str
    seed: int = _min(0, 0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"  # auto: fp32 or bf16, measured at the start
    imports: list[str] = field(default_factory=list)
    datasets: dict[str, Annotated[dict, Component("dataset", keys=LoaderKeys)]] = field(default_factory=dict)
    networks: dict[str, Annotated[dict, Component("network", keys=NetworkKeys)]] = field(default_factory=dict)
    steps: dict[str, StepSection] = field(default_factory=dict)
    train: Optional[TrainSection] = None  # required for training (checked in validate)
    eval: dict[str, Annotated[dict, Component("evaluator")]] = field(default_factory=dict)
    logger: LoggerSection = field(default_factory=dict)
    path: PathSection = field(default_factory=dict)

    @staticmethod
    def check(values: dict, path: KeyPath, checker: "Checker") -> None:
        name = values.get("name")
        if isinstance(name, str) and (not name.strip() or re.search(r"[/\\]|^\.+$", name)):
            checker.problem(("name",), f"the run name is a folder name under path.root; got {name!r}")


# ------------------------------------------------------------------------------------------ the checker
class Checker:
    """Walks a config against the dataclasses above, filling defaults and collecting every problem."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def problem(self, path: KeyPath, message: str) -> None:
        self.problems.append(Problem(format_path(path), message))

    def value(self, hint: Any, value: Any, path: KeyPath) -> Any:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is Annotated:
            component = next((a for a in args[1:] if isinstance(a, Component)), None)
            return self.component(component, value, path) if component else self.value(args[0], value, path)
        if origin in (Union, types.UnionType):
            if value is None and _NoneType in args:
                return None
            if isinstance(value, dict):
                for arm in args:
                    if dataclasses.is_dataclass(arm) or typing.get_origin(arm) is Annotated:
                        return self.value(arm, value, path)
            self._type(Union[tuple(_plain_hint(a) for a in args)], value, path)
            return value
        if dataclasses.is_dataclass(hint):
            return self.section(hint, value, path)
        if origin is dict:
            return self.named_entries(args[1], value, path)
        self._type(hint, value, path)
        return value

    def _type(self, hint: Any, value: Any, path: KeyPath) -> None:
        error = type_error(value, hint)
        if error and isinstance(value, float) and value.is_integer() and type_error(int(value), hint) is None:
            error += f"; write it as the integer {int(value)} (1e5 is a float)"
        if error or (error := number_problem(value)):
            self.problem(path, error)

    def named_entries(self, hint: Any, value: Any, path: KeyPath) -> Any:
        if not isinstance(value, dict):
            self.problem(path, f"expected a mapping of NAME: {{...}} entries, got {_describe(value)}")
            return value
        result = {}
        for name, entry in value.items():
            if not isinstance(name, str) or not _NAME.match(name):
                self.problem(path + (name,), "a name may use letters, digits, '_' and '-' only "
                                             "(it appears in dotted paths and file names)")
            result[name] = self.value(hint, entry, path + (name,))
        return result

    def section(self, cls: type, value: Any, path: KeyPath) -> Any:
        if not isinstance(value, dict):
            self.problem(path, f"expected a mapping, got {_describe(value)}")
            return value
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = {yaml_name(f.name): f for f in dataclasses.fields(cls)}
        prefixed: dict[str, Any] = getattr(cls, "prefixed_keys", {})
        result: dict = {}
        for key in value:
            if key not in fields and not _prefix_of(key, prefixed):
                valid = list(fields) + [f"{p}NAME" for p in prefixed]
                self.problem(path + (key,), f"unknown key{did_you_mean(key, list(fields))}; "
                                            f"valid keys: {', '.join(valid)}")
        for key, spec in fields.items():
            hint = hints[spec.name]
            if key in value:
                result[key] = self.value(hint, value[key], path + (key,))
                self._bounds(spec, result[key], path + (key,))
            elif spec.default is not dataclasses.MISSING:
                result[key] = spec.default
            elif spec.default_factory is not dataclasses.MISSING:
                result[key] = self.value(hint, spec.default_factory(), path + (key,))
            else:
                self.problem(path + (key,), "required key is missing")
        for key in value:
            prefix = _prefix_of(key, prefixed)
            if prefix:
                result[key] = self.value(prefixed[prefix], value[key], path + (key,))
        check = getattr(cls, "check", None)
        if check:
            check(result, path, self)
        return result

    def _bounds(self, spec: dataclasses.Field, value: Any, path: KeyPath) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or number_problem(value):
            return
        low, high, above = (spec.metadata.get(key) for key in ("min", "max", "above"))
        if low is not None and value < low:
            self.problem(path, f"must be at least {low}, got {value}")
        elif high is not None and value > high:
            self.problem(path, f"must be at most {high}, got {value}")
        elif above is not None and value <= above:
            self.problem(path, f"must be greater than {above}, got {value}")

    def component(self, spec: Component, value: Any, path: KeyPath) -> Any:
        registry = REGISTRIES[spec.kind]
        reserved = [yaml_name(f.name) for f in dataclasses.fields(spec.keys)] if spec.keys else []
        problems = registry.check(value, format_path(path), reserved=reserved, provided=spec.provided)
        for problem in problems:
            self.problems.append(_with_reserved_hint(problem, reserved))
        if not problems:
            self._component_numbers(spec, value, path, reserved)
        if not isinstance(value, dict) or not spec.keys:
            return value
        framework = self.section(spec.keys, {k: v for k, v in value.items() if k in reserved}, path)
        return {**value, **framework}


    def _component_numbers(self, spec: Component, value: dict, path: KeyPath, reserved: list[str]) -> None:
        """The numbers of a component's options (see :func:`number_problem`) and the kind's ``rules``."""
        target = REGISTRIES[spec.kind].get(value["type"])
        signature = inspect.signature(target.__init__ if inspect.isclass(target) else target)
        defaults = {yaml_name(p.name): p.default for p in signature.parameters.values()}
        rules = dict(spec.rules)
        for key, item in value.items():
            if key == "type" or key in reserved:  # the framework's keys are checked by their section
                continue
            default = defaults.get(key)
            problem = number_problem(item, allow_infinite=isinstance(default, float) and math.isinf(default))
            if problem is None and key in rules:
                problem = rules[key].problem(item)
            if problem:
                self.problem(path + (key,), problem)


def _with_reserved_hint(problem: Problem, reserved: list[str]) -> Problem:
    """Extend the registry's "unknown option" message with the framework keys (``wieght`` -> ``weight``)."""
    if not reserved or not problem.message.startswith("unknown option"):
        return problem
    key = problem.path.rsplit(".", 1)[-1]
    message = problem.message
    if "did you mean" not in message:
        message = "unknown option" + did_you_mean(key, reserved) + message[len("unknown option"):]
    return dataclasses.replace(problem, message=f"{message}; framework keys: {', '.join(reserved)}")


def _prefix_of(key: Any, prefixed: dict[str, Any]) -> Optional[str]:
    return next((p for p in prefixed if isinstance(key, str) and key.startswith(p) and len(key) > len(p)), None)


def _plain_hint(hint: Any) -> Any:
    """The hint ``type_error`` checks in place of a section or component: a mapping."""
    if dataclasses.is_dataclass(hint) or typing.get_origin(hint) is Annotated:
        return dict
    return hint


def _describe(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping",
             type(None): "null (an empty value)"}
    text = repr(value)
    return names.get(type(value), type(value).__name__) + (f" {text}" if len(text) <= 40 and value is not None else "")


# ------------------------------------------------------------------------------------------ entry points
def validate(data: dict, training: bool = True) -> tuple[dict, list[Problem]]:
    """Check ``data`` against the schema; return the config with defaults filled in and every problem found."""
    checker = Checker()
    resolved = checker.section(ConfigSchema, data, ())
    if not isinstance(resolved, dict):
        return data, checker.problems
    _fill_shuffle(resolved)
    if training:
        _check_training(resolved, checker)
    _check_references(resolved, checker)
    return resolved, checker.problems


def _fill_shuffle(cfg: dict) -> None:
    datasets = cfg.get("datasets")
    if isinstance(datasets, dict):
        for name, entry in datasets.items():
            if isinstance(entry, dict) and entry.get("shuffle") is None:
                entry["shuffle"] = name == "train"


def _check_training(cfg: dict, checker: Checker) -> None:
    if cfg.get("train") is None:
        checker.problem(("train",), "required section is missing (it needs at least niter: N)")
    datasets = cfg.get("datasets")
    if isinstance(datasets, dict) and "train" not in datasets:
        checker.problem(("datasets", "train"), "training needs a dataset named 'train'"
                                               f"{did_you_mean('train', datasets)}")
    if isinstance(cfg.get("steps"), dict) and not cfg["steps"]:
        checker.problem(("steps",), "training needs at least one step (steps: {NAME: {training: [...], "
                                    "optimizer: {...}, losses: {...}}})")
    _check_keep_best(cfg, checker)
    resume = (cfg.get("path") or {}).get("resume_state") if isinstance(cfg.get("path"), dict) else None
    if isinstance(resume, str) and resume:
        # Checked here, before the run folder is touched; the trainer verifies the checkpoint's contents.
        folder = Path(resume)
        if folder.is_file():
            checker.problem(("path", "resume_state"), f"'{resume}' is a file; give the checkpoint folder "
                                                      f"'{folder.parent}' (path.root/NAME/checkpoints/STEP)")
        elif not folder.is_dir():
            checker.problem(("path", "resume_state"), f"'{resume}' does not exist; give a checkpoint folder "
                                                      "path.root/NAME/checkpoints/STEP, e.g. "
                                                      "experiments/my_run/checkpoints/5000")


def _check_keep_best(cfg: dict, checker: Checker) -> None:
    """``logger.keep_best`` names an evaluator under ``eval:`` and, where its class says, a metric it reports.

    The trainer keeps a best checkpoint only when the metric appears in the validation results, so a typo here
    would silently keep none.
    """
    logger, evaluators = cfg.get("logger"), cfg.get("eval")
    key = logger.get("keep_best") if isinstance(logger, dict) else None
    if not isinstance(key, str) or not isinstance(evaluators, dict):
        return
    path = ("logger", "keep_best")
    name, _, metric = key.partition("/")
    if not name or not metric:
        checker.problem(path, f"expected EVALUATOR/METRIC, e.g. sr/psnr (an evaluator under eval: and one of its "
                              f"metrics), got {key!r}")
        return
    if name not in evaluators:
        checker.problem(path, f"no evaluator named '{name}' under eval:{did_you_mean(name, evaluators)} "
                              f"(eval: {', '.join(evaluators) or 'none are defined'})")
        return
    type_name = evaluators[name].get("type") if isinstance(evaluators[name], dict) else None
    registry = REGISTRIES["evaluator"]
    if not isinstance(type_name, str) or type_name not in registry:
        return
    try:
        reports = getattr(registry.get(type_name), "higher_is_better", None)
    except Exception:  # a component that cannot be imported is reported by its own check
        return
    if isinstance(reports, dict) and reports and metric not in reports:
        checker.problem(path, f"evaluator '{name}' ({type_name}) reports no metric '{metric}'"
                              f"{did_you_mean(metric, reports)}; it reports: {', '.join(reports)}")


def _check_references(cfg: dict, checker: Checker) -> None:
    """Every network named in steps, train.ema and path must be defined under networks:."""
    networks = cfg.get("networks") if isinstance(cfg.get("networks"), dict) else {}

    def expect_network(name: Any, path: KeyPath) -> None:
        if isinstance(name, str) and name not in networks:
            known = ", ".join(networks) or "none are defined"
            checker.problem(path, f"no network named '{name}'{did_you_mean(name, networks)} (networks: {known})")

    for step_name, step in (cfg.get("steps") or {}).items():
        training = step.get("training") if isinstance(step, dict) else None
        if isinstance(training, list):
            if not training:
                checker.problem(("steps", step_name, "training"), "name at least one network to train")
            for i, name in enumerate(training):
                expect_network(name, ("steps", step_name, "training", i))
    train = cfg.get("train")
    ema = train.get("ema") if isinstance(train, dict) else None
    if isinstance(ema, dict) and isinstance(ema.get("networks"), list):
        for i, name in enumerate(ema["networks"]):
            expect_network(name, ("train", "ema", "networks", i))
    paths = cfg.get("path")
    if isinstance(paths, dict):
        for key in paths:
            if _prefix_of(key, PathSection.prefixed_keys):
                expect_network(key[len("pretrain_model_"):], ("path", key))


def known_keys(path: KeyPath, node: Any, root: Any = None) -> list[str]:
    """Keys the schema (or a component's constructor) accepts in the mapping ``node`` at ``path`` of ``root``.

    Overrides may set these even when the file does not: ``train.mega_batch_factor=2``,
    ``networks.generator.nb=2`` where the file relies on the default, or ``path.pretrain_model_generator=…``.
    """
    hint: Any = ConfigSchema
    for key in path:
        hint = _section_hint(hint)
        if dataclasses.is_dataclass(hint):
            hints = typing.get_type_hints(hint, include_extras=True)
            name = python_name(str(key))
            hint = hints.get(name) or hints.get(str(key))
            if hint is None:
                return []
        elif typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        else:
            return []
    hint = _section_hint(hint)
    if dataclasses.is_dataclass(hint):
        keys = [yaml_name(f.name) for f in dataclasses.fields(hint)]
        networks = root.get("networks") if isinstance(root, dict) else None
        if hint is PathSection and isinstance(networks, dict):
            keys += [f"pretrain_model_{name}" for name in networks]
        return keys
    if typing.get_origin(hint) is Annotated and isinstance(node, dict):
        spec = next(a for a in typing.get_args(hint)[1:] if isinstance(a, Component))
        keys = [yaml_name(f.name) for f in dataclasses.fields(spec.keys)] if spec.keys else []
        return keys + _constructor_keys(spec, node.get("type"))
    return []


def _section_hint(hint: Any) -> Any:
    """The dataclass or component inside ``Optional[...]``/``Union[...]``, else the hint itself."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        for arm in typing.get_args(hint):
            if dataclasses.is_dataclass(arm) or typing.get_origin(arm) is Annotated:
                return arm
    return hint


def _constructor_keys(spec: Component, type_name: Any) -> list[str]:
    registry = REGISTRIES[spec.kind]
    if not isinstance(type_name, str) or type_name not in registry:
        return []
    try:
        target = registry.get(type_name)
    except Exception:  # a component that cannot be imported has no known keys; validation reports why
        return []
    signature = inspect.signature(target.__init__ if inspect.isclass(target) else target)
    return [yaml_name(p.name) for p in signature.parameters.values()
            if p.name != "self" and p.name not in spec.provided and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
