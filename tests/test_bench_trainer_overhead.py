"""The trainer-overhead benchmark runs and reports what its table prints (its numbers are measured, not tested)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_trainer_overhead_bench_writes_its_rounds_to_json(tmp_path):
    out = tmp_path / "overhead.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts/bench/trainer_overhead.py"), "--device", "cpu",
                             "--iters", "1", "--rounds", "2", "--batch", "2", "--size", "8", "--nf", "4",
                             "--threads", "1", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert (report["rounds"], report["threads"], len(report["ratios"])) == (2, 1, 2)
    ratios = sorted(report["ratios"])
    assert f"overhead: {report['overhead_percent']:+.2f}%" in result.stdout
    assert report["overhead_percent"] == pytest.approx(100 * ((ratios[0] + ratios[1]) / 2 - 1))


@pytest.mark.parametrize("option", ["--rounds", "--iters"])
def test_trainer_overhead_bench_refuses_an_empty_measurement(option):
    result = subprocess.run([sys.executable, str(REPO / "scripts/bench/trainer_overhead.py"), option, "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"{option} must be >= 1" in result.stderr and "Traceback" not in result.stderr
