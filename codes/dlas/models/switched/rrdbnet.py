"""switched_rrdbnet: ESRGAN's RRDBNet with (chosen) convolutions switched."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dlas.errors import ConfigError
from dlas.models.sr.rrdbnet import RRDBNet
from dlas.models.switched.network import SwitchedNetwork, TemperatureSchedule, convert_to_switched
from dlas.registry import NETWORKS


@NETWORKS.register("switched_rrdbnet")
class SwitchedRRDBNet(SwitchedNetwork, RRDBNet):
    """RRDBNet (see ``rrdbnet``) whose convolutions named by ``switched_layers`` are :class:`SwitchedConv`\\ s.

    Built as an RRDBNet, then converted in place (:func:`convert_to_switched`), so a trained ``rrdbnet``'s weights
    (this project's, BasicSR's, or the original ESRGAN release) load through ``path.pretrain_model_generator`` and
    the switched network starts out computing exactly what the plain one did; each expert is a copy of the plain
    conv. Trained from scratch (``fresh_experts: true``, the default), every expert is re-drawn independently
    with the plain layer's weight scale instead, so the experts differ from the first step.

    Options: those of ``rrdbnet`` (in_nc, out_nc, nf, nb, gc, scale), plus
      switched_layers: shell-style patterns of the module names to switch (``body.*``: every dense-block conv, the
        bulk of the parameters; ``conv_up*`` the upsampling convs; ``*`` every conv).
      num_experts, mode, selector_hidden, temperature_start, temperature_end, temperature_steps, usage_history,
        dropout, route_gradient, implementation: as in ``switched_vae``.
      fresh_experts: re-draw each expert independently at construction (a pretrained file overwrites them anyway).

    ``forward`` returns the image, as ``rrdbnet`` does; the auxiliary balance term of the last training forward
    is ``dlas.models.switched.balance_loss(net)`` (not a state output here).
    """

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32, scale: int = 4,
                 switched_layers: list[str] = ("body.*",), num_experts: int = 8,
                 mode: Literal["hard", "soft"] = "hard", selector_hidden: int = 0, temperature_start: float = 1.0,
                 temperature_end: float = 1.0, temperature_steps: int = 0, usage_history: int = 128,
                 dropout: float = 0.0, route_gradient: Literal["log_prob", "straight_through"] = "log_prob",
                 implementation: Literal["fast", "reference"] = "fast", fresh_experts: bool = True):
        RRDBNet.__init__(self, in_nc=in_nc, out_nc=out_nc, nf=nf, nb=nb, gc=gc, scale=scale)
        self.temperature_schedule = TemperatureSchedule(temperature_start, temperature_end, temperature_steps)
        names = convert_to_switched(self, switched_layers, num_experts, mode=mode, selector_hidden=selector_hidden,
                                    temperature=temperature_start, usage_history=usage_history, dropout=dropout,
                                    route_gradient=route_gradient, implementation=implementation)
        if not names:
            convs = [name for name, m in self.named_modules() if isinstance(m, nn.Conv2d)]
            raise ConfigError(f"{list(switched_layers)} matches no convolution; they are named like "
                              f"{', '.join(convs[:3])}, ..., {convs[-1]}", "switched_layers")
        if fresh_experts:
            with torch.no_grad():
                for name in names:
                    weight = self.get_submodule(name).weight
                    weight.normal_(0, float(weight[0].std()))
