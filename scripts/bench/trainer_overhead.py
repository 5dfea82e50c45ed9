"""Samples/s of a config-driven ExtensibleTrainer step vs the hand-written PyTorch loop of the same math.

    python scripts/bench/trainer_overhead.py [--device cpu|cuda] [--iters 50] [--nf 32] [--size 32] [--threads N]
        [--json FILE]

Both run the same generator (``compact_sr``-sized conv net), the same Adam and L1 loss on the same batches,
interleaved in rounds so that machine noise hits both alike. Prints a table and the overhead ratio
(target: ≤ 3%).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from harness import add_report_options, finish, load_average, set_threads

from dlas.config import resolve_config
from dlas.registry import NETWORKS
from dlas.trainer.trainer import ExtensibleTrainer


@NETWORKS.register("bench_net")
class BenchNet(torch.nn.Module):
    """A plain conv stack (benchmark only)."""

    def __init__(self, nf: int = 32, depth: int = 8):
        super().__init__()
        layers = [torch.nn.Conv2d(3, nf, 3, padding=1), torch.nn.PReLU(nf)]
        for _ in range(depth - 2):
            layers += [torch.nn.Conv2d(nf, nf, 3, padding=1), torch.nn.PReLU(nf)]
        layers += [torch.nn.Conv2d(nf, 3, 3, padding=1)]
        self.body = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


def config(nf: int) -> dict:
    return {
        "name": "bench",
        "networks": {"gen": {"type": "bench_net", "nf": nf}},
        "steps": {"gen": {
            "training": ["gen"],
            "optimizer": {"type": "adam", "lr": 1e-4},
            "injectors": {"g": {"type": "generator", "network": "gen", "in": "lq", "out": "out"}},
            "losses": {"pix": {"type": "pix", "criterion": "l1", "real": "hq", "fake": "out"}},
        }},
        "train": {"niter": 10**9},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--nf", type=int, default=32)
    add_report_options(parser)
    args = parser.parse_args()
    for name in ("iters", "rounds", "batch", "size", "nf"):
        if getattr(args, name) < 1:
            print(f"trainer_overhead: --{name} must be >= 1", file=sys.stderr)
            raise SystemExit(2)
    set_threads(args)
    device = torch.device(args.device)

    torch.manual_seed(0)
    trainer = ExtensibleTrainer(resolve_config(config(args.nf), training=False), device)
    torch.manual_seed(0)
    net = BenchNet(args.nf).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, foreach=True)
    batch = {"lq": torch.rand(args.batch, 3, args.size, args.size, device=device)}
    batch["hq"] = batch["lq"].flip(1)

    def hand_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.l1_loss(net(batch["lq"]), batch["hq"]).backward()
        opt.step()

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.iters * args.batch / (time.perf_counter() - start)

    load_before = os.getloadavg()
    hand, cfg, ratios = [], [], []
    for i in range(args.rounds):
        # ABBA order and a per-round ratio: slow drifts of a shared machine cancel instead of biasing one side
        pair = [("hand", hand_step), ("cfg", lambda: trainer.train_step(batch))]
        result = {name: timed(fn) for name, fn in (pair if i % 2 == 0 else pair[::-1])}
        hand.append(result["hand"])
        cfg.append(result["cfg"])
        ratios.append(result["hand"] / result["cfg"])
    h, c, r = statistics.median(hand), statistics.median(cfg), statistics.median(ratios)
    print(f"device {device}, batch {args.batch}x3x{args.size}x{args.size}, nf {args.nf}, "
          f"{args.rounds} rounds x {args.iters} iters (median); torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, load average {load_average(load_before)}")
    print(f"{'loop':<14}{'samples/s':>12}")
    print(f"{'hand-written':<14}{h:>12.1f}")
    print(f"{'config-driven':<14}{c:>12.1f}")
    print(f"overhead: {100 * (r - 1):+.2f}% (median of per-round ratios; target <= 3%)")
    finish({"device": str(device), "batch": args.batch, "size": args.size, "nf": args.nf, "rounds": args.rounds,
            "iters": args.iters, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average": load_before, "hand_samples_per_s": hand, "config_samples_per_s": cfg,
            "ratios": ratios, "overhead_percent": 100 * (r - 1)}, args.json)


if __name__ == "__main__":
    main()
