"""The ``dlas`` logger: timestamped console lines, mirrored to the run folder's ``train.log``."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

LOGGER_NAME = "dlas"
_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_MARK = "_dlas_console"  # tags the handlers installed here, so a second call replaces rather than duplicates them


def setup_logging(run_dir: Optional[Path] = None, rank: int = 0) -> logging.Logger:
    """Configure and return the ``dlas`` logger.

    Rank 0 logs INFO and up to stdout and, when ``run_dir`` is given, appends the same lines to
    ``run_dir/train.log`` (appending, so a resumed run keeps its history in one file). Other ranks of a
    distributed run log only warnings and errors, prefixed with their rank, and write no file.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if getattr(h, _MARK, False)]:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False  # the root logger (e.g. pytest's) would print every line twice

    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(prefix + _FORMAT, _DATE_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / "train.log", mode="a", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _MARK, True)
        logger.addHandler(handler)
    return logger
