"""Tokens/s of the dalle network's KV-cached sampling vs uncached sampling, at several sequence lengths.

    python scripts/bench/sampling.py [--device cpu|cuda] [--grids 4 8 16] [--width 256 --depth 4 --heads 4]
                                     [--batch 4] [--rounds 3] [--json sampling.json]

Two measurements on one randomly initialised network per grid (weights do not change the cost):

* end to end: ``generate_tokens`` for ``batch`` captions, cached and uncached, alternated in rounds (ABBA) so
  that a shared machine's drift hits both alike; tokens/s is image tokens written per second, median of rounds.
* per token, on the largest grid: the time of one sampling step at several positions of the sequence, with the
  cache (one new position against a cache of that length) and without (the whole prefix recomputed). The
  cached time should stay flat as the position grows; the uncached one grows with it.

Prints a table with ``os.getloadavg()`` and writes the numbers as JSON with ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dlas.models.transformer.attention import KVCache
from dlas.models.transformer.dalle import DalleTransformer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(grid: int, args: argparse.Namespace, device: torch.device) -> DalleTransformer:
    torch.manual_seed(0)
    net = DalleTransformer(text_length=args.text_length, text_vocab_size=258, image_vocab_size=args.codes,
                           image_grid=grid, width=args.width, depth=args.depth, heads=args.heads)
    return net.to(device).eval()


def caption_ids(net: DalleTransformer, args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """``batch`` captions of ``text_length`` random ids (a full-length caption; its words do not change the cost)."""
    return torch.randint(2, 258, (args.batch, net.text_length), device=device,
                         generator=torch.Generator(device).manual_seed(1))


def end_to_end(net: DalleTransformer, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Median tokens/s of cached and uncached sampling of ``batch`` captions."""
    captions = caption_ids(net, args, device)

    def run(use_cache: bool) -> float:
        synchronize(device)
        start = time.perf_counter()
        net.generate_tokens(captions, torch.Generator(device).manual_seed(0), use_cache=use_cache)
        synchronize(device)
        return args.batch * net.image_length / (time.perf_counter() - start)

    run(True), run(False)  # warm-up
    speeds: dict[str, list[float]] = {"cached": [], "uncached": []}
    for i in range(args.rounds):
        order = [True, False] if i % 2 == 0 else [False, True]
        for use_cache in order:
            speeds["cached" if use_cache else "uncached"].append(run(use_cache))
    return {name: statistics.median(values) for name, values in speeds.items()}


@torch.no_grad()
def per_token(net: DalleTransformer, args: argparse.Namespace, device: torch.device) -> list[dict[str, float]]:
    """Milliseconds of one sampling step at several image positions, with and without the cache."""
    text = caption_ids(net, args, device)
    image = torch.randint(0, args.codes, (args.batch, net.image_length), device=device,
                          generator=torch.Generator(device).manual_seed(0))
    steps = args.steps_per_position
    positions = sorted({min(p, net.image_length - 1 - steps) for p in
                        [0, net.image_length // 4, net.image_length // 2, 3 * net.image_length // 4, net.image_length]})
    rows = []
    for position in positions:
        cached = []
        for _ in range(args.rounds):
            cache = KVCache(net.depth, net.text_length + net.image_length)
            net.next_image_logits(text, image[:, :position], cache)  # the prefix, in one call
            synchronize(device)
            start = time.perf_counter()
            for n in range(position + 1, position + 1 + steps):
                net.next_image_logits(text, image[:, :n], cache)
            synchronize(device)
            cached.append((time.perf_counter() - start) / steps)
        uncached = []
        for _ in range(args.rounds):
            synchronize(device)
            start = time.perf_counter()
            for n in range(position + 1, position + 1 + steps):
                net.next_image_logits(text, image[:, :n])
            synchronize(device)
            uncached.append((time.perf_counter() - start) / steps)
        rows.append({"position": net.text_length + 1 + position, "cached_ms": 1e3 * statistics.median(cached),
                     "uncached_ms": 1e3 * statistics.median(uncached)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grids", type=int, nargs="+", default=[4, 8, 16],
                        help="image token grids (side): sequences of text_length + side**2 tokens")
    parser.add_argument("--text-length", type=int, default=16)
    parser.add_argument("--codes", type=int, default=512, help="image vocabulary (dVAE codebook size)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="captions sampled together")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-position", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    load_before = os.getloadavg()
    results = {"device": str(device), "threads": torch.get_num_threads(), "width": args.width, "depth": args.depth,
               "heads": args.heads, "batch": args.batch, "text_length": args.text_length, "end_to_end": [],
               "load_before": load_before}
    print(f"device {device}, {torch.get_num_threads()} thread(s), width {args.width}, depth {args.depth}, heads "
          f"{args.heads}, batch {args.batch}, text_length {args.text_length}; load average {load_before}")
    print(f"{'image tokens':>12}{'sequence':>10}{'cached tok/s':>14}{'uncached tok/s':>16}{'speed-up':>10}")
    for grid in args.grids:
        net = build(grid, args, device)
        speeds = end_to_end(net, args, device)
        row = {"image_tokens": net.image_length, "sequence": net.text_length + net.image_length, **speeds,
               "speedup": speeds["cached"] / speeds["uncached"]}
        results["end_to_end"].append(row)
        print(f"{row['image_tokens']:>12}{row['sequence']:>10}{row['cached']:>14.1f}{row['uncached']:>16.1f}"
              f"{row['speedup']:>9.1f}x")
    net = build(max(args.grids), args, device)
    results["per_token"] = per_token(net, args, device)
    print(f"\nper sampling step, {net.image_length} image tokens (median of {args.rounds} rounds of "
          f"{args.steps_per_position} steps)")
    print(f"{'position':>10}{'cached ms':>12}{'uncached ms':>14}")
    for row in results["per_token"]:
        print(f"{row['position']:>10}{row['cached_ms']:>12.2f}{row['uncached_ms']:>14.2f}")
    first, last = results["per_token"][0], results["per_token"][-1]
    results["cached_growth"] = last["cached_ms"] / first["cached_ms"]
    results["uncached_growth"] = last["uncached_ms"] / first["uncached_ms"]
    results["load_after"] = os.getloadavg()
    print(f"last/first position step time: cached {results['cached_growth']:.2f}x, uncached "
          f"{results['uncached_growth']:.2f}x; load average {results['load_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
