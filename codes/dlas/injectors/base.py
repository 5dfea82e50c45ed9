"""The injector contract: read named state keys, return new ones."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from dlas.context import Context


class Injector:
    """Base class of injectors.

    A subclass declares which state keys it reads and writes and which networks it calls (by passing them to
    ``super().__init__``), so that ``--validate`` can check the state graph statically, then implements
    ``__call__(state, ctx) -> {key: value}``. The framework handles the gate keys ``after``, ``before`` and
    ``every``; they never reach the constructor.
    """

    def __init__(self, reads: Sequence[str] = (), writes: Sequence[str] = (), networks: Sequence[str] = ()):
        self.reads = list(reads)
        self.writes = list(writes)
        self.networks = list(networks)

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        raise NotImplementedError
