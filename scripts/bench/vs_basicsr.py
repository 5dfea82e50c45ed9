"""Samples/s of the same ESRGAN PSNR-phase training step through BasicSR's own code and through DLAS, in one run.

BasicSR is installed only for this benchmark, beside (not into) DLAS's environment::

    pip install --no-deps --target /tmp/basicsr basicsr==1.4.2 addict yapf future
    python scripts/bench/vs_basicsr.py --basicsr /tmp/basicsr               # CPU: nf 32, nb 3, batch 8, LR 32
    python scripts/bench/vs_basicsr.py --basicsr /tmp/basicsr --device cuda --full

BasicSR 1.4.2 imports ``torchvision.transforms.functional_tensor``, which current torchvision removed; this
script puts a one-function stand-in for it into ``sys.modules`` of its own process before importing BasicSR
(nothing is written into either package). Both sides: RRDBNet x4 (BasicSR's ``RRDBNet`` arch vs DLAS's
``rrdbnet``: the same layers), L1, Adam (lr 2e-4, betas 0.9/0.99), EMA 0.999, the same in-memory batch; BasicSR
through ``SRModel.feed_data`` + ``optimize_parameters``, DLAS through ``ExtensibleTrainer.train_step`` of the
equivalent config. DLAS variants: ``fp32`` (the default), plus ``+cl`` (channels_last) and ``bf16``, and ``auto``
(``precision: auto`` with ``channels_last: auto``: what :mod:`dlas.trainer.speed` measures and picks here). Rounds
alternate the sides (ABBA) and the ratio is the median of per-round ratios. Target (issue 20): DLAS >= 1.5x
BasicSR's samples/s on the CPU, >= 2x on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from typing import Any, Callable

import torch


def import_basicsr(path: str) -> Any:
    sys.path.insert(0, path)
    import torchvision.transforms.functional as functional

    shim = types.ModuleType("torchvision.transforms.functional_tensor")
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules.setdefault("torchvision.transforms.functional_tensor", shim)
    from basicsr.models.sr_model import SRModel

    return SRModel


def basicsr_step(sr_model_class: Any, args: argparse.Namespace, batch: dict) -> Callable[[], None]:
    import logging

    logging.getLogger("basicsr").setLevel(logging.WARNING)
    opt = {"is_train": True, "dist": False, "num_gpu": 1 if args.device == "cuda" else 0, "rank": 0,
           "network_g": {"type": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3, "num_feat": args.nf,
                         "num_block": args.nb, "num_grow_ch": 32, "scale": 4},
           "path": {}, "train": {"ema_decay": 0.999, "optim_g": {"type": "Adam", "lr": 2e-4, "betas": [0.9, 0.99]},
                                 "scheduler": {"type": "MultiStepLR", "milestones": [10**9], "gamma": 0.5},
                                 "pixel_opt": {"type": "L1Loss", "loss_weight": 1.0, "reduction": "mean"}}}
    torch.manual_seed(0)
    model = sr_model_class(opt)
    data = {"lq": batch["lq"], "gt": batch["hq"]}
    counter = [0]

    def step() -> None:
        counter[0] += 1
        model.feed_data(data)
        model.optimize_parameters(counter[0])

    return step


def dlas_step(variant: str, args: argparse.Namespace, batch: dict) -> Callable[[], None]:
    from dlas.config import resolve_config
    from dlas.trainer import speed
    from dlas.trainer.trainer import ExtensibleTrainer

    generator = {"type": "rrdbnet", "nf": args.nf, "nb": args.nb, "gc": 32, "scale": 4,
                 "channels_last": "auto" if variant == "auto" else "+cl" in variant}
    precision = "auto" if variant == "auto" else "bf16" if variant.startswith("bf16") else "fp32"
    cfg = {"name": "bench", "precision": precision,
           "networks": {"generator": generator},
           "steps": {"generator": {"training": ["generator"],
                                   "optimizer": {"type": "adam", "lr": 2e-4, "betas": [0.9, 0.99]},
                                   "injectors": {"gen": {"type": "generator", "network": "generator", "in": "lq",
                                                         "out": "gen"}},
                                   "losses": {"pix": {"type": "pix", "criterion": "l1", "real": "hq",
                                                      "fake": "gen"}}}},
           "train": {"niter": 10**9, "ema": {"rate": 0.999}}}
    device = torch.device(args.device)
    resolved = resolve_config(cfg, training=False)
    if variant == "auto":  # what a run with precision: auto and channels_last: auto trains with
        choice, report = speed.measure(resolved, device, batch, lambda c: ExtensibleTrainer(c, device))
        print(f"dlas auto: {speed.describe(choice)}; {report}")
        resolved = speed.apply_choice(resolved, choice)
    torch.manual_seed(0)
    trainer = ExtensibleTrainer(resolved, device)
    return lambda: trainer.train_step(batch)


def timed(step: Callable[[], None], iters: int, device: str) -> float:
    """Samples/s over ``iters`` steps."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--basicsr", required=True, metavar="DIR", help="where basicsr 1.4.2 is installed (--target)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="nf 64, nb 23, batch 16")
    parser.add_argument("--nf", type=int, default=32)
    parser.add_argument("--nb", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lq", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=["fp32", "fp32+cl", "bf16+cl", "auto"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.full:
        args.nf, args.nb, args.batch = 64, 23, 16
    sr_model = import_basicsr(args.basicsr)
    generator = torch.Generator().manual_seed(0)
    batch = {"lq": torch.rand(args.batch, 3, args.lq, args.lq, generator=generator),
             "hq": torch.rand(args.batch, 3, 4 * args.lq, 4 * args.lq, generator=generator)}
    batch = {k: v.to(args.device) for k, v in batch.items()}
    sides = {"basicsr": basicsr_step(sr_model, args, batch)}
    sides.update({f"dlas {v}": dlas_step(v, args, batch) for v in args.variants})
    for step in sides.values():  # warm-up
        for _ in range(2):
            step()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            rates[name].append(timed(sides[name], args.iters, args.device) * args.batch)
    ratios = {name: statistics.median(r / b for r, b in zip(rates[name], rates["basicsr"])) for name in names}
    print(f"ESRGAN PSNR step: RRDBNet nf {args.nf} nb {args.nb} x4, batch {args.batch}, LR {args.lq}, Adam, L1, "
          f"EMA; {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; load "
          f"{os.getloadavg()[0]:.1f}; median of {args.rounds} rounds x {args.iters} steps")
    print(f"{'side':<16} {'samples/s':>10} {'vs BasicSR':>11}")
    for name in names:
        print(f"{name:<16} {statistics.median(rates[name]):>10.2f} {ratios[name]:>10.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "samples_per_s": rates, "ratio_vs_basicsr": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
