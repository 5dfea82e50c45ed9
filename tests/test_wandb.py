"""wandb as a second logger: the same scalars and images as tensorboard, a resumed run continues the same wandb
run, offline without a network, nothing at all when it is not configured."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from dlas.errors import ConfigError

pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))


def records(run_file: Path) -> list:
    """The protobuf records of an offline ``run-ID.wandb`` file (a leveldb-style log of 32 KiB blocks after a
    7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, out, pending, pos = run_file.read_bytes(), [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # the tail of a block too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            out.append(record)
            pending = b""
        elif kind in (2, 3):
            pending += chunk
    return out


def finished_records(run_file: Path, timeout: float = 20.0) -> list:
    """The records of a run file once its exit record is there (wandb's service may still be writing it)."""
    from google.protobuf.message import DecodeError

    deadline = time.time() + timeout
    while True:
        try:
            found = records(run_file) if run_file.is_file() else []
        except DecodeError:  # read while the service was appending a record: read again
            if time.time() > deadline:
                raise
            time.sleep(0.1)
            continue
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.time() > deadline:
            return found
        time.sleep(0.1)


def history(run_dir: Path) -> list[dict]:
    """Every logged row of every offline run file under ``run_dir/wandb``, oldest first."""
    rows = []
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in finished_records(run_file):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def writer(run_dir: Path):
    from dlas.logging.wandb_writer import WandbWriter

    return WandbWriter(run_dir, "demo", {"project": "dlas-tests", "mode": "auto"})


def test_scalars_images_and_histograms_are_logged_against_the_iteration(tmp_path):
    run = writer(tmp_path)
    run.add_scalars({"gen/pix": 0.5, "lr/gen": 1e-4}, 10)
    run.add_images("visuals/gen", torch.rand(2, 3, 8, 8), 10)
    run.add_histogram("debug/g/usage", torch.tensor([0.5, 0.25, 0.25]), 10)
    run.close()
    rows = history(tmp_path)
    scalars = next(r for r in rows if "gen/pix" in r)
    assert scalars["gen/pix"] == 0.5 and scalars["iteration"] == 10
    images = next(r for r in rows if "visuals/gen/_type" in r)
    assert images["visuals/gen/count"] == 2 and images["iteration"] == 10
    histogram = next(r for r in rows if "debug/g/usage/_type" in r)
    assert histogram["debug/g/usage/values"] == [0.5, 0.25, 0.25]


def test_a_resumed_run_continues_the_same_wandb_run_and_may_log_an_earlier_iteration(tmp_path):
    first = writer(tmp_path)
    run_id = first.run.id
    first.add_scalars({"loss": 1.0}, 400)  # logged after the checkpoint at 300, then the job died
    first.close()
    time.sleep(1.1)  # wandb names a run's folder by the second it started
    second = writer(tmp_path)  # resumed from checkpoint 300
    assert second.run.id == run_id
    second.add_scalars({"loss": 0.9}, 301)
    second.close()
    logged = [(r["iteration"], r["loss"]) for r in history(tmp_path) if "loss" in r]
    assert logged == [(400, 1.0), (301, 0.9)]
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_auto_mode_is_offline_without_an_api_key(tmp_path, monkeypatch):
    import wandb

    from dlas.logging.wandb_writer import choose_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert choose_mode("auto", wandb) == "offline"
    assert choose_mode("online", wandb) == "online"


def test_a_missing_wandb_package_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ConfigError) as error:
        writer(tmp_path)
    assert error.value.problems[0].path == "logger.wandb" and '.[wandb]' in error.value.problems[0].message


def test_training_with_logger_wandb_logs_the_losses_and_a_resume_continues_the_run(tmp_path):
    """Through the trainer: ``logger.wandb`` in the config logs every printed step's losses to one wandb run,
    which the resumed half of the run continues."""
    from test_resume import write_config

    from dlas.config import load_config
    from dlas.trainer.run import train

    def run(niter: int) -> Path:
        path = write_config(tmp_path, "wb", niter)
        path.write_text(path.read_text().replace(
            "tensorboard: false}", "tensorboard: false, wandb: {project: dlas-tests, tags: [ci]}}"))
        cfg = load_config(str(path))
        run_dir = Path(cfg["path"]["root"]) / "wb"
        run_dir.mkdir(parents=True, exist_ok=True)
        train(cfg, run_dir)
        return run_dir

    run_dir = run(3)
    time.sleep(1.1)  # wandb names a run's folder by the second it started
    run(6)
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and len({f.name.rsplit("-", 1)[1] for f in folders}) == 1  # one run, resumed
    steps = [r["iteration"] for r in history(run_dir) if "gen/pix" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
