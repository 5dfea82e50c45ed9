"""The EMA codebook under several processes (gloo on the CPU): every rank keeps the same codebook, and it is the
one a single process computes from the whole batch."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dlas.models.vqvae.quantizers import EMAVectorQuantizer


def batch(rank: int) -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(rank)) + rank


def quantizer(threshold: float) -> EMAVectorQuantizer:
    torch.manual_seed(0)
    vq = EMAVectorQuantizer(codebook_size=6, dim=3, decay=0.8, dead_code_threshold=threshold).train()
    vq.cluster_size.fill_(2.0)  # a started codebook: only codes that stop being used die
    vq.embed_sum.copy_(vq.codebook * 2)
    return vq


def worker(rank: int, port: int, threshold: float, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(100 + rank)  # different restart draws per rank: rank 0's must win
    vq = quantizer(threshold)
    restarted = False
    for _ in range(5):
        vq(batch(rank).requires_grad_())
        restarted |= bool((vq.cluster_size == threshold).any())  # a restart sets a code's size to the threshold
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    torch.save({**state, "restarted": torch.tensor(restarted)}, f"{out}.{rank}")
    dist.destroy_process_group()


def run_two_ranks(tmp_path, threshold: float) -> list[dict[str, torch.Tensor]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "state")
    # fork, not spawn: the children need no fresh interpreter and start in milliseconds
    mp.start_processes(worker, args=(port, threshold, out), nprocs=2, join=True, start_method="fork")
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1)]


def test_ranks_share_the_codebook_a_single_process_computes_from_the_whole_batch(tmp_path):
    ranks = run_two_ranks(tmp_path, threshold=0.0)
    single = quantizer(0.0)
    whole = torch.cat([batch(0), batch(1)])
    for _ in range(5):
        single(whole.requires_grad_())
    for key in ("codebook", "cluster_size", "embed_sum"):
        assert torch.equal(ranks[0][key], ranks[1][key])
        assert torch.allclose(ranks[0][key], single.state_dict()[key], atol=1e-5)


def test_dead_code_restarts_are_the_same_on_every_rank(tmp_path):
    ranks = run_two_ranks(tmp_path, threshold=5.0)  # codes averaging under 5 of the 64 vectors restart
    assert bool(ranks[0]["restarted"])
    assert torch.equal(ranks[0]["codebook"], ranks[1]["codebook"])
    assert torch.equal(ranks[0]["cluster_size"], ranks[1]["cluster_size"])
