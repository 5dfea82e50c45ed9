"""Errors a user can cause, as opposed to bugs.

Anything raised as a :class:`UserError` is shown to the user as one line per problem (no traceback)
and the command exits with code 2. Programming errors raise ordinary exceptions and exit with code 1.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, a path or a file: where it is and what to do about it."""

    path: str  # dotted config path ("steps.gen.losses.pix.weight") or a file name
    message: str
    line: Optional[int] = None  # 1-based YAML line, when known
    file: Optional[str] = None

    def __str__(self) -> str:
        where = self.path or "<config>"
        if self.file and self.line:
            where = f"{where} ({self.file}:{self.line})"
        elif self.line:
            where = f"{where} (line {self.line})"
        return f"{where}: {self.message}"


class UserError(Exception):
    """Base class of errors caused by the user's config, arguments or data (exit code 2)."""

    def __init__(self, problems: Iterable[Problem] | str, path: str = ""):
        if isinstance(problems, str):
            problems = [Problem(path, problems)]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigError(UserError):
    """The config (file, overrides or command line) is wrong."""


class DataError(UserError):
    """A dataset path, image or weight file is missing, unreadable or of the wrong shape."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidate, or ``""`` if none is close."""
    match = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
