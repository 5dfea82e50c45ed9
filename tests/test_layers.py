"""The package's layers: a module imports only from its own layer or below (docs/architecture.md).

Networks, injectors, losses, datasets and metrics never reach up into the trainer, the evaluators, the inference
tasks or the CLI; the build module sits between the components and everything that runs them. Imports inside
functions count too: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "codes" / "dlas"

LAYERS = [
    {"errors", "registry", "builtins", "context", "weights", "checkpoint", "__init__"},
    {"config"},
    {"models", "data", "metrics", "injectors", "losses", "logging"},
    {"build"},
    {"trainer", "evaluators", "inference"},
    {"cli"},
]
# Kept so that plugins written against them keep working; each only re-exports what lives below.
COMPATIBILITY_ALIASES = {"trainer/context.py"}


def layer_of(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def top_part(relative: Path) -> str:
    return relative.parts[0].removesuffix(".py")


def imported_dlas_parts(file: Path) -> list[tuple[int, str]]:
    """``(line, first part after dlas.)`` of every import of a dlas module in ``file``."""
    found = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "dlas" else [])
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "dlas" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
    unknown = {top_part(p.relative_to(PACKAGE)) for p in modules()} - set().union(*LAYERS)
    assert not unknown, f"add {sorted(unknown)} to a layer in tests/test_layers.py and docs/architecture.md"


@pytest.mark.parametrize("file", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_its_own_layer_or_below(file):
    relative = file.relative_to(PACKAGE)
    if str(relative) in COMPATIBILITY_ALIASES:
        return
    own = layer_of(top_part(relative))
    upward = [f"line {line}: dlas.{part}" for line, part in imported_dlas_parts(file)
              if part in set().union(*LAYERS) and layer_of(part) > own]
    assert not upward, f"{relative} (layer {own}) imports from above: {', '.join(upward)}"
