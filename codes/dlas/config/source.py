"""Where each value of a config came from (file and line, or a command-line override).

Paths are kept as tuples of keys and list indices, ``("steps", "gen", "optimizer", "betas", 0)``, and written
as ``steps.gen.optimizer.betas[0]``, the form every error message uses.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from dlas.errors import Problem

Key = Union[str, int]
KeyPath = tuple[Key, ...]

_PATH_TOKEN = re.compile(r"\[(-?\d+)\]|([^.\[\]]+)")


def format_path(path: Iterable[Key]) -> str:
    """``("a", "b", 0, "c")`` -> ``"a.b[0].c"``."""
    text = ""
    for key in path:
        if isinstance(key, int) and not isinstance(key, bool):
            text += f"[{key}]"
        else:
            text += f".{key}" if text else str(key)
    return text


def parse_path(text: str) -> KeyPath:
    """``"a.b[0].c"`` -> ``("a", "b", 0, "c")``; ``.N`` stays the string ``"N"`` (its meaning depends on the parent)."""
    keys: list[Key] = []
    position = 0
    for match in _PATH_TOKEN.finditer(text):
        between = text[position:match.start()]
        if between not in ("", "."):
            raise ValueError(f"cannot parse key path '{text}'")
        index, name = match.groups()
        keys.append(int(index) if index is not None else name)
        position = match.end()
    if text[position:] or not keys:
        raise ValueError(f"cannot parse key path '{text}'")
    return tuple(keys)


def _normal(text: str) -> str:
    """A path string in canonical form, with ``.N`` after a name read as a list index."""
    try:
        keys = parse_path(text)
    except ValueError:
        return text
    return format_path(int(k) if isinstance(k, str) and k.isdigit() else k for k in keys)


@dataclass(frozen=True)
class Location:
    """One value's origin: a YAML file and 1-based line, or the command-line override that set it."""

    file: Optional[str] = None
    line: Optional[int] = None
    override: Optional[str] = None


@dataclass
class ConfigSource:
    """The line map of a loaded config: which file/line (or override) each dotted path came from."""

    file: str = ""
    files: list[str] = dataclasses.field(default_factory=list)  # the config file, then its bases, in load order
    locations: dict[str, Location] = dataclasses.field(default_factory=dict)

    def locate(self, path: str) -> Optional[Location]:
        """The location of ``path`` or, failing that, of its closest enclosing key (a missing key's parent)."""
        keys = parse_path(_normal(path)) if path else ()
        while keys:
            found = self.locations.get(format_path(keys))
            if found is not None:
                return found
            keys = keys[:-1]
        return None

    def attach_lines(self, problems: Iterable[Problem]) -> list[Problem]:
        """Return ``problems`` with file and line filled in from this config's line map, where known."""
        result = []
        for problem in problems:
            if problem.line is not None or problem.file is not None:
                result.append(problem)
                continue
            try:
                location = self.locate(problem.path)
            except ValueError:
                location = None
            if location is None:
                result.append(problem)
            elif location.override is not None:
                result.append(dataclasses.replace(
                    problem, message=f"{problem.message} [set by the override '{location.override}']"))
            else:
                result.append(dataclasses.replace(problem, file=location.file, line=location.line))
        return result

    def prune(self, data: object) -> None:
        """Forget locations of paths that no longer exist in ``data`` (replaced or overridden away)."""
        self.locations = {path: loc for path, loc in self.locations.items() if _exists(data, parse_path(path))}


def _exists(data: object, keys: KeyPath) -> bool:
    for key in keys:
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data):
            data = data[key]
        else:
            return False
    return True
