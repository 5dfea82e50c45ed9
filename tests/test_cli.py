"""dlas-train's command line: exit codes, --print-config, --list, --describe, the run folder and the log."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlas.cli.train import _prepare_run_dir, describe_component, list_components, main
from dlas.logging.console import setup_logging
from dlas.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/configs/good/tiny.yml"


def run_train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "plugins"), str(ROOT / "codes")]))
    return subprocess.run([sys.executable, "codes/train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_print_config_prints_the_resolved_config_with_overrides():
    result = run_train("-opt", TINY, "--print-config", "train.niter=7", "steps.generator.optimizer.lr=1e-5")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["train"]["niter"] == 7 and cfg["steps"]["generator"]["optimizer"]["lr"] == 1e-5
    assert cfg["logger"]["keep_checkpoints"] == 5  # a default, filled in


def test_overrides_may_come_before_the_flags():
    result = run_train("-opt", TINY, "train.niter=3", "--print-config")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["train"]["niter"] == 3


def test_loading_a_config_does_not_import_torch():
    code = ("import sys; from dlas.cli.train import main; rc = main(['-opt', '%s', '--print-config']); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)" % TINY)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "plugins"), str(ROOT / "codes")]))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_bad_override_exits_2_with_did_you_mean():
    result = run_train("-opt", TINY, "--print-config", "train.nitre=7")
    assert result.returncode == 2
    assert "error: train.nitre: no key 'nitre' in train (did you mean 'niter'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2():
    result = run_train("-opt", "tests/configs/none.yml", "--validate")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: tests/configs/none.yml: config file 'tests/configs/none.yml' does not exist"


def test_no_config_and_no_command_exits_2(capsys):
    assert main([]) == 2
    assert "give a config file: -opt FILE.yml" in capsys.readouterr().err


def test_unknown_flag_exits_2(capsys):
    assert main(["-opt", TINY, "--frsh"]) == 2
    assert "error: arguments: unrecognized arguments: --frsh" in capsys.readouterr().err


def test_list_shows_one_kind_with_first_docstring_lines(capsys):
    assert main(["--import", "config_components", "--list", "optimizer"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  tiny_adam +Adam stand-in; ``params`` is provided by the framework\.$", out, re.M)
    assert "tiny_net" not in out


def test_list_accepts_plural_kinds(capsys):
    assert main(["--import", "config_components", "--list", "losses"]) == 0
    assert "tiny_pix" in capsys.readouterr().out


def test_degradations_and_tasks_are_listed_and_described_like_every_component(capsys):
    assert main(["--list", "degradation"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("degradations:") and "  blur " in listed and "  jpeg " in listed
    assert main(["--list", "task"]) == 0
    assert "  upscale " in capsys.readouterr().out
    assert main(["--describe", "blur"]) == 0
    described = capsys.readouterr().out
    assert "degradation 'blur'" in described and "sigma:" in described and "path" not in described.split("options:")[1]


def test_list_unknown_kind_exits_2_with_did_you_mean(capsys):
    assert main(["--list", "netwrok"]) == 2
    assert "unknown component kind 'netwrok' (did you mean 'network'?)" in capsys.readouterr().err


def test_list_reports_a_component_whose_module_fails_to_import():
    registry = Registry("network", {"ghost_net": "dlas.models.no_such_module"})
    listing = list_components("network", {"network": registry})
    assert re.search(r"ghost_net +UNAVAILABLE: .*No module named 'dlas\.models\.no_such_module'", listing)


def test_describe_prints_options_and_docstring(capsys):
    assert main(["--import", "config_components", "--describe", "tiny_net"]) == 0
    out = capsys.readouterr().out
    assert "A stand-in upsampling network" in out
    assert "nf: integer = 4" in out and "act: 'relu' | 'lrelu' = 'relu'" in out
    # the keys the trainer handles on every network entry are part of what a network accepts
    framework = out.split("framework keys (any network entry")[1]
    for key in ("channels_last: boolean or 'auto' = False", "checkpointing:", "compile:", "frozen:",
                "ema: boolean = True"):
        assert key in framework


def test_describe_a_loss_lists_its_weight_and_gates(capsys):
    assert main(["--describe", "pix"]) == 0
    framework = capsys.readouterr().out.split("framework keys (any loss entry")[1]
    assert "weight: number or WeightSchedule = 1.0" in framework and "after: integer or null = None" in framework


def test_describe_an_ambiguous_name_prints_each_component():
    text = describe_component("tiny_shared")
    assert "injector 'tiny_shared'" in text and "loss 'tiny_shared'" in text


def test_describe_unknown_name_exits_2_with_did_you_mean(capsys):
    assert main(["--import", "config_components", "--describe", "tiny_nte"]) == 2
    assert "no component named 'tiny_nte' (did you mean 'tiny_net'?)" in capsys.readouterr().err


def test_run_folder_gets_the_resolved_config(tmp_path):
    run_dir = tmp_path / "experiments" / "tiny"
    _prepare_run_dir(run_dir, "name: tiny\n", fresh=False)
    assert (run_dir / "config.yml").read_text() == "name: tiny\n"


def test_fresh_renames_the_old_run_folder_and_never_deletes_it(tmp_path):
    run_dir = tmp_path / "tiny"
    (run_dir / "checkpoints" / "100").mkdir(parents=True)
    _prepare_run_dir(run_dir, "name: tiny\n", fresh=True)
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("tiny.old-")]
    assert re.fullmatch(r"tiny\.old-\d{8}-\d{6}", old.name)
    assert (old / "checkpoints" / "100").is_dir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yml"]


def test_resuming_with_a_changed_config_keeps_the_previous_one(tmp_path):
    _prepare_run_dir(tmp_path, "train: {niter: 10}\n", fresh=False)
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)  # the first run trained: resuming it
    (tmp_path / "checkpoints" / "10" / "manifest.json").write_text("{}")
    _prepare_run_dir(tmp_path, "train: {niter: 20}\n", fresh=False)
    assert (tmp_path / "config.previous.yml").read_text() == "train: {niter: 10}\n"
    assert (tmp_path / "config.yml").read_text() == "train: {niter: 20}\n"


def test_a_start_that_failed_before_any_checkpoint_is_not_a_previous_config(tmp_path):
    # A first attempt that stopped on a user error (bad weights path, missing data) trained nothing: fixing the
    # command and starting again must not warn that "the config differs from the one this run was started with".
    assert _prepare_run_dir(tmp_path, "path: {pretrain_model_generator: /typo.pth}\n", fresh=False) == []
    assert _prepare_run_dir(tmp_path, "path: {pretrain_model_generator: /good.pth}\n", fresh=False) == []
    assert not (tmp_path / "config.previous.yml").exists()
    assert (tmp_path / "config.yml").read_text() == "path: {pretrain_model_generator: /good.pth}\n"


def test_console_lines_are_mirrored_to_train_log_with_a_time(tmp_path, capsys):
    log = setup_logging(tmp_path)
    log = setup_logging(tmp_path)  # a second setup must not double every line
    log.info("step 10 loss 0.5")
    for handler in log.handlers:
        handler.flush()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO +step 10 loss 0\.5", lines[0])
    assert capsys.readouterr().out.strip() == lines[0]


def test_other_ranks_log_only_warnings_and_write_no_file(tmp_path, capsys):
    log = setup_logging(tmp_path, rank=1)
    log.info("hidden")
    log.warning("shown")
    assert capsys.readouterr().out.strip().endswith("shown")
    assert not (tmp_path / "train.log").exists()


@pytest.fixture(autouse=True)
def _reset_dlas_logger():
    yield
    logger = logging.getLogger("dlas")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()



GRAPH_ERROR = """\
name: graph
imports: [trainer_components]
device: cpu
datasets:
  train: {type: test_random_pairs, length: 4, size: 8}
networks:
  generator: {type: test_conv, nf: 4}
steps:
  gen:
    training: generator
    optimizer: {type: adam, lr: 1e-3}
    injectors:
      g: {type: generator, network: generator, in: lq, out: gen}
    losses:
      pix: {type: pix, fake: gne, real: hq}
train: {niter: 2}
"""


def test_validate_gives_the_trainers_graph_problems_their_lines(tmp_path, capsys):
    config = tmp_path / "graph.yml"
    config.write_text(GRAPH_ERROR)
    assert main(["-opt", str(config), "--validate"]) == 2
    assert f"error: steps.gen.losses.pix ({config}:15): reads state key 'gne'" in capsys.readouterr().err
    assert main(["-opt", str(config), "--validate", "steps.gen.losses.pix.fake=gen"]) == 0
    assert capsys.readouterr().out.startswith(f"config OK: {config}")


def test_readme_plugin_example_works_from_the_working_folder(tmp_path):
    # README "Writing a plugin": my_plugin.py in the working folder, `--import my_plugin` and `imports: [my_plugin]`.
    (tmp_path / "my_plugin.py").write_text(
        "import torch\nfrom dlas.registry import NETWORKS\n\n@NETWORKS.register('cli_test_tiny_sr')\n"
        "class TinySR(torch.nn.Module):\n    '''A two-convolution upsampler.'''\n"
        "    def __init__(self, nf: int = 32, scale: int = 4):\n        super().__init__()\n")
    (tmp_path / "run.yml").write_text(f"base: {ROOT / TINY}\nimports: [config_components, my_plugin]\n"
                                      "networks:\n  generator: !replace {type: cli_test_tiny_sr, nf: 48}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "plugins"), str(ROOT / "codes")]))

    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "codes" / "train.py"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)

    described = train("--import", "my_plugin", "--describe", "cli_test_tiny_sr")
    assert described.returncode == 0, described.stderr
    assert "A two-convolution upsampler." in described.stdout
    printed = train("-opt", "run.yml", "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["networks"]["generator"]["nf"] == 48


def test_a_second_ctrl_c_says_that_nothing_was_saved(monkeypatch, capsys):
    # The first Ctrl-C finishes the step and saves; a second one stops at once: the user must know what they lost.
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("dlas.cli.train._run", interrupted)
    assert main(["-opt", TINY]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted")
    assert "not saved" in err[0] and "newest checkpoint" in err[0]


def test_a_data_error_in_a_loader_worker_is_one_line(monkeypatch, capsys):
    # torch re-creates a worker's exception in the main process from its traceback text; the user sees one line.
    from torch._utils import ExceptionWrapper

    from dlas.errors import DataError

    def failing(args):
        try:
            raise DataError("50 unusable images in a row; run scripts/check_images.py", "/data/small.png")
        except DataError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    monkeypatch.setattr("dlas.cli.train._run", failing)
    assert main(["-opt", TINY]) == 2
    err = capsys.readouterr().err
    assert err == "error: /data/small.png: 50 unusable images in a row; run scripts/check_images.py " \
                  "(in DataLoader worker process 0)\n"


def test_a_config_file_given_without_opt_suggests_opt(capsys):
    assert main([TINY, "--validate"]) == 2
    assert capsys.readouterr().err == f"error: -opt: give a config file: -opt FILE.yml (did you mean -opt {TINY}?)\n"


def test_describe_with_a_config_knows_the_config_plugins():
    # `dlas-train -opt run.yml --describe my_net`: the config's imports: are what make my_net exist.
    result = run_train("-opt", TINY, "--describe", "tiny_net")
    assert result.returncode == 0, result.stderr
    assert "A stand-in upsampling network" in result.stdout


def test_a_run_folder_that_cannot_be_created_is_one_line_naming_path_root(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["-opt", TINY, f"path.root={blocker}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: path.root") and "cannot create or write the run folder" in err
    assert "Traceback" not in err


def test_validate_warns_about_a_schedule_longer_than_the_run_and_unreachable_visuals(capsys):
    # the quickstart shortened to 300 steps: its cosine period and visual_freq (1000) no longer fit
    assert main(["-opt", "options/quickstart_sr.yml", "--validate", "train.niter=300"]) == 0
    err = capsys.readouterr().err
    text = (Path(__file__).resolve().parents[1] / "options" / "quickstart_sr.yml").read_text()
    line = next(n for n, row in enumerate(text.splitlines(), 1) if row.strip().startswith("lr_scheduler:"))
    periods = sum(yaml.safe_load(text)["train"]["lr_scheduler"]["periods"])
    assert (f"warning: train.lr_scheduler.periods (options/quickstart_sr.yml:{line}): the periods add up to "
            f"{periods} steps, more than train.niter (300)") in err
    assert "set train.lr_scheduler.periods=[300]" in err
    assert "warning: logger.visual_freq" in err and "no visuals will be written" in err
    assert main(["-opt", "options/quickstart_sr.yml", "--validate"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_config_warnings_look_inside_a_warm_up_scheduler_and_at_milestones():
    from dlas.config.advice import config_warnings

    cfg = {"train": {"niter": 100, "lr_scheduler": {"type": "linear_warmup", "warmup_steps": 100, "scheduler": {
        "type": "multistep", "milestones": [50, 100, 200]}}}, "steps": {"g": {"lr_scheduler": None}},
        "logger": {"visuals": [], "visual_freq": 500}}
    found = {p.path: p.message for p in config_warnings(cfg)}
    assert set(found) == {"train.lr_scheduler.warmup_steps", "train.lr_scheduler.scheduler.milestones"}
    assert found["train.lr_scheduler.scheduler.milestones"].startswith("100, 200 not before train.niter (100)")


def test_validate_reports_missing_data_and_missing_loss_weights_together(capsys):
    # a new user's first --validate of a recipe without its data: every missing file in one report, not in turns
    code = main(["-opt", "options/quickstart_sr.yml", "--validate", "datasets.train.paths=[nowhere]",
                 "+steps.generator.losses.vgg={type: perceptual, weights_path: nowhere.pth}"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert errors[0].startswith("error: datasets.train.paths[0]") and "'nowhere' does not exist" in errors[0]
    assert errors[1].startswith("error: steps.generator.losses.vgg.weights_path") and "nowhere.pth" in errors[1]
