"""Registries of components a config can name by ``type:``.

A component is a class or function registered under a name::

    from dlas.registry import NETWORKS

    @NETWORKS.register("tiny_sr")
    class TinySR(torch.nn.Module):
        '''A two-layer upsampler (docstring = user docs).'''
        def __init__(self, nf: int = 16, scale: int = 4): ...

The constructor's signature *is* the config schema: ``build({"type": "tiny_sr", "nf": 32})`` checks every
key against it (unknown keys, missing required keys, values of the wrong type per the type hints) and only
then constructs. Built-in components are listed by name in :mod:`dlas.builtins` and imported on first use,
so ``import dlas`` stays fast and a broken optional dependency only affects the component needing it.
"""
from __future__ import annotations

import collections.abc
import importlib
import importlib.util
import inspect
import keyword
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from dlas.errors import ConfigError, Problem, did_you_mean

_NoneType = type(None)


class Registry:
    """Maps names to components of one kind (networks, losses, …) and builds them from config dicts."""

    def __init__(self, kind: str, builtins: Optional[dict[str, str]] = None, provided: Iterable[str] = ()):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._builtins = dict(builtins or {})
        # constructor arguments the framework always passes itself (an optimizer's params): never config options
        self.provided = tuple(provided)

    # ------------------------------------------------------------------ registration
    def register(self, name: Optional[str] = None, override: bool = False) -> Callable[[Any], Any]:
        """Decorator registering a class or function under ``name`` (default: its ``__name__``)."""

        def decorator(obj: Any) -> Any:
            key = name or obj.__name__
            old = self._entries.get(key)
            if old is not None and not override and _qualname(old) != _qualname(obj):
                raise ValueError(
                    f"{self.kind} '{key}' is already registered by {_qualname(old)}; "
                    f"pick another name or pass override=True"
                )
            self._entries[key] = obj
            return obj

        return decorator

    # ------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        """All names, registered or built-in (not yet imported) alike, sorted."""
        return sorted(set(self._entries) | set(self._builtins))

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._builtins

    def get(self, name: str, path: str = "type") -> Any:
        """Return the component registered as ``name``, importing its built-in module if needed."""
        if name not in self._entries and name in self._builtins:
            module = self._builtins[name]
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(
                    f"{self.kind} '{name}' needs a package that failed to import: {exc} (module {module})",
                    path,
                ) from exc
            if name not in self._entries:
                raise RuntimeError(f"built-in module {module} did not register {self.kind} '{name}'")
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} type '{name}'{did_you_mean(name, self.names())}; "
                f"`dlas-train --list {self.kind}` lists them",
                path,
            )
        return self._entries[name]

    def load_all(self) -> dict[str, str]:
        """Import every built-in module; return {name: reason} for those that could not be imported."""
        failures = {}
        for name in list(self._builtins):
            try:
                self.get(name)
            except ConfigError as exc:
                failures[name] = str(exc.problems[0].message)
        return failures

    # ------------------------------------------------------------------ building
    def check(self, cfg: Any, path: str, reserved: Iterable[str] = (), provided: Iterable[str] = ()) -> list[Problem]:
        """Return every problem of ``cfg`` against the signature of its ``type`` (empty list: fine).

        ``reserved`` names keys the framework handles itself (e.g. a loss's ``weight``); they are skipped.
        ``provided`` names constructor arguments the framework passes itself (e.g. an optimizer's ``params``):
        they are neither required from nor accepted in the config.
        """
        if not isinstance(cfg, dict):
            return [Problem(path, f"expected a mapping with a 'type:' key, got {type(cfg).__name__}")]
        if "type" not in cfg:
            return [Problem(path, f"missing 'type:' (one of: {', '.join(self.names())})")]
        try:
            target = self.get(cfg["type"], f"{path}.type")
        except ConfigError as exc:
            return exc.problems
        user = {k: v for k, v in cfg.items() if k != "type" and k not in set(reserved)}
        return check_call(target, user, path, (*self.provided, *provided))

    @staticmethod
    def _kwargs(cfg: dict, reserved: Iterable[str]) -> dict[str, Any]:
        return {python_name(k): v for k, v in cfg.items() if k != "type" and k not in set(reserved)}

    def build(self, cfg: dict, path: Optional[str] = None, reserved: Iterable[str] = (), **extra: Any) -> Any:
        """Validate ``cfg`` against its ``type``'s signature, then construct it.

        ``extra`` keyword arguments are supplied by the framework (not user keys) and are not validated.
        """
        where = path or self.kind
        problems = self.check(cfg, where, reserved, provided=extra)
        if problems:
            raise ConfigError(problems)
        target = self.get(cfg["type"], f"{where}.type")
        try:
            return target(**self._kwargs(cfg, reserved), **extra)
        except ConfigError as exc:
            if path is None:
                raise
            # A constructor knows its option names, not where it sits in the config: prefix its paths.
            raise ConfigError([_under(p, path) for p in exc.problems]) from exc

    def describe(self, name: str) -> str:
        """Human-readable options and docstring of one component (for ``--describe``)."""
        target = self.get(name)
        lines = [f"{self.kind} '{name}'  ({_qualname(target)})", ""]
        doc = inspect.getdoc(target) or "(no docstring)"
        lines += ["  " + line for line in doc.splitlines()] + ["", "  options:"]
        hints = _type_hints(target)
        for param in _parameters(target):
            if param.name == "self" or param.name in self.provided:
                continue
            hint = hints.get(param.name, param.annotation)
            hint_text = "" if hint is inspect.Parameter.empty else f": {hint_name(hint)}"
            default = " (required)" if param.default is inspect.Parameter.empty else f" = {param.default!r}"
            lines.append(f"    {yaml_name(param.name)}{hint_text}{default}")
        return "\n".join(lines)


def _under(problem: Problem, path: str) -> Problem:
    """``problem`` re-rooted at the config ``path`` unless it already names a full dotted path or a file."""
    inner = problem.path
    if inner.startswith(path) or "/" in inner or inner.startswith(("datasets.", "networks.", "steps.", "train.",
                                                                      "eval.", "logger.", "path.")):
        return problem
    joined = f"{path}.{inner}" if inner and not inner.startswith("[") else f"{path}{inner}"
    return Problem(joined, problem.message, problem.line, problem.file)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _callable_for_signature(target: Any) -> Any:
    return target.__init__ if inspect.isclass(target) else target


def _parameters(target: Any) -> list[inspect.Parameter]:
    params = list(inspect.signature(target).parameters.values())
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _accepts_var_keywords(target: Any) -> bool:
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())


def _type_hints(target: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(_callable_for_signature(target))
    except Exception:  # unresolvable forward references: fall back to no type checks
        return {}


def check_call(target: Any, kwargs: dict[str, Any], path: str, provided: Iterable[str] = ()) -> list[Problem]:
    """Problems of calling ``target(**kwargs)``: unknown/missing keys and values of the wrong type.

    Parameters named in ``provided`` are supplied by the framework and are not config options.
    """
    kwargs = {python_name(k): v for k, v in kwargs.items()}
    problems = []
    provided = set(provided)
    params = {p.name: p for p in _parameters(target) if p.name not in provided and p.name != "self"}
    hints = _type_hints(target)
    if not _accepts_var_keywords(target):
        for key in kwargs:
            if key not in params:
                names = [yaml_name(p) for p in params]
                problems.append(
                    Problem(f"{path}.{yaml_name(key)}", f"unknown option{did_you_mean(yaml_name(key), names)}; "
                            f"valid options: {', '.join(names) or '(none)'}")
                )
    for name, param in params.items():
        if name not in kwargs:
            if param.default is inspect.Parameter.empty and param.kind != param.POSITIONAL_ONLY:
                problems.append(Problem(f"{path}.{yaml_name(name)}", "required option is missing"))
            continue
        if name in hints:
            error = type_error(kwargs[name], hints[name])
            if error:
                problems.append(Problem(f"{path}.{yaml_name(name)}", error))
    return problems


def python_name(key: str) -> str:
    """The parameter name of a YAML key: a Python keyword (``in``) maps to ``in_``."""
    return f"{key}_" if keyword.iskeyword(key) else key


def yaml_name(param: str) -> str:
    """The YAML key of a parameter name: ``in_`` is written ``in``."""
    return param[:-1] if param.endswith("_") and keyword.iskeyword(param[:-1]) else param


def hint_name(hint: Any) -> str:
    """A type hint in config words: ``integer``, ``number or null``, ``list of string``, ..."""
    if hint is _NoneType:
        return "null"
    if isinstance(hint, type) and not typing.get_args(hint):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            hint.__name__, hint.__name__
        )
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(hint_name(a) for a in args)
    if origin in (list, collections.abc.Sequence, tuple):
        inner = ", ".join(hint_name(a) for a in args if a is not Ellipsis)
        return f"list of {inner}" if inner else "list"
    if origin in (dict, collections.abc.Mapping):
        return "mapping"
    return str(hint).replace("typing.", "")


def type_error(value: Any, hint: Any) -> Optional[str]:
    """Return why ``value`` does not fit the type hint ``hint``, or ``None`` when it does."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        if value in args:
            return None
        return f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}{did_you_mean(value, args)}"
    if origin in (typing.Union, types.UnionType):
        if any(type_error(value, arm) is None for arm in args):
            return None
        return f"expected {hint_name(hint)}, got {_describe_value(value)}"
    if origin is typing.Annotated:
        return type_error(value, args[0])
    expected = f"expected {hint_name(hint)}, got {_describe_value(value)}"
    if hint is _NoneType or hint is None:
        return None if value is None else expected
    if hint is bool:
        return None if isinstance(value, bool) else expected
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else expected
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else expected
    if hint is str:
        return None if isinstance(value, str) else expected
    if origin in (list, collections.abc.Sequence, collections.abc.Iterable) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return expected
        if args:
            for i, item in enumerate(value):
                error = type_error(item, args[0])
                if error:
                    return f"item {i}: {error}"
        return None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return expected
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            return f"expected a list of {len(args)} values, got {len(value)}"
        for i, (item, arm) in enumerate(zip(value, args)):
            error = type_error(item, arm)
            if error:
                return f"item {i}: {error}"
        return None
    if origin in (dict, collections.abc.Mapping) or hint in (dict,):
        return None if isinstance(value, dict) else expected
    if isinstance(hint, type):
        return None if isinstance(value, hint) else expected
    return None  # a hint we do not understand is not checked


def _describe_value(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping",
            type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text}" if len(text) <= 40 else kind


# ---------------------------------------------------------------------- plugins
def import_plugins(modules: Iterable[str], path: str = "imports") -> None:
    """Import user plugin modules (``pkg.module`` or a ``file.py`` path) so their registrations exist."""
    problems = []
    for i, module in enumerate(modules):
        try:
            if str(module).endswith(".py"):
                file = Path(module)
                if not file.is_file():
                    problems.append(Problem(f"{path}[{i}]", f"plugin file '{module}' does not exist"))
                    continue
                name = f"dlas_plugin_{file.stem}"
                spec = importlib.util.spec_from_file_location(name, file)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[name] = mod
                spec.loader.exec_module(mod)
            else:
                importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and str(module).startswith(exc.name):
                problems.append(Problem(f"{path}[{i}]", f"cannot import plugin module '{module}': no such module "
                                        "(is it installed or on PYTHONPATH?)"))
            else:
                problems.append(Problem(f"{path}[{i}]", f"plugin module '{module}' failed to import: {exc}"))
        except ConfigError:
            raise
        except Exception as exc:  # a plugin's own bug: report it where it happened, with its type
            problems.append(Problem(f"{path}[{i}]", f"plugin module '{module}' raised {type(exc).__name__}: {exc}"))
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------- the registries
from dlas import builtins as _builtins  # noqa: E402  (a plain table of names, imports nothing)

NETWORKS = Registry("network", _builtins.NETWORKS)
INJECTORS = Registry("injector", _builtins.INJECTORS)
LOSSES = Registry("loss", _builtins.LOSSES)
DATASETS = Registry("dataset", _builtins.DATASETS)
EVALUATORS = Registry("evaluator", _builtins.EVALUATORS)
OPTIMIZERS = Registry("optimizer", _builtins.OPTIMIZERS, provided=("params",))
SCHEDULERS = Registry("scheduler", _builtins.SCHEDULERS, provided=("optimizer",))
DEGRADATIONS = Registry("degradation", _builtins.DEGRADATIONS, provided=("path",))
TASKS = Registry("task", _builtins.TASKS, provided=("networks", "config", "device", "autocast"))

REGISTRIES: dict[str, Registry] = {
    r.kind: r for r in (NETWORKS, INJECTORS, LOSSES, DATASETS, EVALUATORS, OPTIMIZERS, SCHEDULERS, DEGRADATIONS,
                        TASKS)
}
