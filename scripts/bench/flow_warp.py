"""Speed of ``dlas.models.ops.flow_warp`` against a straightforward warp, forward and forward+backward.

    python scripts/bench/flow_warp.py [--repeats 20] [--device cpu cuda] [--json PATH]

The straightforward warp is how such helpers are usually written (BasicSR's ``flow_warp`` has this shape): a
pixel meshgrid built on every call, the flow added to it, each coordinate normalised by its own ops, the two
stacked again, then ``grid_sample(align_corners=True)``. ``flow_warp`` broadcasts two 1-D rows of normalised
pixel centres against the scaled flow in one add per axis and stacks once. Both give the same result (checked).
The two are timed alternately in the same run (the fastest call of each counts), so the ratio holds on a noisy,
shared machine; CUDA times are synchronised. Bilinear, zero padding, random flows of a few pixels.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from harness import add_options, device_label, finish, start, timed

from dlas.models.ops import flow_warp

SHAPES = [(16, 3, 64, 64), (8, 64, 64, 64), (4, 3, 256, 256), (1, 3, 1024, 1024)]


def straightforward_warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    height, width = image.shape[-2:]
    grid_y, grid_x = torch.meshgrid(torch.arange(height, device=image.device),
                                    torch.arange(width, device=image.device), indexing="ij")
    grid = torch.stack((grid_x, grid_y), 2).to(image.dtype)
    coords = grid + flow.permute(0, 2, 3, 1)
    x = 2.0 * coords[..., 0] / max(width - 1, 1) - 1.0
    y = 2.0 * coords[..., 1] / max(height - 1, 1) - 1.0
    return F.grid_sample(image, torch.stack((x, y), dim=3), mode="bilinear", padding_mode="zeros",
                         align_corners=True)


def measure(shape: tuple[int, ...], device: torch.device, repeats: int) -> dict[str, float]:
    generator = torch.Generator(device=device).manual_seed(0)
    image = torch.rand(shape, device=device, generator=generator).requires_grad_()
    flow = ((torch.rand(shape[0], 2, *shape[2:], device=device, generator=generator) - 0.5) * 6).requires_grad_()
    warps = {"flow_warp": flow_warp, "straightforward": straightforward_warp}
    difference = (warps["flow_warp"](image, flow) - warps["straightforward"](image, flow)).abs().max().item()
    if difference > 1e-3:
        raise RuntimeError(f"the two warps disagree by {difference} at {shape}")

    def forward(warp):
        with torch.no_grad():
            warp(image, flow)

    def forward_backward(warp):
        warp(image, flow).sum().backward()

    times: dict[str, list[float]] = {}
    for phase, run in (("forward", forward), ("forward_backward", forward_backward)):
        for warp in warps.values():  # warm-up (allocator, CUDA kernels)
            for _ in range(3):
                run(warp)
        for round_ in range(repeats):
            order = list(warps.items())
            for name, warp in order if round_ % 2 else reversed(order):  # alternate, so load hits both alike
                times.setdefault(f"{phase}/{name}", []).append(timed(run, warp, device=device))
    # The fastest call is the one least disturbed by other processes; medians are kept in the JSON too.
    result = {key: min(values) * 1e3 for key, values in times.items()}
    result |= {f"{key}/median": statistics.median(values) * 1e3 for key, values in times.items()}
    for phase in ("forward", "forward_backward"):
        result[f"{phase}/speedup"] = result[f"{phase}/straightforward"] / result[f"{phase}/flow_warp"]
    result["max_difference"] = difference
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, repeats=20)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    devices, report = start(args, "flow_warp vs a straightforward warp, bilinear/zeros")
    print(f"{'device':<6} {'shape (N, C, H, W)':<22} {'forward ms':>22} {'x':>6} {'fwd+bwd ms':>22} {'x':>6}")
    for device in devices:
        for shape in SHAPES:
            r = measure(shape, device, args.repeats)
            report["results"].append({"device": device_label(device), "shape": list(shape), **r})
            cells = [f"{r[f'{phase}/flow_warp']:>9.3f} vs {r[f'{phase}/straightforward']:>9.3f} "
                     f"{r[f'{phase}/speedup']:>5.2f}x" for phase in ("forward", "forward_backward")]
            print(f"{device.type:<6} {shape!s:<22} {cells[0]} {cells[1]}")
    finish(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
