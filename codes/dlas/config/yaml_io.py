"""Reading and writing config YAML: safe loading with line numbers, YAML 1.2 floats, the ``!replace`` tag.

Files are read as untrusted input: safe YAML only (no Python objects), at most :data:`MAX_BYTES` bytes, at most
:data:`MAX_VALUES` values once aliases are expanded, and at most 100 levels deep; each limit is one error line.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from dlas.config.source import Key, KeyPath, Location, format_path
from dlas.errors import ConfigError, Problem

REPLACE_TAG = "!replace"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MAX_DEPTH = 100
# Aliases let a few hundred bytes stand for billions of values ("billion laughs"): a file may expand to at most
# this many values (mappings, lists, keys and scalars, each alias counted as often as it is used). Real configs
# stay below a few thousand.
MAX_VALUES = 100_000
MAX_BYTES = 16 * 2**20

# PyYAML implements YAML 1.1, whose floats need a dot and a signed exponent: `2e-4` and `1e5` would load as
# strings and reach an optimizer as "2e-4". This is the YAML 1.2 float syntax (dot or exponent, sign optional).
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def _with_yaml12_floats(resolvers: dict[Any, list]) -> dict[Any, list]:
    # Drop the 1.1 float resolver; the new one is appended last, so the int resolver still claims "100".
    return {first: [r for r in rules if r[0] != _FLOAT_TAG] for first, rules in resolvers.items()}


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats."""


class ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes any string the loader would read as a float (such as ``"1e5"``)."""


for _cls in (ConfigLoader, ConfigDumper):
    _cls.yaml_implicit_resolvers = _with_yaml12_floats(yaml.SafeLoader.yaml_implicit_resolvers)
    _cls.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    # Short lists of scalars (betas, milestones, visuals) read best on one line, as people write them.
    flow = len(data) <= 8 and all(isinstance(item, (int, float, str, bool, type(None))) for item in data)
    return dumper.represent_sequence(_SEQ_TAG, data, flow_style=flow)


ConfigDumper.add_representer(list, _represent_list)
ConfigDumper.add_representer(tuple, _represent_list)


class Replace(dict):
    """A mapping tagged ``!replace``: it replaces what earlier files had at its key instead of merging into it."""


def parse_value(text: str) -> Any:
    """Parse one YAML value the way the loader would (``1e-4`` -> float, ``[a, b]`` -> list, ``null`` -> None)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (ConfigLoader is a SafeLoader)


def dump_yaml(data: Any) -> str:
    """YAML text of plain nested dicts/lists, keys in insertion order."""
    return yaml.dump(_plain(data), Dumper=ConfigDumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=120)


def _plain(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _plain(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(item) for item in data]
    return data


def read_yaml(file: Path, display: str) -> tuple[Any, dict[str, Location]]:
    """Load one YAML file; return its data and the location of every mapping key and list item.

    ``display`` is the file name used in messages. YAML errors raise :class:`ConfigError` with the line.
    """
    try:
        if file.stat().st_size > MAX_BYTES:
            raise ConfigError(f"cannot read '{display}': {file.stat().st_size} bytes, more than a config file "
                              f"holds (at most {MAX_BYTES})", display)
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read '{display}': not UTF-8 text ({exc.reason})", display) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read '{display}': {exc.strerror}", display) from exc
    loader = ConfigLoader(text)
    builder = _Builder(loader, display)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, display)
        data = None if node is None else builder.build(node, ())
    except RecursionError:
        raise ConfigError(f"nested too deeply to be a config (more than {_MAX_DEPTH} levels)", display) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = "; ".join(part for part in (exc.context, exc.problem) if part)
        if exc.context_mark and exc.problem_mark and exc.context_mark.line != exc.problem_mark.line:
            message += f" (the construct began on line {exc.context_mark.line + 1})"
        raise ConfigError([Problem(display, f"invalid YAML: {message}",
                                   line=mark.line + 1 if mark else None)]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", display) from exc
    finally:
        loader.dispose()
    if builder.problems:
        raise ConfigError(builder.problems)
    return data, builder.locations


def _check_expansion(root: yaml.Node, display: str) -> None:
    """A ConfigError when the node graph expands (through its aliases) to more than :data:`MAX_VALUES` values.

    Each distinct node is counted once, with its expanded size memoised, so the check itself is linear in the
    file's size however large the expansion would be.
    """
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        known = sizes.get(id(node))
        if known is not None:
            if known < 0:
                raise ConfigError([Problem(display, "an alias refers to a mapping or list that contains it, which "
                                                    "would nest forever", line=node.start_mark.line + 1)])
            return known
        if depth > _MAX_DEPTH:  # the builder reports it with the key path
            return 1
        sizes[id(node)] = -1  # being counted
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(item, depth + 1) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(key, depth + 1) + size(value, depth + 1) for key, value in node.value)
        if total > MAX_VALUES:
            raise ConfigError([Problem(display, f"expands to more than {MAX_VALUES} values through its aliases "
                                                "(anchors used inside anchors); a config never needs that many",
                                       line=node.start_mark.line + 1)])
        sizes[id(node)] = total
        return total

    size(root, 0)


class _Builder:
    """Builds plain Python data from a composed YAML node tree, recording each key's line on the way.

    PyYAML's constructor forgets where values came from, so mappings and sequences are walked here;
    scalars (and exotic tags) are still converted by the loader itself.
    """

    def __init__(self, loader: ConfigLoader, display: str):
        self.loader = loader
        self.display = display
        self.locations: dict[str, Location] = {}
        self.problems: list[Problem] = []
        self._own_keys: dict[int, set[int]] = {}

    def _here(self, node: yaml.Node) -> Location:
        return Location(self.display, node.start_mark.line + 1)

    def _problem(self, path: KeyPath, node: yaml.Node, message: str) -> None:
        line = node.start_mark.line + 1
        if path:
            self.problems.append(Problem(format_path(path), message, line, self.display))
        else:  # the path is the file itself: "file (line N): …"
            self.problems.append(Problem(self.display, message, line))

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        if len(path) > _MAX_DEPTH:
            self._problem(path, node, f"nested more than {_MAX_DEPTH} levels deep (a recursive YAML alias?)")
            return None
        if isinstance(node, yaml.MappingNode) and node.tag in (_MAP_TAG, REPLACE_TAG):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ_TAG:
            return [self._child(item, path + (i,), item) for i, item in enumerate(node.value)]
        if node.tag == REPLACE_TAG:
            self._problem(path, node, "!replace only applies to mappings (lists and values always replace)")
            return None
        return self.loader.construct_object(node, deep=True)

    def _child(self, node: yaml.Node, path: KeyPath, where: yaml.Node) -> Any:
        self.locations[format_path(path)] = self._here(where)
        return self.build(node, path)

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict:
        # An aliased mapping is visited once per alias, but flattened only on the first visit: remember which
        # keys were written in it rather than merged in.
        own_keys = self._own_keys.setdefault(id(node), {id(key_node) for key_node, _ in node.value})
        self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys, putting merged keys first
        result: dict = Replace() if node.tag == REPLACE_TAG else {}
        first_line: dict[Key, int] = {}
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                self._problem(path, key_node, f"a key must be a name, got {key!r}; quote it if it is meant as text")
                continue
            line = key_node.start_mark.line + 1
            if key in first_line and id(key_node) in own_keys and first_line[key] > 0:
                self._problem(path + (key,), key_node, f"duplicate key (first defined on line {first_line[key]}); "
                                                      "remove one of them")
                continue
            # A key written here overrides one merged in by `<<:`; only two written keys are a duplicate.
            first_line[key] = line if id(key_node) in own_keys else 0
            result[key] = self._child(value_node, path + (key,), key_node)
        return result
