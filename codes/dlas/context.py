"""What injectors and losses see of the trainer while they run: the :class:`Context` of one iteration.

It lives at the bottom of the package, beside ``errors`` and ``registry``, so that networks, injectors, losses
and datasets never import the trainer above them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch


@dataclass
class Context:
    """The running trainer as seen by an injector or a loss.

    ``networks`` maps config names to the modules to call (wrapped in DDP where the current step trains
    them); ``iteration`` is the number of the iteration being computed (1-based; ``ctx.step`` is the same number
    under its older name); ``training`` is ``False`` during validation. Components put debug values in
    ``scalars`` (``ctx.log("name", value)``); the trainer logs them.
    """

    networks: Mapping[str, torch.nn.Module]
    iteration: int = 0
    training: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scalars: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        """The iteration number (an alias of :attr:`iteration`, kept for plugins written against it)."""
        return self.iteration

    def log(self, name: str, value: Any) -> None:
        """Record a debug scalar (a float or a 0-d tensor) to be logged with the iteration's losses."""
        self.scalars[name] = value
