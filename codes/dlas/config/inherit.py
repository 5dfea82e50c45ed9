"""``base:`` inheritance: load a config file and the files it names, deep-merged (later wins, the file itself last)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dlas.config.source import Location
from dlas.config.yaml_io import Replace, read_yaml
from dlas.errors import ConfigError, Problem


def display_name(file: Path) -> str:
    """The name a file is shown under in messages: relative to the working folder when it is below it."""
    try:
        relative = os.path.relpath(file)
    except ValueError:  # another drive on Windows
        return str(file)
    return str(file) if relative.startswith("..") else relative


def load_with_bases(file: Path) -> tuple[dict, dict[str, Location], list[str]]:
    """Load ``file`` and, recursively, its ``base:`` files; return (merged data, locations, files in load order).

    ``!replace`` markers are kept in the result so that a caller merging further still honours them;
    :func:`strip_replace` removes them at the end.
    """
    files: list[str] = []
    data, locations = _load(Path(file).resolve(), (), files)
    return data, locations, files


def _load(file: Path, chain: tuple[Path, ...], files: list[str]) -> tuple[dict, dict[str, Location]]:
    display = display_name(file)
    files.append(display)
    data, locations = read_yaml(file, display)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config file must be a mapping of sections (name:, networks:, …), "
                          f"got a {type(data).__name__}", display)
    bases = data.pop("base", None)
    base_location = locations.pop("base", Location(display, None))
    locations = {path: loc for path, loc in locations.items() if not path.startswith(("base.", "base["))}
    if bases is None:
        return data, locations
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError([Problem("base", "expected a file name or a list of file names",
                                   base_location.line, base_location.file)])

    merged: dict = {}
    merged_locations: dict[str, Location] = {}
    chain = chain + (file,)
    for name in bases:
        base_file = (file.parent / name).resolve()
        trail = " -> ".join(display_name(f) for f in chain + (base_file,))
        if base_file in chain:
            raise ConfigError([Problem("base", f"base files include each other in a cycle: {trail}",
                                       base_location.line, base_location.file)])
        if not base_file.is_file():
            raise ConfigError([Problem("base", f"base file '{name}' not found (looked for {trail}); "
                                       "base paths are relative to the file that names them",
                                       base_location.line, base_location.file)])
        base_data, base_locations = _load(base_file, chain, files)
        merged = deep_merge(merged, base_data)
        merged_locations.update(base_locations)
    merged = deep_merge(merged, data)
    merged_locations.update(locations)
    return merged, merged_locations


def deep_merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base``: mappings merge key by key, anything else (lists too) is replaced.

    A mapping marked :class:`Replace` (written ``!replace``) replaces instead of merging, and the merged result
    keeps the marker so that files which build on this one merge into the replacement, not the original.
    """
    if not isinstance(base, dict) or not isinstance(over, dict) or isinstance(over, Replace):
        return over
    result = type(base)(base)
    for key, value in over.items():
        result[key] = deep_merge(base[key], value) if key in base else value
    return result


def strip_replace(data: Any) -> Any:
    """``data`` with every :class:`Replace` marker turned back into a plain ``dict``."""
    if isinstance(data, dict):
        return {key: strip_replace(value) for key, value in data.items()}
    if isinstance(data, list):
        return [strip_replace(item) for item in data]
    return data

