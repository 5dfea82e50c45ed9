"""Fixtures shared by several test files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny convolutions run ~10x faster on one thread than with threads competing for a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def plugin_env() -> dict[str, str]:
    """The environment for a training subprocess that imports the test plugins (tests/plugins) by name."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "plugins"), env.get("PYTHONPATH", "")])
    return env
