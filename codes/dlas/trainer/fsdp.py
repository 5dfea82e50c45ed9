"""Fully sharded data parallel (``train.distributed: fsdp``) on torch's own FSDP2 (``fully_shard``).

Each trained network is sharded in place: its blocks (``checkpoint_modules()``, else the children of its largest
``ModuleList``/``Sequential``, as for activation checkpointing) become FSDP units, then the network itself, so a
rank holds ``1 / world_size`` of every parameter, gradient and optimizer state and all-gathers a block's weights
only while it runs. Under ``precision: bf16`` the units compute in bf16 and reduce gradients in fp32.

What stays the same as with DDP: the global batch, gradient accumulation (``set_requires_gradient_sync`` replaces
``no_sync``), the NaN guard, EMA (the shadows are sharded like their networks, so an update is local), and the
checkpoint layout: weights are gathered into full tensors on rank 0 and saved as ordinary safetensors, so a run
trained under FSDP loads into ``dlas-test`` or a single-process run unchanged. The optimizer state in
``state.pt`` is the full (unsharded) state keyed by parameter name, and restores under FSDP with any world size.
Validation gathers full copies of the networks onto every rank (inference needs no gradients or optimizer state,
which is where FSDP saves most), so the evaluators run as they do without FSDP.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch

from dlas.errors import ConfigError


def _api() -> Any:
    try:
        from torch.distributed import fsdp

        if hasattr(fsdp, "fully_shard"):
            return fsdp
    except ImportError:
        pass
    try:  # torch 2.4 and 2.5 kept FSDP2 here
        from torch.distributed._composable import fsdp

        return fsdp
    except ImportError as exc:
        raise ConfigError(f"train.distributed: fsdp needs torch >= 2.4 (FSDP2), this is torch {torch.__version__}",
                          "train.distributed") from exc


def block_modules(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The network's repeated blocks: ``checkpoint_modules()``, else its largest ``ModuleList``/``Sequential``'s
    children (the units of activation checkpointing and of FSDP sharding)."""
    if hasattr(net, "checkpoint_modules"):
        return list(net.checkpoint_modules())
    containers = [m for m in net.modules() if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential))]
    return list(max(containers, key=len)) if containers else []


def shard(net: torch.nn.Module, world_size: int, device_type: str, precision: str) -> None:
    """Shard ``net`` in place over all ranks: each block, then the network."""
    fsdp = _api()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world_size,))
    options: dict[str, Any] = {"mesh": mesh}
    if precision == "bf16":
        options["mp_policy"] = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in block_modules(net):
        if any(p.requires_grad for p in block.parameters()):
            fsdp.fully_shard(block, **options)
    fsdp.fully_shard(net, **options)


def is_sharded(net: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in net.parameters())


def set_gradient_sync(networks: Iterable[torch.nn.Module], sync: bool) -> None:
    """Reduce-scatter gradients on this backward (``sync``) or only accumulate them (every micro-batch but the
    last)."""
    for net in networks:
        net.set_requires_gradient_sync(sync)


def _options(to_cpu: bool, **extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=to_cpu, **extra)


def full_state_dict(net: torch.nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The network's weights as full tensors (a collective: every rank calls it). With ``everywhere`` every rank
    gets them, else rank 0 gets them on the CPU and the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(net, options=_options(to_cpu=not everywhere))


def load_full_state_dict(net: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load full tensors (read from a checkpoint by every rank) into the sharded ``net``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(net, dict(state), options=_options(to_cpu=False))


def optimizer_state_dict(networks: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state keyed by ``NET.parameter`` names (a collective), like the parameter names the
    step's optimizer was built with.

    An optimizer that has not stepped yet (a step gated on later) is saved as it is, with its empty state:
    torch's state-dict helpers would first "initialise" it with a zero-learning-rate step, which counts in Adam's
    bias correction and would make the run differ from one that was never saved."""
    if not optimizer.state:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(torch.nn.ModuleDict(dict(networks)), optimizer, options=_options(to_cpu=True))


def load_optimizer_state_dict(networks: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                              state: dict) -> None:
    """Load a state saved by :func:`optimizer_state_dict` into the sharded networks' optimizer."""
    if not state["state"]:  # never stepped: only the hyper-parameters, which need no gathering
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(torch.nn.ModuleDict(dict(networks)), optimizer, state, options=_options(to_cpu=False))


def full(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a norm reduced over the shards); a plain tensor unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def check_precision(precision: str) -> Optional[str]:
    if precision == "fp16":
        return ("FSDP trains in fp32 or bf16 here (fp16's GradScaler does not cover sharded gradients); "
                "use precision: bf16")
    return None
