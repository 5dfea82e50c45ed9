"""DDP under torchrun: rank and device from the environment, NCCL on GPU, gloo on CPU.

``torchrun --nproc_per_node N codes/train.py -opt X.yml`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
nothing else changes. ``batch_size`` stays the global batch (each rank loads ``batch_size / N``).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as torch_dist

from dlas.build import select_device

log = logging.getLogger("dlas")


@dataclass
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device_type: str

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if self.device_type == "cuda" else None
        # Gated losses and injectors can leave a trained network's parameters without gradients for a while;
        # find_unused_parameters makes DDP reduce zeros for them instead of waiting forever.
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self._device()).clone()
        torch_dist.all_reduce(tensor)
        return tensor

    def any_true(self, flag: bool) -> bool:
        tensor = torch.tensor([1.0 if flag else 0.0], device=self._device())
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return bool(tensor.item())

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """``flag`` (a bool tensor) and-ed over ranks, so every rank takes the same skip decision."""
        tensor = flag.to(self._device(), torch.float32).reshape(1)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MIN)
        return tensor[0] > 0

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.device_type == "cuda" else torch.device("cpu")

    def average_scalars(self, values: Mapping[str, float]) -> dict[str, float]:
        keys = sorted(values)
        gathered: list[Optional[dict]] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, {k: values[k] for k in keys})
        union = sorted({k for g in gathered for k in g})
        return {k: sum(g[k] for g in gathered if k in g) / sum(1 for g in gathered if k in g) for k in union}

    def gather_rng(self, state: Any) -> dict[int, Any]:
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, state)
        return dict(enumerate(gathered))

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        holder = [value]
        torch_dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        torch_dist.barrier()

    def shutdown(self) -> None:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def init_from_env(cfg: Mapping[str, Any]) -> Optional[Distributed]:
    """Join the process group torchrun describes in the environment; ``None`` for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = select_device(cfg["device"]).type == "cuda"  # the run's device choice, made once in dlas.build
    timeout = datetime.timedelta(seconds=float(cfg["train"]["dist_timeout"]))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return Distributed(rank, local_rank, world_size, "cuda" if use_cuda else "cpu")
