"""Training-step time of each normalization choice of the SR conv networks, as a ratio to no normalization.

    python scripts/bench/norm_step_time.py [--repeats 10] [--device cpu cuda] [--threads N] [--json PATH]

One step = forward, a loss, backward, Adam update. Generators: an L1 loss against a random target, LR input
32x32 (x4); discriminators: the mean logit of 128x128 images. Each network's variants are timed alternately
(one step each per round; the fastest step of each counts), so the ratios to ``none`` hold on a noisy, shared machine.
``none`` is the baseline of every network: no norm layers, no spectral norm, the default init (for
unet_discriminator that is not its Real-ESRGAN default, which has spectral norm on). CUDA steps are synchronised.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from harness import add_options, device_label, finish, start, timed

from dlas.registry import NETWORKS

NORMS = ["batch", "group", "instance"]
# network -> (options at a size a CPU can time, batch size, input size, extra variants beyond the norms)
CASES: dict[str, tuple[dict, int, int, dict[str, dict]]] = {
    "rrdbnet": ({"nf": 32, "nb": 4, "gc": 16, "scale": 4}, 4, 32, {"fixup": {"init": "fixup"}}),
    "srresnet": ({"nf": 64, "nb": 8, "scale": 4}, 4, 32, {"fixup": {"init": "fixup"}}),
    "compact_sr": ({"nf": 32, "num_conv": 8, "scale": 4}, 8, 32, {}),
    "vgg_discriminator": ({"nf": 32, "input_size": 128}, 4, 128, {"spectral_norm": {"spectral_norm": True}}),
    "unet_discriminator": ({"nf": 32}, 4, 128, {"spectral_norm": {"spectral_norm": True}}),
}


def variants(name: str) -> dict[str, dict]:
    options, _, _, extra = CASES[name]
    baseline = {"norm": "none"} | ({"spectral_norm": False} if name == "unet_discriminator" else {})
    out = {"none": options | baseline}
    out |= {norm: options | baseline | {"norm": norm} for norm in NORMS}
    out |= {label: options | baseline | more for label, more in extra.items()}
    return out


class Step:
    """One network variant with its optimizer and fixed data; ``__call__`` runs one training step."""

    def __init__(self, name: str, options: dict, batch: int, size: int, device: torch.device):
        torch.manual_seed(0)
        self.net = NETWORKS.build({"type": name, **options}).to(device).train()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-4)
        self.x = torch.rand(batch, 3, size, size, device=device)
        self.generator = "discriminator" not in name
        scale = options.get("scale", 1)
        self.target = torch.rand(batch, 3, size * scale, size * scale, device=device) if self.generator else None

    def __call__(self) -> None:
        out = self.net(self.x)
        loss = (out - self.target).abs().mean() if self.generator else out.mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def measure(name: str, device: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    _, batch, size, _ = CASES[name]
    steps = {label: Step(name, options, batch, size, device) for label, options in variants(name).items()}
    for step in steps.values():  # warm-up: allocator, lazy init, Adam state
        step()
        step()
    times: dict[str, list[float]] = {label: [] for label in steps}
    for round_ in range(repeats):
        order = list(steps.items())
        for label, step in order if round_ % 2 else reversed(order):  # no variant always runs first
            times[label].append(timed(step, device=device))
    # The fastest step is the one least disturbed by other processes; the median is kept in the JSON.
    fastest = {label: min(values) * 1e3 for label, values in times.items()}
    return {label: {"ms": ms, "ratio": ms / fastest["none"], "median_ms": statistics.median(times[label]) * 1e3,
                    "parameters": sum(p.numel() for p in steps[label].net.parameters())}
            for label, ms in fastest.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, repeats=10)
    parser.add_argument("--networks", nargs="+", default=list(CASES), choices=list(CASES), help="networks to time")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    devices, report = start(args, "train-step time per normalization choice")
    for device in devices:
        for name in args.networks:
            options, batch, size, _ = CASES[name]
            results = measure(name, device, args.repeats)
            report["results"].append({"device": device_label(device), "network": name, "options": options,
                                      "batch": batch, "input_size": size, "variants": results})
            print(f"{device.type} {name} {options} batch {batch} at {size}px: " + ", ".join(
                f"{v} {r['ms']:.1f} ms ({r['ratio']:.2f}x)" for v, r in results.items()))
    finish(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
