"""Stop signals (SIGINT, SIGTERM) over the whole of a training process, by phase; see :class:`StopSignals`."""
from __future__ import annotations

import logging
import signal
import time
from typing import Any, Optional

log = logging.getLogger("dlas")


class StopNow(KeyboardInterrupt):
    """A stop signal that ends the process at once; ``lost`` says whether trained steps went unsaved."""

    def __init__(self, message: str, lost: bool):
        super().__init__(message)
        self.lost = lost


class ValidationInterrupted(BaseException):
    """A stop signal cut a validation short (a BaseException, so an evaluator's ``except Exception`` passes it on)."""


class StopSignals:
    """SIGINT and SIGTERM over the whole of a training process, by phase (``phase`` is set by its owner).

    * ``starting`` (building, restoring: nothing trained yet): stop at once, nothing is lost;
    * ``training``: finish the current step, save, exit 0; a second signal a second or more later stops at once
      without saving (torchrun forwards SIGINT then SIGTERM within a millisecond, and a terminal's Ctrl-C reaches
      every rank: signals closer together are one request);
    * ``validating``: a single process leaves the validation at once and saves (SLURM's ``--signal=TERM@120``
      leaves no time to finish a long one); under DDP leaving mid-evaluator would strand the other ranks in a
      collective, so the ranks skip the remaining evaluators together (:meth:`leave_validation_if_requested`);
    * ``finished`` (the last checkpoint is saved): stop at once, nothing is lost.
    """

    def __init__(self, dist: Any = None):
        self.dist = dist
        self.phase = "starting"
        self.signal_name: Optional[str] = None  # the first signal received, if any
        self._first: Optional[float] = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def installed(self) -> bool:
        return bool(self._old)

    def install(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread): no handlers
                pass
        return self

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        first = self._first is None
        if first:
            self._first, self.signal_name = now, name
        elif now - self._first < 1.0:
            return
        if self.phase == "starting":
            raise StopNow(f"stopped by {name} during start-up, before the first step: nothing was trained, so there "
                          "is nothing to save", lost=False)
        if self.phase == "finished":
            raise StopNow(f"stopped by {name} after the last checkpoint was saved: nothing is lost", lost=False)
        if not first:
            raise StopNow(f"interrupted: a second {name} stopped the run at once, the steps since the last checkpoint "
                          "were not saved; running the same command again resumes from the newest checkpoint",
                          lost=True)
        validating = self.phase == "validating"
        log.info("received %s: %s, then saving", name, "leaving the validation" if validating else
                 "finishing the current step")
        if validating and self.dist is None:
            raise ValidationInterrupted(name)

    def leave_validation_if_requested(self) -> None:
        """Between evaluators: raise :class:`ValidationInterrupted` on every rank when any rank was signalled."""
        requested = self.dist.any_true(self.requested) if self.dist else self.requested
        if requested:
            raise ValidationInterrupted(self.signal_name or "a signal to another rank")
