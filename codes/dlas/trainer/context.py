"""What injectors and losses see of the trainer while they run: the :class:`Context` of one step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch


@dataclass
class Context:
    """The running trainer as seen by an injector or a loss.

    ``networks`` maps config names to the modules to call (wrapped in DDP where the current step trains
    them); ``step`` is the iteration being computed (1-based); ``training`` is ``False`` during validation.
    Components put debug values in ``scalars`` (``ctx.log("name", value)``); the trainer logs them.
    """

    networks: Mapping[str, torch.nn.Module]
    step: int = 0
    training: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scalars: dict[str, Any] = field(default_factory=dict)

    def log(self, name: str, value: Any) -> None:
        """Record a debug scalar (a float or a 0-d tensor) to be logged with the step's losses."""
        self.scalars[name] = value
