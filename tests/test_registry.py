"""The component registry: registration, lazy built-ins, signature checks, describe, plugins, the built-in table."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import pytest

from dlas import builtins
from dlas.errors import ConfigError
from dlas.registry import NETWORKS, Registry, import_plugins

ROOT = Path(__file__).resolve().parents[1]
CODES = ROOT / "codes"


def make_upsampler():
    registry = Registry("network")

    @registry.register("upsampler")
    class Upsampler:
        """Upsamples by ``scale`` with ``nf`` features."""

        def __init__(self, scale: int, nf: int = 64, mode: Literal["nearest", "bilinear"] = "nearest",
                     limit: Optional[int] = None, sizes: list[int] = (), betas: tuple[float, float] = (0.9, 0.99),
                     in_: str = "lq", params: object = None):
            self.kwargs = dict(scale=scale, nf=nf, mode=mode, limit=limit, sizes=sizes, betas=betas, input=in_,
                               params=params)

    return registry, Upsampler


def messages(problems) -> dict[str, str]:
    return {p.path: p.message for p in problems}


# ------------------------------------------------------------------ registration and lookup
def test_registered_component_is_found_by_name():
    registry, cls = make_upsampler()
    assert registry.get("upsampler") is cls and registry.names() == ["upsampler"] and "upsampler" in registry


def test_registering_a_different_component_under_a_taken_name_is_an_error():
    registry, _ = make_upsampler()
    with pytest.raises(ValueError, match="already registered"):
        registry.register("upsampler")(type("Other", (), {}))


def test_override_true_replaces_a_registration():
    registry, _ = make_upsampler()
    other = registry.register("upsampler", override=True)(type("Other", (), {}))
    assert registry.get("upsampler") is other


def test_unknown_name_is_a_config_error_with_did_you_mean():
    registry, _ = make_upsampler()
    with pytest.raises(ConfigError, match=r"unknown network type 'upsampeler' \(did you mean 'upsampler'\?\)"):
        registry.get("upsampeler")


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(CODES))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_importing_dlas_does_not_import_torch():
    result = run_python("import sys, dlas, dlas.registry, dlas.config; assert 'torch' not in sys.modules")
    assert result.returncode == 0, result.stderr


def test_a_built_in_module_is_imported_on_first_get_only():
    name, module = next(iter(builtins.NETWORKS.items()))
    result = run_python(
        "import sys; from dlas.registry import NETWORKS\n"
        f"assert {name!r} in NETWORKS.names() and {module!r} not in sys.modules\n"
        f"NETWORKS.get({name!r}); assert {module!r} in sys.modules")
    assert result.returncode == 0, result.stderr


def test_a_built_in_whose_module_is_missing_is_a_config_error_naming_the_module():
    registry = Registry("network", {"ghost": "dlas.models.no_such_module"})
    with pytest.raises(ConfigError, match=r"network 'ghost' needs a package that failed to import.*no_such_module"):
        registry.get("ghost")


# ------------------------------------------------------------------ signature validation
def test_valid_config_has_no_problems_and_builds():
    registry, _ = make_upsampler()
    built = registry.build({"type": "upsampler", "scale": 2, "in": "hq", "sizes": [1, 2]}, "networks.g",
                           params=["p"])
    assert built.kwargs["scale"] == 2 and built.kwargs["input"] == "hq" and built.kwargs["params"] == ["p"]


def test_unknown_key_gets_did_you_mean():
    registry, _ = make_upsampler()
    found = messages(registry.check({"type": "upsampler", "scale": 2, "nff": 8}, "networks.g"))
    assert found["networks.g.nff"].startswith("unknown option (did you mean 'nf'?)")


def test_missing_required_key_is_reported():
    registry, _ = make_upsampler()
    assert messages(registry.check({"type": "upsampler"}, "networks.g")) == {
        "networks.g.scale": "required option is missing"}


@pytest.mark.parametrize("key, value, fragment", [
    ("nf", "64", "expected integer, got string '64'"),
    ("nf", True, "expected integer, got boolean True"),
    ("mode", "bicubic", "must be one of 'nearest', 'bilinear', got 'bicubic'"),
    ("limit", "none", "expected integer or null, got string 'none'"),
    ("sizes", [1, "2"], "item 1: expected integer, got string '2'"),
    ("sizes", 3, "expected list of integer, got integer 3"),
    ("betas", [0.9], "expected a list of 2 values, got 1"),
])
def test_wrong_types_are_reported_against_the_hints(key, value, fragment):
    registry, _ = make_upsampler()
    found = messages(registry.check({"type": "upsampler", "scale": 2, key: value}, "networks.g"))
    assert fragment in found[f"networks.g.{key}"]


def test_optional_accepts_null_and_float_accepts_int():
    registry = Registry("loss")
    registry.register("scaled")(_scaled)
    assert registry.check({"type": "scaled", "factor": 2, "limit": None}, "l") == []


def _scaled(factor: float, limit: Optional[int] = 3) -> float:
    return factor


def test_provided_and_reserved_keys_are_not_config_options():
    registry, _ = make_upsampler()
    problems = messages(registry.check({"type": "upsampler", "scale": 2, "params": 1, "weight": 3}, "x",
                                       reserved=["weight"], provided=["params"]))
    assert list(problems) == ["x.params"] and problems["x.params"].startswith("unknown option")


def test_describe_lists_options_with_types_and_defaults():
    registry, _ = make_upsampler()
    text = registry.describe("upsampler")
    assert "Upsamples by ``scale`` with ``nf`` features." in text
    assert "scale: integer (required)" in text and "nf: integer = 64" in text and "in: string = 'lq'" in text


# ------------------------------------------------------------------ plugins
def test_a_plugin_file_registers_its_components(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text("from dlas.registry import NETWORKS\n\n"
                      "@NETWORKS.register('registry_test_plugin_net')\n"
                      "class PluginNet:\n    '''A plugin network.'''\n    def __init__(self, depth: int = 3):\n"
                      "        self.depth = depth\n")
    import_plugins([str(plugin)])
    assert NETWORKS.build({"type": "registry_test_plugin_net", "depth": 5}).depth == 5


def test_a_missing_plugin_module_is_a_config_error_naming_its_index():
    with pytest.raises(ConfigError) as excinfo:
        import_plugins(["config_components", "no_such_plugin_xyz"])
    (problem,) = excinfo.value.problems
    assert problem.path == "imports[1]" and "no such module" in problem.message


# ------------------------------------------------------------------ the built-in table matches the source
DECORATOR = re.compile(r"^@(\w+)\.register\(\s*[\"'](\w+)[\"']", re.M)  # top-level decorators only


def decorators_in_source() -> dict[tuple[str, str], str]:
    """{(REGISTRY_VARIABLE, name): module} for every top-level ``@X.register("name")`` under codes/dlas."""
    found = {}
    for file in sorted((CODES / "dlas").rglob("*.py")):
        module = ".".join(file.relative_to(CODES).with_suffix("").parts)
        for variable, name in DECORATOR.findall(file.read_text(encoding="utf-8")):
            found[(variable, name)] = module
    return found


TABLES = ("NETWORKS", "INJECTORS", "LOSSES", "DATASETS", "EVALUATORS", "OPTIMIZERS", "SCHEDULERS", "DEGRADATIONS",
          "TASKS")


def test_every_built_in_table_entry_points_at_a_module_that_registers_it():
    decorators = decorators_in_source()
    wrong = [f"builtins.{variable}[{name!r}] = {module!r}, but that module has no @{variable}.register({name!r})"
             for variable in TABLES for name, module in getattr(builtins, variable).items()
             if decorators.get((variable, name)) != module]
    assert not wrong, "\n".join(wrong)


def test_every_register_decorator_has_a_built_in_table_entry():
    missing = [f"{module}: @{variable}.register({name!r}) is not in dlas/builtins.py {variable}"
               for (variable, name), module in decorators_in_source().items()
               if getattr(builtins, variable, {}).get(name) != module]
    assert not missing, "\n".join(missing)


def test_a_constructors_own_config_error_is_reported_under_the_components_path():
    registry = Registry("loss")

    @registry.register("picky")
    def picky(mode: str = "a"):
        """Rejects every mode but 'a'."""
        if mode != "a":
            raise ConfigError("only 'a' is supported", "mode")

    with pytest.raises(ConfigError) as info:
        registry.build({"type": "picky", "mode": "b"}, "steps.gen.losses.p")
    assert info.value.problems[0].path == "steps.gen.losses.p.mode"
    with pytest.raises(ConfigError) as info:  # no path given: the constructor's own path stands
        registry.build({"type": "picky", "mode": "b"})
    assert info.value.problems[0].path == "mode"


def test_describe_leaves_out_arguments_the_framework_provides():
    from dlas.registry import OPTIMIZERS

    text = OPTIMIZERS.describe("adam")
    assert "params" not in text.split("options:")[1] and "lr: number" in text
