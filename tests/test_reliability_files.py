"""Every file DLAS reads back from a run folder is untrusted input: checked on read, one error naming the file.

The checkpoint under test is a real one (two steps of a tiny run); each test copies it and breaks one thing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_reliability import CONFIG

from dlas import checkpoint as ckpt
from dlas.errors import DataError
from dlas.trainer.run import read_checkpoint


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, one_torch_thread) -> Path:
    """A run folder holding checkpoint 2 of a tiny run (read-only: tests copy it)."""
    from dlas.cli.train import main

    root = tmp_path_factory.mktemp("runs")
    config = root / "source.yml"
    config.write_text(CONFIG.format(name="source", plugin="trainer_components", dataset="test_random_pairs",
                                    network="test_conv", niter=2, eval="", root=root))
    assert main(["-opt", str(config)]) == 0
    return root / "source"


@pytest.fixture
def run_dir(saved_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(saved_run, copy)
    return copy


def folder_of(run_dir: Path, step: int = 2) -> Path:
    return ckpt.checkpoint_root(run_dir) / str(step)


def edit_manifest(folder: Path, change) -> None:
    path = folder / ckpt.MANIFEST
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(change(manifest)))


def relist(folder: Path, name: str) -> None:
    """Make the manifest agree with the file ``name`` as it now is (what a careful attacker or a bug would do)."""
    data = (folder / name).read_bytes()

    def agree(manifest):
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return manifest

    edit_manifest(folder, agree)


def one_problem(excinfo: pytest.ExceptionInfo) -> str:
    (problem,) = excinfo.value.problems
    assert "\n" not in str(problem)
    return str(problem)


# ---------------------------------------------------------------------- manifests
def test_an_intact_checkpoint_verifies_and_reads(run_dir):
    folder = folder_of(run_dir)
    assert ckpt.verify_checkpoint(folder) == []
    checkpoint = read_checkpoint(folder)
    assert checkpoint.step == 2 and sorted(checkpoint.weights) == ["gen", "gen_ema"]


def test_a_manifest_naming_a_file_outside_its_folder_is_refused(run_dir):
    folder = folder_of(run_dir)
    outside = "../../x.safetensors"
    (run_dir / "x.safetensors").write_bytes(b"outside")
    edit_manifest(folder, lambda m: {**m, "files": {**m["files"], outside: {"size": 7, "sha256": "0" * 64}}})
    with pytest.raises(DataError) as excinfo:
        ckpt.read_manifest(folder)
    assert str(folder / ckpt.MANIFEST) in one_problem(excinfo) and f"'{outside}'" in one_problem(excinfo)
    assert ckpt.list_checkpoints(run_dir) == []
    assert ckpt.latest_valid_checkpoint(run_dir) is None


@pytest.mark.parametrize("manifest, fragment", [
    ({}, "'files' must list"),
    ([], "not a JSON object"),
    ("step", "not a JSON object"),
    ({"step": 2, "files": {}}, "'files' must list"),
    ({"step": "2", "files": {"state.pt": {"size": 1, "sha256": "0" * 64}}}, "'step' must be a step count"),
    ({"step": 3, "files": {"state.pt": {"size": 1, "sha256": "0" * 64}}},
     "says step 3, but its folder is checkpoint 2"),
    ({"step": 2, "files": {"state.pt": {"size": -1, "sha256": "0" * 64}}}, "needs 'size'"),
    ({"step": 2, "files": {"state.pt": {"size": 1}}}, "needs 'size' (bytes) and 'sha256'"),
    ({"step": 2, "files": {"gen.safetensors": {"size": 1, "sha256": "0" * 64}}}, "does not list state.pt"),
])
def test_a_malformed_manifest_makes_no_checkpoint(run_dir, manifest, fragment):
    folder = folder_of(run_dir)
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError) as excinfo:
        ckpt.read_manifest(folder)
    assert fragment in one_problem(excinfo)
    assert ckpt.list_checkpoints(run_dir) == [] and ckpt.verify_checkpoint(folder)


def test_a_manifest_that_is_not_json_names_the_file(run_dir):
    folder = folder_of(run_dir)
    (folder / ckpt.MANIFEST).write_bytes(b"\xff\xfe{")
    with pytest.raises(DataError) as excinfo:
        ckpt.read_manifest(folder)
    assert one_problem(excinfo).startswith(f"{folder / ckpt.MANIFEST}: not valid JSON")


def test_a_file_the_manifest_does_not_list_makes_the_checkpoint_incomplete(run_dir):
    folder = folder_of(run_dir)
    shutil.copy(folder / "gen.safetensors", folder / "critic.safetensors")
    assert any("critic.safetensors: not listed in the manifest" in p for p in ckpt.verify_checkpoint(folder))


def test_reading_a_checkpoint_loads_only_the_files_its_manifest_lists(run_dir):
    folder = folder_of(run_dir)
    (folder / "stowaway.safetensors").write_bytes(b"not even a safetensors file")
    checkpoint = read_checkpoint(folder)  # the unlisted file is never opened
    assert sorted(checkpoint.weights) == ["gen", "gen_ema"]


def test_a_listed_file_replaced_by_a_link_is_not_read(run_dir):
    folder = folder_of(run_dir)
    target = run_dir / "elsewhere.safetensors"
    shutil.move(folder / "gen.safetensors", target)
    (folder / "gen.safetensors").symlink_to(target)
    assert any("gen.safetensors: not a regular file" in p for p in ckpt.verify_checkpoint(folder))


# ---------------------------------------------------------------------- state.pt and weights
def test_a_state_that_would_run_code_is_refused_without_advising_to_load_it_anyway(run_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = folder_of(run_dir)
    torch.save({"step": Exploit()}, folder / ckpt.STATE)
    relist(folder, ckpt.STATE)
    with pytest.raises(DataError) as excinfo:
        read_checkpoint(folder)
    text = one_problem(excinfo)
    assert text.startswith(f"{folder / ckpt.STATE}: refused") and "posix.system" in text
    assert "weights_only" not in text and not marker.exists()


@pytest.mark.parametrize("state, fragment", [
    ({"step": 2}, "'steps' (each step's optimizer state) is missing"),
    ({"step": -1, "steps": {}}, "'step' must be a step count"),
    ({"step": 2, "steps": {"gen": {"optimizer": {"state": {}}}}}, "the optimizer state of step 'gen' is malformed"),
    ({"step": 2, "steps": {}, "rng": {0: {"python": 1}}}, "the RNG state of rank 0 is unusable"),
    ({"step": 2, "steps": {}, "bad_total": "many"}, "'bad_total' must be a count"),
    ({"step": 4, "steps": {}}, "says step 4, but its manifest says 2"),
    ([1, 2, 3], "not the trainer's state"),
])
def test_a_state_missing_what_the_trainer_needs_names_the_file_and_the_key(run_dir, state, fragment):
    folder = folder_of(run_dir)
    torch.save(state, folder / ckpt.STATE)
    relist(folder, ckpt.STATE)
    with pytest.raises(DataError) as excinfo:
        read_checkpoint(folder)
    assert one_problem(excinfo).startswith(str(folder / ckpt.STATE)) and fragment in one_problem(excinfo)


def test_a_truncated_weight_file_whose_manifest_matches_it_names_the_file(run_dir):
    folder = folder_of(run_dir)
    weights = folder / "gen.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    relist(folder, "gen.safetensors")
    assert ckpt.verify_checkpoint(folder) == []  # sizes and hashes agree: only reading it shows the damage
    with pytest.raises(DataError) as excinfo:
        read_checkpoint(folder)
    assert one_problem(excinfo).startswith(f"{weights}: not a readable safetensors file")


# ---------------------------------------------------------------------- best.json
@pytest.mark.parametrize("text", ["{", "[]", '{"metric": "sr/psnr", "value": "high", "step": 2}',
                                  '{"metric": "sr/psnr", "value": NaN, "step": 2}',
                                  '{"metric": "sr/psnr", "value": 30.5, "step": -2}', '{"value": 1, "step": 2}'])
def test_a_malformed_best_json_is_one_error_naming_it(run_dir, text):
    (ckpt.checkpoint_root(run_dir) / ckpt.BEST).write_text(text)
    with pytest.raises(DataError) as excinfo:
        ckpt.read_best(run_dir)
    assert one_problem(excinfo).startswith(str(ckpt.checkpoint_root(run_dir) / ckpt.BEST))


def test_a_well_formed_best_json_reads_back(run_dir):
    ckpt.write_best(run_dir, "sr/psnr", 30.5, 2)
    assert ckpt.read_best(run_dir) == {"metric": "sr/psnr", "value": 30.5, "step": 2}


# ---------------------------------------------------------------------- the checkpoints folder
def test_only_folders_named_by_their_step_in_ascii_digits_are_checkpoints(run_dir, caplog_dlas):
    root = ckpt.checkpoint_root(run_dir)
    for odd in ["\u0663", "\u00b2", "0002", "2.5", "-2", "12345678901234567890123"]:  # Arabic 3, superscript 2, ...
        shutil.copytree(root / "2", root / odd)
    (root / "7").write_text("a file, not a folder")
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [2]
    assert ckpt.latest_valid_checkpoint(run_dir)[0] == 2
    assert sum("not a checkpoint" in m for m in caplog_dlas) == 6


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_dead_processes_are_cleaned_up_and_live_ones_kept(run_dir):
    root = ckpt.checkpoint_root(run_dir)
    gone = dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in [f".tmp-4-{gone}", f".del-1-{gone}", f".tmp-6-{alive.pid}", f".tmp-8-{os.getpid()}"]:
            (root / name).mkdir()
        shutil.move(root / "2", root / f".old-2-{gone}")  # a re-save of step 2 died between its two renames
        notes = ckpt.clean_interrupted_saves(run_dir)
    finally:
        alive.kill()
        alive.wait()
    assert sorted(p.name for p in root.iterdir()) == sorted(["2", f".tmp-6-{alive.pid}", f".tmp-8-{os.getpid()}"])
    assert ckpt.verify_checkpoint(root / "2") == []
    assert len(notes) == 3 and any("restored checkpoint" in n for n in notes)


def test_pruning_leaves_no_half_deleted_checkpoint_behind(run_dir):
    root = ckpt.checkpoint_root(run_dir)
    state = {"step": 4}
    ckpt.save_checkpoint(run_dir, 4, {"gen": {"w": torch.zeros(2)}}, state)
    assert ckpt.prune_checkpoints(run_dir, keep_last=1) == [2]
    assert sorted(p.name for p in root.iterdir()) == ["4"]
