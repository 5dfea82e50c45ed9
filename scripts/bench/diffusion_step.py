"""Training-step and sampling-step time of a diffusion upsampler, under variants measured in the same run.

    python scripts/bench/diffusion_step.py                       # the shapes recipe's UNet, 32px crops, CPU
    python scripts/bench/diffusion_step.py --preset sr_x4 --batch 4 --device cuda --json out.json

Variants of one training step (gaussian_diffusion injector + backward + Adam): fp32, bf16 autocast, fp32 with
activation checkpointing; reported as median seconds and as a ratio to fp32. Sampling: the time of one DDIM step
on a full-size image (the cost of a sample is that times ``sampling_steps``). The machine's load average is printed
with the numbers: on a shared machine only the ratios are comparable between runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

from dlas.context import Context
from dlas.injectors.diffusion import GaussianDiffusionInjector
from dlas.models.diffusion.unet import DiffusionUNet

PRESETS = {  # the networks of the recipes
    "shapes": dict(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, attention_at=[4], norm_groups=8,
                   scale=2),
    "sr_x4": dict(model_channels=64, channel_mult=[1, 2, 3, 4], num_res_blocks=2, attention_at=[8], scale=4,
                  learn_sigma=True),
}
CROPS = {"shapes": 32, "sr_x4": 128}
SAMPLE_SIZES = {"shapes": 64, "sr_x4": 256}


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after two warm-up runs."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="shapes")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    options = PRESETS[args.preset]
    crop, scale = CROPS[args.preset], options["scale"]
    variance = "learned_range" if options.get("learn_sigma") else "fixed_small"
    injector = GaussianDiffusionInjector(network="g", variance=variance)
    hq = torch.rand(args.batch, 3, crop, crop, device=device)
    state = {"hq": hq, "lq": torch.nn.functional.avg_pool2d(hq, scale)}

    def training_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, autocast) -> None:
        with autocast():
            out = injector(state, Context(networks={"g": net}, device=device))
        optimizer.zero_grad(set_to_none=True)
        (out["mse"] + 0.001 * out["vb"]).backward()
        optimizer.step()

    bf16 = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    results: dict[str, float] = {}
    for name, autocast, checkpointing in (("fp32", contextlib.nullcontext, False), ("bf16", bf16, False),
                                          ("fp32_checkpointing", contextlib.nullcontext, True)):
        torch.manual_seed(0)
        net = DiffusionUNet(**options).to(device)
        if checkpointing:
            from dlas.trainer.trainer import enable_checkpointing

            enable_checkpointing(net, "g")
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
        step = lambda n=net, o=optimizer, a=autocast: training_step(n, o, a)
        results[f"train_{name}_s"] = timed(step, args.repeats, device)
    net = DiffusionUNet(**options).to(device).eval()
    side = SAMPLE_SIZES[args.preset]
    x, lq = torch.randn(1, 3, side, side, device=device), torch.rand(1, 3, side // scale, side // scale,
                                                                      device=device)
    with torch.no_grad():
        results["sample_step_fp32_s"] = timed(lambda: net(x, torch.tensor([500.0], device=device), lq=lq),
                                              args.repeats, device)
    parameters = sum(p.numel() for p in net.parameters())
    load = os.getloadavg()
    print(f"diffusion_unet '{args.preset}' ({parameters / 1e6:.2f}M parameters), batch {args.batch} of {crop}px "
          f"crops, {device}, {torch.get_num_threads()} threads, load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}")
    print(f"{'variant':<26}{'seconds':>10}{'vs fp32':>10}")
    base = results["train_fp32_s"]
    for name in ("fp32", "bf16", "fp32_checkpointing"):
        value = results[f"train_{name}_s"]
        print(f"{'train ' + name:<26}{value:>10.3f}{value / base:>10.2f}")
    print(f"{f'sample step {side}px':<26}{results['sample_step_fp32_s']:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "batch": args.batch, "device": str(device), "parameters": parameters,
                       "threads": torch.get_num_threads(), "load_average": load, **results}, f, indent=1)


if __name__ == "__main__":
    main()
