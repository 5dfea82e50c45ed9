"""ESRGAN training-step time through DLAS's trainer, across precisions and speed switches, in one run.

    python scripts/bench/esrgan_step.py                       # CPU: nf 32, nb 3, batch 8, LR 32 (small)
    python scripts/bench/esrgan_step.py --device cuda --full  # GPU: nf 64, nb 23, batch 16, LR 32 -> HR 128
    python scripts/bench/esrgan_step.py --variants fp32 bf16 bf16+cl --phases psnr --json out.json

Phases: ``psnr`` (the generator with an L1 loss: ESRGAN's first stage) and ``gan`` (generator + VGG-style
discriminator + VGG19 perceptual loss, RaGAN: the second stage; the VGG19 is randomly initialised, which costs
the same as the published weights). Variants are ``+``-joined switches: a precision (``fp32``, ``tf32``
(CUDA), ``bf16``, ``fp16``), ``cl`` (channels_last), ``compile`` (torch.compile), ``graphs``
(torch.compile mode reduce-overhead: CUDA graphs), ``ckpt`` (activation checkpointing per RRDB block). Each is
built from the same config through ``ExtensibleTrainer`` and timed on the same batch after a warm-up, in
rounds that alternate the variants so that drift of a shared machine hits them alike; the table gives the
median ms per step, samples/s, peak GPU memory and the speed-up over the first variant.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from dlas.config import resolve_config
from dlas.trainer.trainer import ExtensibleTrainer

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
SWITCHES = ("cl", "compile", "graphs", "ckpt")


def config(phase: str, variant: str, nf: int, nb: int, hr: int) -> dict[str, Any]:
    """The ESRGAN config of ``phase`` with ``variant``'s switches."""
    parts = variant.split("+")
    precision = parts[0]
    if precision not in PRECISIONS or any(p not in SWITCHES for p in parts[1:]):
        raise SystemExit(f"esrgan_step: unknown variant {variant!r}: a precision of {PRECISIONS} then "
                         f"+-joined switches of {SWITCHES}")
    keys = {"channels_last": "cl" in parts, "checkpointing": "ckpt" in parts,
            "compile": "reduce-overhead" if "graphs" in parts else "compile" in parts}
    networks = {"generator": {"type": "rrdbnet", "nf": nf, "nb": nb, "scale": 4, **keys}}
    generator_losses: dict[str, Any] = {"pix": {"type": "pix", "criterion": "l1", "real": "hq", "fake": "gen",
                                                "weight": 1.0 if phase == "psnr" else 0.01}}
    steps: dict[str, Any] = {}
    if phase == "gan":
        networks["discriminator"] = {"type": "vgg_discriminator", "nf": nf, "input_size": hr,
                                     "channels_last": keys["channels_last"], "compile": keys["compile"]}
        steps["discriminator"] = {
            "training": ["discriminator"], "optimizer": {"type": "adam", "lr": 1e-4, "betas": [0.9, 0.99]},
            "injectors": {"fake": {"type": "generator", "network": "generator", "in": "lq", "out": "fake",
                                   "grad": False}},
            "losses": {"gan": {"type": "discriminator_gan", "discriminator": "discriminator", "gan_type": "ragan",
                               "real": "hq", "fake": "fake"}}}
        generator_losses["perceptual"] = {"type": "perceptual", "layer": "conv5_4", "weights_path": "random",
                                          "real": "hq", "fake": "gen"}
        generator_losses["gan"] = {"type": "generator_gan", "discriminator": "discriminator", "gan_type": "ragan",
                                   "real": "hq", "fake": "gen", "weight": 0.005}
    steps["generator"] = {"training": ["generator"], "optimizer": {"type": "adam", "lr": 1e-4, "betas": [0.9, 0.99]},
                          "injectors": {"gen": {"type": "generator", "network": "generator", "in": "lq",
                                                "out": "gen"}},
                          "losses": generator_losses}
    return {"name": "bench", "precision": "fp32" if precision == "tf32" else precision, "networks": networks,
            "steps": steps, "train": {"niter": 10**9, "allow_tf32": precision == "tf32"}}


def build(phase: str, variant: str, args: argparse.Namespace, device: torch.device) -> ExtensibleTrainer:
    torch.backends.cuda.matmul.allow_tf32 = variant.startswith("tf32")
    torch.backends.cudnn.allow_tf32 = variant.startswith("tf32")
    torch.manual_seed(0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random VGG19's warning
        return ExtensibleTrainer(resolve_config(config(phase, variant, args.nf, args.nb, args.lq * 4),
                                                training=False), device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: ExtensibleTrainer, batch: dict, iters: int, device: torch.device) -> float:
    """Seconds per step over ``iters`` steps."""
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        trainer.train_step(batch)
    sync(device)
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="the published size: nf 64, nb 23, batch 16")
    parser.add_argument("--nf", type=int, default=32)
    parser.add_argument("--nb", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lq", type=int, default=32, help="LR patch side (HR is 4x)")
    parser.add_argument("--phases", nargs="+", default=["psnr", "gan"], choices=["psnr", "gan"])
    parser.add_argument("--variants", nargs="+", help="default: fp32 bf16 bf16+cl (CPU) or the GPU set")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.full:
        args.nf, args.nb, args.batch = 64, 23, 16
    device = torch.device(args.device)
    variants = args.variants or (["fp32", "tf32", "bf16", "bf16+cl", "bf16+cl+compile", "bf16+cl+graphs",
                                  "fp16+cl"] if device.type == "cuda" else ["fp32", "bf16", "bf16+cl"])
    generator = torch.Generator().manual_seed(0)
    lq = torch.rand(args.batch, 3, args.lq, args.lq, generator=generator)
    batch = {"lq": lq.to(device), "hq": torch.rand(args.batch, 3, 4 * args.lq, 4 * args.lq,
                                                   generator=generator).to(device)}
    results = []
    for phase in args.phases:
        trainers = {}
        for variant in variants:
            trainers[variant] = build(phase, variant, args, device)
            for _ in range(args.warmup):  # compile, autotune, allocate
                trainers[variant].train_step(batch)
        times: dict[str, list[float]] = {v: [] for v in variants}
        peak: dict[str, float] = {}
        for round_index in range(args.rounds):
            order = variants if round_index % 2 == 0 else variants[::-1]
            for variant in order:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times[variant].append(time_steps(trainers[variant], batch, args.iters, device))
                if device.type == "cuda":
                    peak[variant] = torch.cuda.max_memory_allocated(device) / 2**20
        base = statistics.median(times[variants[0]])
        for variant in variants:
            seconds = statistics.median(times[variant])
            results.append({"phase": phase, "variant": variant, "ms_per_step": 1000 * seconds,
                            "samples_per_s": args.batch / seconds, "peak_mib": peak.get(variant),
                            "speedup": base / seconds})
        del trainers
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"ESRGAN step, {name}, torch {torch.__version__}, RRDBNet nf {args.nf} nb {args.nb}, batch {args.batch}, "
          f"LR {args.lq} -> HR {4 * args.lq}; median of {args.rounds} rounds x {args.iters} steps; "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'phase':<6} {'variant':<18} {'ms/step':>9} {'samples/s':>10} {'peak MiB':>9} {'speed-up':>9}")
    for r in results:
        peak_text = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"{r['phase']:<6} {r['variant']:<18} {r['ms_per_step']:>9.1f} {r['samples_per_s']:>10.1f} "
              f"{peak_text:>9} {r['speedup']:>8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "args": vars(args), "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
