"""Switched convolutions: a spatial mixture of convolution experts, and the networks built from them.

:class:`SwitchedConv` holds K kernels and learns, at every pixel, which one to apply (``docs/switched.md``).
"""
from dlas.models.switched.conv import SwitchedConv
from dlas.models.switched.network import (
    SwitchedNetwork,
    TemperatureSchedule,
    advance_switches,
    balance_loss,
    convert_to_switched,
    expand_state_dict,
    keep_pending_per_rank,
    switch_debug_info,
    switched_layers,
)
from dlas.models.switched.routed import all_experts_conv, routed_conv

__all__ = ["SwitchedConv", "SwitchedNetwork", "TemperatureSchedule", "advance_switches", "all_experts_conv",
           "balance_loss", "convert_to_switched", "expand_state_dict", "keep_pending_per_rank", "routed_conv",
           "switch_debug_info", "switched_layers"]
