"""scripts/sweep.py: a real two-point sweep of a tiny config, stopped by a signal, resumed, and summarised."""
from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "scripts" / "sweep.py"

CONFIG = """
name: tiny
seed: 0
imports: [trainer_components, stop_sweep]
datasets:
  train: {{type: test_random_pairs, length: 8, size: 8, batch_size: 2, num_workers: 0}}
  val: {{type: test_random_pairs, length: 2, size: 8}}
networks:
  gen: {{type: test_conv, nf: 4}}
steps:
  gen:
    training: [gen]
    optimizer: {{type: adam, lr: 1e-2}}
    injectors:
      g: {{type: generator, network: gen, in: lq, out: fake}}
      stop_sweep: {{type: test_stop_sweep, counter: {counter}, at: 2, nth: {nth}}}
    losses:
      pix: {{type: pix, criterion: l1, real: hq, fake: fake}}
train: {{niter: 4, val_freq: 2}}
eval:
  loss: {{type: loss, dataset: val}}
logger: {{print_freq: 1, save_checkpoint_freq: 2, tensorboard: false}}
path: {{root: {root}}}
"""

# Stops the sweep as `kill SWEEP_PID` would: SIGTERM to the sweep process only (the trainer's parent), which must
# pass it on to its trainer. It fires the nth time any run of the sweep trains its iteration `at`: with nth 2,
# in the second run.
STOP_SWEEP = '''
import os
import signal
from pathlib import Path

from dlas.injectors.base import Injector
from dlas.registry import INJECTORS


@INJECTORS.register("test_stop_sweep")
class StopSweep(Injector):
    """SIGTERM to the parent process the nth time a training iteration `at` runs (counted in the file `counter`)."""

    def __init__(self, counter: str, at: int = 2, nth: int = 2):
        super().__init__()
        self.counter, self.at, self.nth = Path(counter), at, nth

    def __call__(self, state, ctx):
        if ctx.training and ctx.iteration == self.at:
            with open(self.counter, "a") as file:
                file.write("x")
            if len(self.counter.read_text()) == self.nth:
                os.kill(os.getppid(), signal.SIGTERM)
        return {}
'''

GRID = "steps.gen.optimizer.lr=[1e-2, 3e-2]"


def write_config(folder: Path, nth: int = 2) -> Path:
    (folder / "stop_sweep.py").write_text(STOP_SWEEP)
    config = folder / "tiny.yml"
    config.write_text(CONFIG.format(counter=folder / "count", nth=nth, root=folder / "runs"))
    return config


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.parent.name) for p in (run / "checkpoints").glob("*/manifest.json"))


def summary_rows(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "summary.csv", encoding="utf-8") as file:
        return {row["run"]: row for row in csv.DictReader(file)}


@pytest.fixture(scope="module")
def sweep_module():
    spec = importlib.util.spec_from_file_location("sweep_script", SWEEP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being created
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_a_two_point_sweep_stopped_by_sigterm_resumes_without_redoing_the_finished_run(
        tmp_path, sweep_module, plugin_env, monkeypatch, capsys):
    # The sweep runs in this process (its trainers are real train.py processes): one torch import fewer per sweep.
    monkeypatch.setenv("PYTHONPATH", plugin_env["PYTHONPATH"])  # the trainers import trainer_components
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = write_config(tmp_path)
    runs, done = tmp_path / "runs", tmp_path / "runs" / "tiny-lr=1e-2"
    stopped = runs / "tiny-lr=3e-2"
    command = ["-opt", str(config), "--grid", GRID]

    assert sweep_module.main(command) == 130
    first = capsys.readouterr()
    assert "received SIGTERM" in first.err
    assert checkpoints(done) == [2, 4] and checkpoints(stopped) == [2]  # the trainer saved at the stop
    rows = summary_rows(runs / "tiny-sweep")
    assert rows["tiny-lr=1e-2"]["status"] == "finished" and rows["tiny-lr=3e-2"]["status"] == "unfinished"
    assert rows["tiny-lr=3e-2"]["step"] == "2"

    assert sweep_module.main(command) == 0
    second = capsys.readouterr()
    assert "tiny-lr=1e-2: finished earlier (step 4), skipped" in second.out
    assert "tiny-lr=3e-2: started, resuming from step 2" in second.out
    assert (done / "train.log").read_text().count("run summary") == 1  # trained once, not again
    assert "resuming from checkpoint" in (stopped / "train.log").read_text()
    assert checkpoints(stopped) == [2, 4]

    rows = summary_rows(runs / "tiny-sweep")
    assert list(rows) == ["tiny-lr=1e-2", "tiny-lr=3e-2"]
    for name, lr in (("tiny-lr=1e-2", "1e-2"), ("tiny-lr=3e-2", "3e-2")):
        row = rows[name]
        assert (row["lr"], row["status"], row["step"], row["val step"]) == (lr, "finished", "4", "4")
        metric = float(row["loss/gen/pix"])
        assert metric > 0 and abs(metric - _final_metric(runs / name)) < 1e-9
    markdown = (runs / "tiny-sweep" / "summary.md").read_text()
    assert markdown.startswith("| run | lr | status | step | val step | loss/gen/pix |")
    assert "| tiny-lr=3e-2 | 3e-2 | finished | 4 | 4 |" in markdown


def _final_metric(run: Path) -> float:
    import json

    return json.loads((run / "val" / "4" / "metrics.json").read_text())["loss/gen/pix"]


def test_every_combination_is_validated_before_any_run_starts(tmp_path, sweep_module, capsys):
    config = write_config(tmp_path, nth=0)
    code = sweep_module.main(["-opt", str(config), "--grid", "steps.gen.optimizer.lr=[1e-2, fast]",
                              "--grid", "train.mega_batch_factor=[1, 2]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: combination 3/4 (lr=fast mega_batch_factor=1, run tiny-lr=fast-mega_batch_factor=1): " \
           "steps.gen.optimizer.lr" in err
    assert "combination 4/4" in err and "combination 1/4" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_grid_that_is_not_a_list_is_an_error_naming_it(tmp_path, sweep_module, capsys):
    config = write_config(tmp_path, nth=0)
    assert sweep_module.main(["-opt", str(config), "--grid", "train.niter=4"]) == 2
    assert "error: --grid 'train.niter=4': the values must be a non-empty list" in capsys.readouterr().err


def test_run_names_are_readable_path_safe_and_unique(sweep_module):
    axes = [sweep_module.parse_grid("steps.g.optimizer.lr=[1e-4, 2e-4]"),
            sweep_module.parse_grid("steps.d.optimizer.lr=[0.5]"),
            sweep_module.parse_grid("+datasets.train.paths=[[/data/a b], 'x']")]
    sweep_module.label_axes(axes)
    assert [a.label for a in axes] == ["g.optimizer.lr", "d.optimizer.lr", "paths"]
    assert axes[2].values == ["[/data/a b]", "'x'"]
    name = sweep_module.run_name("esrgan", axes, ["1e-4", "0.5", "[/data/a b]"])
    assert name == "esrgan-g.optimizer.lr=1e-4-d.optimizer.lr=0.5-paths=_data_ab"
    long = sweep_module.run_name("x", axes[:1], ["9" * 300])
    assert len(long) == sweep_module.MAX_NAME and long != sweep_module.run_name("x", axes[:1], ["9" * 299])
