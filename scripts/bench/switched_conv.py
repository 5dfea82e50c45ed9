"""Time and peak memory of a hard-routed switched conv (K experts, the fast path) against one dense conv of the
same shape and against the all-experts reference.

    python scripts/bench/switched_conv.py                       # CPU, the default sizes
    python scripts/bench/switched_conv.py --device cuda --json out.json

Three layers per size, each called as a whole module (the switched ones include their selector, softmax and
routing): ``dense`` (``nn.Conv2d``), ``fast`` (``SwitchedConv``, hard, ``implementation: fast``) and
``reference`` (the same, ``implementation: reference``: all K convolutions, then the one-hot mixture). Two
workloads: ``forward`` (no gradient, evaluation) and ``train`` (forward + backward to input, weights and
selector). The machine this was written on is shared, so the three are timed interleaved, round after round,
and each keeps its fastest round; ratios between them are the numbers to read. Peak memory: on CUDA
``max_memory_allocated`` above what was allocated before; on the CPU the peak of the allocations the torch
profiler records (live tensors only, not the allocator's cache).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import torch
from torch import nn

from dlas.models.switched import SwitchedConv

# (batch, in channels, out channels, height = width, stride)
SIZES = [(8, 32, 32, 64, 1), (8, 64, 64, 64, 1), (8, 64, 64, 64, 2), (4, 128, 128, 32, 1)]


def layers(c_in: int, c_out: int, stride: int, experts: int, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    fast = SwitchedConv(c_in, c_out, 3, experts, stride=stride, padding=1)
    reference = SwitchedConv(c_in, c_out, 3, experts, stride=stride, padding=1, implementation="reference")
    reference.load_state_dict(fast.state_dict())
    dense = nn.Conv2d(c_in, c_out, 3, stride, 1)
    return {name: m.to(device).train() for name, m in (("dense", dense), ("fast", fast), ("reference", reference))}


def workload(layer: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    if not train:
        def forward() -> None:
            with torch.no_grad():
                layer(x)
        return forward
    x = x.clone().requires_grad_()

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest_ms(fns: dict[str, Callable[[], None]], device: torch.device, rounds: int, repeats: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():  # warm-up: allocator, oneDNN primitive caches, cuDNN autotuning
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / repeats * 1000)
    return best


def peak_mb(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    rows = []
    print(f"device {device}, K={args.experts}, {torch.get_num_threads()} threads, bf16={args.bf16}, "
          f"loadavg at start {os.getloadavg()}")
    header = (f"{'N,Cin,Cout,HW,stride':>22} {'workload':>8} {'dense ms':>9} {'fast ms':>9} {'ref ms':>9} "
              f"{'fast/dense':>10} {'ref/fast':>9} {'dense MB':>9} {'fast MB':>9} {'ref MB':>9}")
    print(header)
    for batch, c_in, c_out, size, stride in SIZES:
        mods = layers(c_in, c_out, stride, args.experts, device)
        x = torch.randn(batch, c_in, size, size, device=device)
        for train in (False, True):
            fns = {name: workload(m, x, train) for name, m in mods.items()}
            with autocast:
                ms = fastest_ms(fns, device, args.rounds, args.repeats)
                mb = {name: peak_mb(fn, device) for name, fn in fns.items()}
            row = {"batch": batch, "in": c_in, "out": c_out, "size": size, "stride": stride,
                   "workload": "train" if train else "forward", "ms": ms, "peak_mb": mb,
                   "fast_over_dense": ms["fast"] / ms["dense"], "reference_over_fast": ms["reference"] / ms["fast"],
                   "loadavg": os.getloadavg()[0]}
            rows.append(row)
            print(f"{f'{batch},{c_in},{c_out},{size},{stride}':>22} {row['workload']:>8} {ms['dense']:9.2f} "
                  f"{ms['fast']:9.2f} {ms['reference']:9.2f} {row['fast_over_dense']:10.2f} "
                  f"{row['reference_over_fast']:9.2f} {mb['dense']:9.1f} {mb['fast']:9.1f} {mb['reference']:9.1f}",
                  flush=True)
    print(f"loadavg at end {os.getloadavg()}")
    if args.json:
        meta = {"device": str(device), "experts": args.experts, "threads": torch.get_num_threads(), "bf16": args.bf16,
                "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
