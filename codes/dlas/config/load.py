"""``load_config``: file + bases -> plugin imports -> overrides -> schema and component checks -> :class:`Config`."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from dlas.config import schema
from dlas.config.inherit import display_name, load_with_bases, strip_replace
from dlas.config.overrides import apply_overrides
from dlas.config.source import ConfigSource
from dlas.config.yaml_io import dump_yaml
from dlas.errors import ConfigError, Problem
from dlas.registry import import_plugins


class Config(dict):
    """A resolved config: plain nested dicts and lists with every default filled in.

    ``source`` records the file and line (or override) each value came from; use :meth:`attach_lines` to give
    problems found later (e.g. by the trainer's graph check, which knows only dotted paths) their lines.
    """

    def __init__(self, data: Any = (), source: Optional[ConfigSource] = None):
        super().__init__(data)
        self.source = source if source is not None else ConfigSource()

    def attach_lines(self, problems: Iterable[Problem]) -> list[Problem]:
        """``problems`` with the file and line of their dotted paths filled in, where known."""
        return self.source.attach_lines(problems)


def load_config(path: str, overrides: Iterable[str] = (), imports: Iterable[str] = (),
                training: bool = True, default_name: Optional[str] = None) -> Config:
    """Load, merge, override and validate a config file; raise :class:`ConfigError` listing every problem.

    ``imports`` are plugin modules to import in addition to the file's ``imports:`` (``--import``); they are
    added to the resolved config so that its dump reproduces the run. ``training=False`` (inference,
    ``dlas-test -opt``) does not require the ``train`` section, a ``train`` dataset or any steps.
    ``default_name`` is the ``name`` of a config that sets none (a test config is named after its file).
    """
    file = Path(path)
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise ConfigError(f"config file '{path}' {what}", str(path))
    data, locations, files = load_with_bases(file)
    data = strip_replace(data)
    source = ConfigSource(file=files[0], files=files, locations=locations)
    try:
        # Plugins come first so that an override may name an option of a plugin component.
        listed = list(data.get("imports") or [])
        imported = _import_plugins(data, list(imports), file.parent)
        apply_overrides(data, overrides, source, known_keys=schema.known_keys)
        if data.get("imports") != listed:
            imported = _import_plugins(data, list(imports), file.parent)
    except ConfigError as exc:
        raise ConfigError(source.attach_lines(exc.problems)) from None
    if imported:
        data["imports"] = imported
    if default_name is not None and isinstance(data, dict) and "name" not in data:
        data["name"] = default_name
    source.prune(data)
    resolved, problems = schema.validate(data, training=training)
    if problems:
        located = source.attach_lines(problems)
        # In file order, so the list reads top to bottom alongside the editor.
        raise ConfigError(sorted(located, key=lambda p: (p.file or "", p.line or 0)))
    return Config(resolved, source)


def resolve_config(data: Mapping[str, Any], training: bool = True) -> Config:
    """Validate an in-memory config as :func:`load_config` does a file, importing its ``imports:`` and filling in
    every default; raise :class:`ConfigError` listing every problem (for code that builds configs itself)."""
    data = copy.deepcopy(dict(data))
    _import_plugins(data, [], Path.cwd())
    resolved, problems = schema.validate(data, training=training)
    if problems:
        raise ConfigError(problems)
    return Config(resolved)


def _import_plugins(data: dict, extra: list[str], folder: Path) -> list[str]:
    """Import the config's ``imports:`` plus ``extra``; return the combined list (without duplicates)."""
    listed = data.get("imports", [])
    if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
        raise ConfigError("expected a list of module names or .py files, e.g. imports: [my_plugins]", "imports")
    modules = list(dict.fromkeys(listed + extra))
    paths = [plugin_path(m, folder) for m in modules]
    import_plugins(paths)
    # A module name that was found as a file is recorded as that file, so the run's config.yml finds it again.
    return list(dict.fromkeys(p if p != m and not m.endswith(".py") else m for m, p in zip(modules, paths)))


def plugin_path(module: str, folder: Optional[Path] = None) -> str:
    """What to import for a plugin entry: a ``.py`` path or a module name, looked up the way users expect.

    A relative ``.py`` path is looked up next to the config file (``folder``) first, then in the working folder.
    A plain module name that Python cannot import (``my_plugin`` while neither the config's folder nor the
    working folder is on ``sys.path``) is taken as ``my_plugin.py`` found in those same two places.
    """
    if module.endswith(".py"):
        if folder is not None and not Path(module).is_absolute() and (folder / module).is_file():
            return display_name(folder / module)
        return module
    if not module.isidentifier() or _importable(module):
        return module
    for place in ([folder] if folder is not None else []) + [Path.cwd()]:
        file = place / f"{module}.py"
        if file.is_file():
            return display_name(file)
    return module


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def dump_config(cfg: dict) -> str:
    """The YAML text of a (resolved) config, as written to the run folder's ``config.yml``."""
    return dump_yaml(cfg)
