"""Fixtures shared by several test files."""
from __future__ import annotations

import contextlib
import logging
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


@contextlib.contextmanager
def _dlas_messages(level: int):
    """The messages the ``dlas`` logger emits at ``level`` and up (it does not propagate to pytest's caplog)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("dlas")
    handler, old_level = Collect(level), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
def caplog_dlas():
    """Warnings and errors of the ``dlas`` logger during the test."""
    with _dlas_messages(logging.WARNING) as messages:
        yield messages


@pytest.fixture
def caplog_dlas_info():
    """Info lines and up of the ``dlas`` logger during the test."""
    with _dlas_messages(logging.INFO) as messages:
        yield messages
