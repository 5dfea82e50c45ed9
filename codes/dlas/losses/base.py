"""The loss contract: read named state keys, return a scalar tensor."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from dlas.context import Context


class Loss(torch.nn.Module):
    """Base class of losses (a ``Module`` so that it can hold buffers such as a VGG feature extractor).

    A subclass passes the state keys it reads and the networks it calls to ``super().__init__`` and implements
    ``forward(state, ctx) -> scalar tensor`` (unweighted). The framework handles the keys ``weight`` (a number
    or a schedule), ``after``, ``before`` and ``every``; they never reach the constructor.
    """

    def __init__(self, reads: Sequence[str] = (), networks: Sequence[str] = ()):
        super().__init__()
        self.reads = list(reads)
        self.networks = list(networks)

    def forward(self, state: Mapping[str, Any], ctx: Context) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
