"""The config language: YAML typing and lines, base: inheritance, !replace, overrides, schema and defaults."""
from __future__ import annotations

from pathlib import Path

import pytest

from dlas.config import apply_overrides, dump_config, load_config, parse_override
from dlas.config.yaml_io import parse_value, read_yaml
from dlas.errors import ConfigError, Problem

TINY = Path(__file__).resolve().parent / "configs" / "good" / "tiny.yml"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems_of(excinfo: pytest.ExceptionInfo) -> dict[str, Problem]:
    return {p.path: p for p in excinfo.value.problems}


# ------------------------------------------------------------------ YAML typing and lines
@pytest.mark.parametrize("text, value", [("2e-4", 2e-4), ("1e-4", 1e-4), ("1e5", 1e5), ("-3E2", -300.0),
                                         ("1.5e-3", 1.5e-3), (".5", 0.5), ("1.", 1.0)])
def test_exponent_numbers_load_as_floats(text, value):
    loaded = parse_value(text)
    assert isinstance(loaded, float) and loaded == value


@pytest.mark.parametrize("text, value", [("100", 100), ("0", 0), ("-7", -7), ("'1e5'", "1e5"), ("1e", "1e"),
                                         ("true", True), ("null", None), ("[/a, /b]", ["/a", "/b"])])
def test_other_scalars_keep_their_yaml_types(text, value):
    loaded = parse_value(text)
    assert loaded == value and type(loaded) is type(value)


def test_every_key_and_list_item_has_its_line(tmp_path):
    file = write(tmp_path, "c.yml", "a:\n  b: 1\n  c:\n    - x\n    - y\n")
    data, locations = read_yaml(file, "c.yml")
    assert data == {"a": {"b": 1, "c": ["x", "y"]}}
    assert {path: loc.line for path, loc in locations.items()} == {"a": 1, "a.b": 2, "a.c": 3, "a.c[0]": 4,
                                                                 "a.c[1]": 5}


def test_yaml_merge_key_may_be_overridden_without_a_duplicate_error(tmp_path):
    file = write(tmp_path, "c.yml", "base_opt: &opt {lr: 1, wd: 0}\nopt: &o {<<: *opt, lr: 2}\nagain: *o\n")
    data, _ = read_yaml(file, "c.yml")
    assert data["opt"] == data["again"] == {"lr": 2, "wd": 0}


def test_duplicate_key_is_an_error_naming_both_lines(tmp_path):
    file = write(tmp_path, "c.yml", "a: 1\nb: 2\na: 3\n")
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(file, "c.yml")
    (problem,) = excinfo.value.problems
    assert (problem.path, problem.line) == ("a", 3) and "first defined on line 1" in problem.message


def test_dump_round_trips_including_strings_that_look_like_floats(tmp_path):
    cfg = load_config(str(TINY), ["+datasets.train.paths=['1e5', /data/x]"])
    text = dump_config(cfg)
    again = load_config(str(write(tmp_path, "dumped.yml", text)))
    assert again == cfg
    assert again["datasets"]["train"]["paths"] == ["1e5", "/data/x"]
    assert again["steps"]["generator"]["optimizer"]["lr"] == pytest.approx(2e-4)


# ------------------------------------------------------------------ base: inheritance
def test_base_is_deep_merged_and_the_file_wins(tmp_path):
    write(tmp_path, "base.yml", "name: b\nseed: 1\nlogger: {print_freq: 5, visual_freq: 7}\n")
    file = write(tmp_path, "top.yml", f"base: [{TINY}, base.yml]\nname: top\nlogger: {{print_freq: 9}}\n")
    cfg = load_config(str(file))
    assert cfg["name"] == "top" and cfg["seed"] == 1
    assert cfg["logger"]["print_freq"] == 9 and cfg["logger"]["visual_freq"] == 7


def test_later_base_wins_over_earlier(tmp_path):
    write(tmp_path, "one.yml", "seed: 1\n")
    write(tmp_path, "two.yml", "seed: 2\n")
    file = write(tmp_path, "top.yml", f"base: [{TINY}, one.yml, two.yml]\n")
    assert load_config(str(file))["seed"] == 2


def test_lists_replace_rather_than_concatenate(tmp_path):
    file = write(tmp_path, "top.yml", f"base: {TINY}\ntrain:\n  lr_scheduler: {{milestones: [7]}}\n")
    assert load_config(str(file))["train"]["lr_scheduler"]["milestones"] == [7]


def test_replace_tag_replaces_a_mapping_instead_of_merging(tmp_path):
    file = write(tmp_path, "top.yml", f"base: {TINY}\nnetworks: !replace\n  generator: {{type: tiny_net}}\n")
    network = load_config(str(file))["networks"]["generator"]
    assert "nf" not in network and "scale" not in network


def test_replace_holds_for_files_that_build_on_the_replacing_one(tmp_path):
    write(tmp_path, "mid.yml", f"base: {TINY}\nnetworks: !replace\n  generator: {{type: tiny_net}}\n")
    file = write(tmp_path, "top.yml", "base: mid.yml\nnetworks:\n  generator: {act: lrelu}\n")
    network = load_config(str(file))["networks"]["generator"]
    assert network["act"] == "lrelu" and "nf" not in network


def test_base_paths_are_relative_to_the_including_file(tmp_path):
    write(tmp_path, "recipes/common/train.yml", "train: {niter: 77}\n")
    write(tmp_path, "recipes/sr/model.yml", f"base: [{TINY}, ../common/train.yml]\n")
    file = write(tmp_path, "runs/mine.yml", "base: ../recipes/sr/model.yml\nname: mine\n")
    cfg = load_config(str(file))
    assert cfg["train"]["niter"] == 77 and cfg["name"] == "mine"


def test_a_problem_in_a_base_value_names_the_base_file_and_line(tmp_path):
    write(tmp_path, "base.yml", f"base: {TINY}\nlogger:\n  print_freq: often\n")
    file = write(tmp_path, "top.yml", "base: base.yml\nseed: 3\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(file))
    problem = problems_of(excinfo)["logger.print_freq"]
    assert problem.file.endswith("base.yml") and problem.line == 3


def test_base_cycle_names_the_chain(tmp_path):
    write(tmp_path, "a.yml", "base: b.yml\n")
    write(tmp_path, "b.yml", "base: a.yml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yml -> .*b\.yml -> .*a\.yml"):
        load_config(str(tmp_path / "a.yml"))


def test_missing_base_file_names_the_including_file(tmp_path):
    file = write(tmp_path, "top.yml", "name: x\nbase: gone.yml\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(file))
    (problem,) = excinfo.value.problems
    assert "'gone.yml' not found" in problem.message and problem.line == 2 and problem.file.endswith("top.yml")


# ------------------------------------------------------------------ overrides
def test_override_values_are_yaml_typed():
    cfg = load_config(str(TINY), ["train.niter=100", "steps.generator.optimizer.lr=1e-4",
                                  "datasets.train.paths=[/a,/b]", "train.lr_scheduler=null"])
    assert cfg["train"]["niter"] == 100
    assert cfg["steps"]["generator"]["optimizer"]["lr"] == 1e-4
    assert cfg["datasets"]["train"]["paths"] == ["/a", "/b"]
    assert cfg["train"]["lr_scheduler"] is None


@pytest.mark.parametrize("key", ["steps.generator.optimizer.betas.0", "steps.generator.optimizer.betas[0]"])
def test_override_addresses_list_items_by_index(key):
    cfg = load_config(str(TINY), [f"{key}=0.5"])
    assert cfg["steps"]["generator"]["optimizer"]["betas"] == [0.5, 0.99]


def test_override_of_a_missing_key_is_an_error_with_did_you_mean():
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(TINY), ["train.nitre=5"])
    (problem,) = excinfo.value.problems
    assert problem.path == "train.nitre"
    assert "did you mean 'niter'?" in problem.message and "+train.nitre=5" in problem.message


def test_plus_override_sets_a_new_key_and_creates_mappings():
    data = {"a": {"b": 1}}
    apply_overrides(data, ["+a.c.d.e=2", "+a.b=3"])
    assert data == {"a": {"b": 3, "c": {"d": {"e": 2}}}}


def test_override_may_set_a_schema_key_that_the_file_leaves_to_its_default():
    cfg = load_config(str(TINY), ["train.mega_batch_factor=4", "train.ema.rate=0.99"])
    assert cfg["train"]["mega_batch_factor"] == 4 and cfg["train"]["ema"]["rate"] == 0.99


def test_override_may_set_a_constructor_option_that_the_file_leaves_to_its_default():
    cfg = load_config(str(TINY), ["networks.generator.act=lrelu"])
    assert cfg["networks"]["generator"]["act"] == "lrelu"


def test_override_list_index_out_of_range_is_an_error():
    with pytest.raises(ConfigError, match="has 2 items; there is no item 5"):
        load_config(str(TINY), ["steps.generator.optimizer.betas.5=0.1"])


def test_every_bad_override_is_reported_at_once():
    with pytest.raises(ConfigError) as excinfo:
        apply_overrides({"a": 1, "b": [1]}, ["c=1", "b.x=2", "no equals sign"])
    assert [p.path for p in excinfo.value.problems] == ["c", "b.x", "no equals sign"]


def test_parse_override_keeps_everything_after_the_first_equals_sign():
    override = parse_override("+datasets.train.filter=a=b")
    assert override.create and override.keys == ("datasets", "train", "filter") and override.value == "a=b"


def test_a_bad_overridden_value_is_blamed_on_the_override():
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(TINY), ["train.niter=ten"])
    problem = problems_of(excinfo)["train.niter"]
    assert problem.line is None and "set by the override 'train.niter=ten'" in problem.message


# ------------------------------------------------------------------ schema, defaults, references
def test_defaults_are_filled_in():
    cfg = load_config(str(TINY))
    assert cfg["seed"] == 0 and cfg["device"] == "auto" and cfg["precision"] == "fp32"
    assert cfg["logger"]["save_checkpoint_freq"] == 5000 and cfg["path"]["root"] == "experiments"
    assert cfg["networks"]["generator"]["ema"] is True and cfg["networks"]["generator"]["frozen"] is False
    assert cfg["steps"]["generator"]["losses"]["pix"]["weight"] == 1.0
    assert cfg["train"]["max_bad_steps"] == 10 and cfg["train"]["ema"] is None


def test_shuffle_defaults_to_true_for_train_only():
    cfg = load_config(str(TINY))
    assert cfg["datasets"]["train"]["shuffle"] is True and cfg["datasets"]["val"]["shuffle"] is False


def test_training_given_as_a_name_becomes_a_list():
    assert load_config(str(TINY))["steps"]["generator"]["training"] == ["generator"]


def test_all_problems_of_a_file_are_reported_together(tmp_path):
    file = write(tmp_path, "c.yml", f"base: {TINY}\nseed: -1\nlogger: {{visuals: lq}}\n"
                                    "networks:\n  generator: {frozen: yes please}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(file))
    assert set(problems_of(excinfo)) == {"seed", "logger.visuals", "networks.generator.frozen"}
    assert [p.line for p in excinfo.value.problems] == [2, 3, 5]


def test_weight_schedule_is_checked_as_a_mapping(tmp_path):
    file = write(tmp_path, "c.yml", f"base: {TINY}\nsteps:\n  generator:\n    losses:\n      pix:\n"
                                    "        weight: {schedule: step, from: 0, to: 1, start: 10, end: 20}\n")
    with pytest.raises(ConfigError, match="takes no 'end'"):
        load_config(str(file))


def test_inference_configs_need_no_train_section(tmp_path):
    file = write(tmp_path, "c.yml", "name: infer\nimports: [config_components]\n"
                                    "networks:\n  generator: {type: tiny_net}\n")
    with pytest.raises(ConfigError, match="train"):
        load_config(str(file))
    assert load_config(str(file), training=False)["networks"]["generator"]["type"] == "tiny_net"


def test_import_argument_is_recorded_in_the_resolved_config(tmp_path):
    file = write(tmp_path, "c.yml", f"base: {TINY}\nimports: []\n")
    assert load_config(str(file), imports=["config_components"])["imports"] == ["config_components"]


def test_attach_lines_locates_later_problems_by_dotted_path():
    cfg = load_config(str(TINY))
    found, missing, unknown = cfg.attach_lines([
        Problem("steps.generator.losses.pix.fake", "state key 'gen' is never written"),
        Problem("steps.generator.losses.pix.absent", "required"),  # a missing key points at its parent
        Problem("nowhere.at.all", "?"),
    ])
    assert (found.line, found.file) == (17, cfg.source.file) and found.file.endswith("tiny.yml")
    assert missing.line == 17
    assert unknown.line is None


def test_missing_config_file_is_a_config_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/config.yml")


def test_override_may_set_pretrained_weights_of_a_defined_network_only():
    cfg = load_config(str(TINY), ["path.pretrain_model_generator=weights/g.safetensors"])
    assert cfg["path"]["pretrain_model_generator"] == "weights/g.safetensors"
    with pytest.raises(ConfigError, match="did you mean 'pretrain_model_generator'"):
        load_config(str(TINY), ["path.pretrain_model_generatr=weights/g.safetensors"])


def test_a_float_where_an_integer_belongs_suggests_the_integer():
    with pytest.raises(ConfigError, match=r"expected integer, got number 400000\.0; write it as the integer 400000"):
        load_config(str(TINY), ["train.niter=4e5"])


def test_a_relative_py_plugin_is_found_next_to_the_config_file(tmp_path):
    write(tmp_path, "plugins/local_nets.py",
          "from dlas.registry import NETWORKS\n\n@NETWORKS.register('config_test_local_net')\n"
          "class LocalNet:\n    '''A network defined next to its config.'''\n"
          "    def __init__(self, width: int = 2):\n        self.width = width\n")
    file = write(tmp_path, "c.yml", f"base: {TINY}\nimports: [config_components, plugins/local_nets.py]\n"
                                    "networks:\n  generator: !replace {type: config_test_local_net, width: 3}\n")
    cfg = load_config(str(file))
    assert cfg["networks"]["generator"]["width"] == 3
    assert cfg["imports"] == ["config_components", "plugins/local_nets.py"]


README_PLUGIN = ("from dlas.registry import NETWORKS\n\n@NETWORKS.register('{name}')\n"
                 "class ReadmeNet:\n    '''A network from a plugin file named without .py.'''\n"
                 "    def __init__(self, nf: int = 32):\n        self.nf = nf\n")


def test_a_plugin_named_without_py_is_found_as_a_file_next_to_the_config(tmp_path, monkeypatch):
    # README: `imports: [my_plugin]` with my_plugin.py beside it; the folder is on no sys.path.
    write(tmp_path, "opts/readme_plugin_a.py", README_PLUGIN.format(name="config_test_readme_a"))
    file = write(tmp_path, "opts/c.yml", f"base: {TINY}\nimports: [config_components, readme_plugin_a]\n"
                                         "networks:\n  generator: !replace {type: config_test_readme_a, nf: 48}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(file))
    assert cfg["networks"]["generator"]["nf"] == 48
    # The file that was imported is recorded, so the run's own config.yml (and dlas-test) find it again.
    assert cfg["imports"] == ["config_components", "opts/readme_plugin_a.py"]


def test_a_plugin_named_without_py_is_found_in_the_working_folder(tmp_path, monkeypatch):
    write(tmp_path, "readme_plugin_b.py", README_PLUGIN.format(name="config_test_readme_b"))
    file = write(tmp_path, "opts/c.yml", f"base: {TINY}\n"
                                         "networks:\n  generator: !replace {type: config_test_readme_b}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(file), imports=["readme_plugin_b"])
    assert cfg["networks"]["generator"]["type"] == "config_test_readme_b"
    assert cfg["imports"] == ["config_components", "readme_plugin_b.py"]


def test_a_plugin_module_that_exists_nowhere_is_one_error(tmp_path):
    file = write(tmp_path, "c.yml", f"base: {TINY}\nimports: [config_components, no_such_plugin_xyz]\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(file))
    (problem,) = excinfo.value.problems
    assert problem.path == "imports[1]" and "no_such_plugin_xyz" in problem.message


def test_resume_state_that_does_not_exist_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(TINY), [f"path.resume_state={tmp_path}/checkpoints/5"])
    message = problems_of(excinfo)["path.resume_state"].message
    assert "does not exist" in message and "checkpoints/STEP" in message


def test_resume_state_naming_a_file_of_the_checkpoint_points_at_its_folder(tmp_path):
    folder = tmp_path / "checkpoints" / "20"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"")
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(TINY), [f"path.resume_state={folder / 'state.pt'}"])
    assert f"give the checkpoint folder '{folder}'" in problems_of(excinfo)["path.resume_state"].message
    assert load_config(str(TINY), [f"path.resume_state={folder}"])["path"]["resume_state"] == str(folder)
    # inference does not resume: it does not look
    assert load_config(str(TINY), [f"path.resume_state={tmp_path}/none"], training=False)


@pytest.mark.parametrize("key, message", [
    ("psnrr/psnr", "no evaluator named 'psnrr' under eval: (did you mean 'psnr'?)"),
    ("psnr", "expected EVALUATOR/METRIC"),
])
def test_keep_best_must_name_an_evaluator(key, message):
    # The trainer keeps a best checkpoint only when the metric appears in the results: a typo silently kept none.
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(TINY), [f"logger.keep_best={key}"])
    assert message in problems_of(excinfo)["logger.keep_best"].message


def test_keep_best_must_name_a_metric_the_evaluator_reports():
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(TINY), ["+eval.sr={type: sr, network: generator, dataset: val}", "logger.keep_best=sr/pnsr"])
    message = problems_of(excinfo)["logger.keep_best"].message
    assert "evaluator 'sr' (sr) reports no metric 'pnsr' (did you mean 'psnr'?)" in message
    assert load_config(str(TINY), ["+eval.sr={type: sr, network: generator, dataset: val}",
                                   "logger.keep_best=sr/psnr"])["logger"]["keep_best"] == "sr/psnr"
    assert load_config(str(TINY), ["logger.keep_best=psnr/psnr"])["logger"]["keep_best"] == "psnr/psnr"


# ------------------------------------------------------------------ numbers are range-checked up front
@pytest.mark.parametrize("override, path, fragment", [
    ("steps.generator.optimizer.lr=-1e-4", "steps.generator.optimizer.lr", "must be > 0 (a learning rate)"),
    ("steps.generator.optimizer.lr=0", "steps.generator.optimizer.lr", "must be > 0"),
    ("steps.generator.optimizer.lr=.nan", "steps.generator.optimizer.lr", "must be a number, got NaN"),
    ("steps.generator.optimizer.lr=.inf", "steps.generator.optimizer.lr", "must be a finite number, got inf"),
    ("steps.generator.optimizer.betas=[0.9, 1.0]", "steps.generator.optimizer.betas", "must be >= 0 and < 1"),
    ("steps.generator.optimizer.weight_decay=-0.1", "steps.generator.optimizer.weight_decay", "must be >= 0"),
    ("seed=1180591620717411303424", "seed", "must fit in 64 bits"),
    ("datasets.train.batch_size=1000000000", "datasets.train.batch_size", "must be at most 1048576"),
    ("datasets.train.num_workers=100000", "datasets.train.num_workers", "must be at most 256"),
    ("steps.generator.losses.pix.weight=.nan", "steps.generator.losses.pix.weight", "got NaN"),
    ("steps.generator.losses.pix.weight={schedule: linear, from: 0, to: .inf, start: 0, end: 10}",
     "steps.generator.losses.pix.weight.to", "must be a finite number"),
    ("+steps.generator.grad_clip=.inf", "steps.generator.grad_clip", "must be a finite number"),
    ("+train.dist_timeout=0", "train.dist_timeout", "must be greater than 0"),
    ("+train.ema={rate: .nan}", "train.ema.rate", "got NaN"),
    ("networks.generator.nf=99999999999999999999", "networks.generator.nf", "must fit in 64 bits"),
    ("train.lr_scheduler.gamma=-.inf", "train.lr_scheduler.gamma", "must be a finite number, got -inf"),
])
def test_a_number_that_would_fail_later_is_an_error_up_front(override, path, fragment):
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(TINY), [override])
    problems = problems_of(excinfo)
    assert path in problems and fragment in problems[path].message, problems


def test_an_infinite_value_is_accepted_where_the_component_defaults_to_infinity():
    import math

    from dlas.registry import LOSSES

    @LOSSES.register("test_config_clamped_pix")
    def clamped_pix(fake: str = "gen", real: str = "hq", max_error: float = math.inf, scale: float = 1.0):
        """A loss whose error cap is off (infinite) by default."""

    load_config(str(TINY), ["steps.generator.losses.pix.type=test_config_clamped_pix",
                            "+steps.generator.losses.pix.max_error=.inf"])
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(TINY), ["steps.generator.losses.pix.type=test_config_clamped_pix",
                                "+steps.generator.losses.pix.scale=.inf"])
    assert "must be a finite number" in problems_of(excinfo)["steps.generator.losses.pix.scale"].message


# ------------------------------------------------------------------ YAML read as untrusted input
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    import time

    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(9)]
    file = write(tmp_path, "bomb.yml", "\n".join(lines) + "\n")  # 10**10 values in 500 bytes
    start = time.monotonic()
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(file, "bomb.yml")
    assert time.monotonic() - start < 2
    (problem,) = excinfo.value.problems
    assert "expands to more than 100000 values through its aliases" in str(problem)


def test_an_alias_inside_what_it_names_is_refused(tmp_path):
    file = write(tmp_path, "loop.yml", "a: &a {b: *a}\n")
    with pytest.raises(ConfigError, match="refers to a mapping or list that contains it"):
        read_yaml(file, "loop.yml")


def test_yaml_nested_thousands_of_levels_deep_is_one_error(tmp_path):
    file = write(tmp_path, "deep.yml", "a: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        read_yaml(file, "deep.yml")
