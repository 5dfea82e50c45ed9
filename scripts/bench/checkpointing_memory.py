"""Peak memory and step time of an RRDBNet training step with and without activation checkpointing, by batch.

    python scripts/bench/checkpointing_memory.py                         # CPU: nf 32, nb 6, LR 32, batches 4 8 16
    python scripts/bench/checkpointing_memory.py --device cuda --full    # GPU: nf 64, nb 23, batches 16 32 64

Each (batch, checkpointing) pair runs in a fresh process so that its peak is its own: on CUDA the peak of
``torch.cuda.max_memory_allocated``, on the CPU the growth of the process's peak resident set over its state
after building the network (the CPU allocator returns little memory, so only a fresh process measures it).
Checkpointing is the trainer's ``checkpointing: true`` (RRDB blocks recomputed in the backward pass). Target
(issue 20, GPU, batch 64): at most 25% of the peak memory at at most 1.3x the step time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> dict:
    """One measurement (run in its own process)."""
    from dlas.config import resolve_config
    from dlas.trainer.trainer import ExtensibleTrainer

    device = torch.device(args.device)
    cfg = {"name": "bench", "networks": {"generator": {"type": "rrdbnet", "nf": args.nf, "nb": args.nb, "scale": 4,
                                                       "checkpointing": args.checkpointing}},
           "steps": {"generator": {"training": ["generator"], "optimizer": {"type": "adam", "lr": 1e-4},
                                   "injectors": {"gen": {"type": "generator", "network": "generator", "in": "lq",
                                                         "out": "gen"}},
                                   "losses": {"pix": {"type": "pix", "criterion": "l1", "real": "hq",
                                                      "fake": "gen"}}}},
           "precision": args.precision, "train": {"niter": 10**9}}
    torch.manual_seed(0)
    trainer = ExtensibleTrainer(resolve_config(cfg, training=False), device)
    batch = {"lq": torch.rand(args.batch, 3, args.lq, args.lq, device=device),
             "hq": torch.rand(args.batch, 3, 4 * args.lq, 4 * args.lq, device=device)}
    trainer.train_step(batch)  # optimizer state allocated: what stays is the baseline
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = rss_mib()
    start = time.perf_counter()
    for _ in range(args.iters):
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.iters
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mib() - before
    return {"batch": args.batch, "checkpointing": args.checkpointing, "ms_per_step": 1000 * seconds,
            "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="nf 64, nb 23, batches 16 32 64")
    parser.add_argument("--nf", type=int, default=32)
    parser.add_argument("--nb", type=int, default=6)
    parser.add_argument("--lq", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.full:
        args.nf, args.nb, args.batches = 64, 23, [16, 32, 64]
    results = []
    for batch in args.batches:
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--worker", "--device", args.device, "--nf", str(args.nf), "--nb",
                       str(args.nb), "--lq", str(args.lq), "--batch", str(batch), "--iters", str(args.iters),
                       "--precision", args.precision] + (["--checkpointing"] if checkpointing else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"RRDBNet nf {args.nf} nb {args.nb}, LR {args.lq}, {args.precision}, {args.device}, torch "
          f"{torch.__version__}; load {os.getloadavg()[0]:.1f}")
    print(f"{'batch':>5} {'plain MiB':>10} {'ckpt MiB':>9} {'memory':>7} {'plain ms':>9} {'ckpt ms':>8} {'time':>6}")
    for batch in args.batches:
        plain, ckpt = (next(r for r in results if r["batch"] == batch and r["checkpointing"] == c)
                       for c in (False, True))
        print(f"{batch:>5} {plain['peak_mib']:>10.0f} {ckpt['peak_mib']:>9.0f} "
              f"{ckpt['peak_mib'] / max(plain['peak_mib'], 1e-9):>6.0%} {plain['ms_per_step']:>9.0f} "
              f"{ckpt['ms_per_step']:>8.0f} {ckpt['ms_per_step'] / plain['ms_per_step']:>5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
