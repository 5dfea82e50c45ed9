"""Command-line overrides: ``key.path=value`` (the key must exist) and ``+key.path=value`` (set it regardless).

The value is parsed as YAML (``1e-4`` is a number, ``[/a, /b]`` a list, ``null`` None). List items are addressed
as ``.N`` or ``[N]``: ``steps.g.optimizer.betas.0=0.5`` and ``steps.g.optimizer.betas[0]=0.5`` are the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import yaml

from dlas.config.source import ConfigSource, Key, KeyPath, Location, format_path, parse_path
from dlas.config.yaml_io import parse_value
from dlas.errors import ConfigError, Problem, did_you_mean

# A problem in an override belongs to the command line, not to a file line.
COMMAND_LINE = "command line"

KnownKeys = Callable[[KeyPath, dict, dict], Iterable[str]]


@dataclass(frozen=True)
class Override:
    """One parsed ``[+]key.path=value`` argument."""

    text: str
    keys: KeyPath
    value: Any
    create: bool


def parse_override(text: str) -> Override:
    """Parse ``[+]key.path=value``; raise :class:`ConfigError` if it is not of that form."""
    create = text.startswith("+")
    key_text, sep, value_text = text[1 if create else 0:].partition("=")
    if not sep or not key_text.strip():
        raise ConfigError([_problem(text, text, "an override is written key.path=value (or +key.path=value "
                                                "to add a key), e.g. train.niter=100")])
    try:
        keys = parse_path(key_text.strip())
    except ValueError:
        raise ConfigError([_problem(text, key_text, "cannot read the key path; write names separated by dots, "
                                                    "list items as .N or [N]")]) from None
    try:
        value = parse_value(value_text)
    except yaml.YAMLError as exc:
        detail = str(getattr(exc, "problem", "") or exc).strip()
        raise ConfigError([_problem(text, key_text, f"the value is not valid YAML ({detail}); "
                                                    "quote it for a plain string")]) from None
    return Override(text, keys, value, create)


def apply_overrides(data: dict, overrides: Iterable[str], source: Optional[ConfigSource] = None,
                    known_keys: Optional[KnownKeys] = None) -> dict:
    """Apply ``overrides`` to ``data`` in place (and return it); report every bad one at once.

    ``known_keys(parent_path, parent, data)`` lists keys that may be set although absent from the file (schema
    defaults, constructor options); ``source``, when given, records that the overridden paths came from here.
    """
    problems: list[Problem] = []
    for text in overrides:
        try:
            override = parse_override(text)
            path = _apply(data, override, known_keys)
        except ConfigError as exc:
            problems += exc.problems
            continue
        if source is not None:
            prefix = format_path(path)
            source.locations = {p: loc for p, loc in source.locations.items()
                                if p != prefix and not p.startswith((prefix + ".", prefix + "["))}
            source.locations[prefix] = Location(override=text)
    if problems:
        raise ConfigError(problems)
    return data


def _apply(data: dict, override: Override, known_keys: Optional[KnownKeys]) -> KeyPath:
    """Set the override's value; return its path with list indices as ints."""
    node: Any = data
    done: tuple[Key, ...] = ()
    for depth, key in enumerate(override.keys):
        last = depth == len(override.keys) - 1
        where = format_path(done) or "the top level"
        if isinstance(node, list):
            index = _index(key)
            if index is None:
                raise ConfigError([_problem(override.text, format_path(done + (key,)),
                                            f"{where} is a list; address its items by number (.0 or [0])")])
            if index == len(node) and override.create and last:
                node.append(override.value)
            elif not -len(node) <= index < len(node):
                raise ConfigError([_problem(override.text, format_path(done + (index,)),
                                            f"{where} has {len(node)} items; there is no item {index}")])
            elif last:
                node[index] = override.value
            done += (index,)
            node = node[index] if not last else None
            continue
        if not isinstance(node, dict):
            raise ConfigError([_problem(override.text, format_path(done + (key,)),
                                        f"{where} is {_kind(node)}, not a mapping, so it has no key '{key}'")])
        if isinstance(key, int) and key not in node and str(key) in node:
            key = str(key)
        if key not in node:
            known = list(known_keys(done, node, data)) if known_keys else []
            if not override.create and key not in known:
                hint = did_you_mean(str(key), [str(k) for k in node] + known)
                raise ConfigError([_problem(override.text, format_path(done + (key,)),
                                            f"no key '{key}' in {where}{hint}; write +{override.text} to add it")])
            if not last:
                node[key] = {}
        elif not last and node[key] is None and override.create:
            node[key] = {}  # `+train.ema.rate=0.999` where the file says `ema: null`
        done += (key,)
        if last:
            node[key] = override.value
        else:
            node = node[key]
    return done


def _index(key: Key) -> Optional[int]:
    if isinstance(key, int):
        return key
    text = str(key)
    return int(text) if text.lstrip("-").isdigit() else None


def _kind(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _problem(text: str, path: Any, message: str) -> Problem:
    return Problem(str(path), f"{message} (override '{text}')", file=COMMAND_LINE)
