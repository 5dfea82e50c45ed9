"""Issue 15's comparison: held-out reconstruction PSNR of the switched VAE, its plain twin and the plain VAE
converted to switched half-way, at equal training steps, with parameters and step time.

    python scripts/bench/switched_vae.py --json switched_vae.json          # the recipes as they are (800 steps)
    python scripts/bench/switched_vae.py --steps 100 --root /tmp/quick     # a quick look

Trains, in one folder (``--root``, default ``experiments/bench_switched_vae``):
  1. options/plain_vae.yml for N steps (it keeps its checkpoint at N/2);
  2. options/switched_vae.yml for N steps;
  3. options/switched_vae_from_plain.yml: plain step N/2, converted, then N/2 switched steps (N in all);
  4. the control: the same from plain step N/2 (fresh Adam, the same learning-rate restart) but kept plain.
A run whose final checkpoint exists is not trained again (delete its folder to redo it). PSNR/SSIM are the
``reconstruction`` evaluator's (EMA weights, RGB, whole held-out images) at the last step; step time is the
median of the logged ``perf/samples_per_sec`` over the run (so the validation passes are left out), which on a
shared machine moves with its load: the load average is printed and saved with each run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# name -> (recipe, extra overrides). The control restarts the plain VAE exactly as the conversion does (fresh
# Adam, the same learning-rate schedule) but keeps it plain: what the restart alone is worth.
RUNS = {"plain_vae": ("plain_vae", []), "switched_vae": ("switched_vae", []),
        "switched_vae_from_plain": ("switched_vae_from_plain", []),
        "plain_vae_restarted": ("switched_vae_from_plain", ["name=plain_vae_restarted",
                                                            "networks.generator.num_experts=1"])}
HALF_RUNS = ("switched_vae_from_plain", "plain_vae_restarted")  # start from plain_vae's step N/2


def overrides(run: str, steps: int, root: Path) -> list[str]:
    half = steps // 2
    niter = half if run in HALF_RUNS else steps
    args = [f"path.root={root}", f"train.niter={niter}", f"train.lr_scheduler.periods=[{niter}]",
            f"train.val_freq={max(niter // 2, 1)}", f"logger.save_checkpoint_freq={half}",
            f"logger.visual_freq={half}"]
    if run in HALF_RUNS:
        args.append(f"path.pretrain_model_generator={root}/plain_vae/checkpoints/{half}/generator.safetensors")
    return args


def train(run: str, steps: int, root: Path, extra: list[str]) -> dict:
    folder = root / run
    recipe, extra_run = RUNS[run]
    niter = steps // 2 if run in HALF_RUNS else steps
    started = time.time()
    load = os.getloadavg()[0]
    if not (folder / "checkpoints" / str(niter) / "manifest.json").is_file():
        command = [sys.executable, str(REPO / "codes" / "train.py"), "-opt", str(REPO / "options" / f"{recipe}.yml"),
                   *overrides(run, steps, root), *extra_run, *extra]
        print("+", " ".join(command), flush=True)
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"{run}.console.txt", "w") as console:  # the progress bar; train.log has the rest
            subprocess.run(command, check=True, cwd=REPO, stdout=console, stderr=subprocess.STDOUT)
    wall = time.time() - started
    return {"run": run, "steps": niter, "wall_s": wall, "loadavg_at_start": load, "loadavg_at_end": os.getloadavg()[0],
            **read_run(folder, niter)}


def read_run(folder: Path, niter: int) -> dict:
    import torch

    from dlas.build import build_network, read_run_config

    metrics = json.loads((folder / "val" / str(niter) / "metrics.json").read_text())
    log = (folder / "train.log").read_text()
    rates = [float(v) for v in re.findall(r"perf/samples_per_sec=([0-9.eE+-]+)", log)]
    cfg = read_run_config(folder)
    batch = cfg["datasets"]["train"]["batch_size"]
    torch.manual_seed(0)
    net = build_network(cfg, "generator")
    halfway = folder / "val" / str(niter // 2) / "metrics.json"
    return {"psnr": metrics.get("recon/psnr"), "ssim": metrics.get("recon/ssim"),
            "psnr_halfway": json.loads(halfway.read_text()).get("recon/psnr") if halfway.is_file() else None,
            "parameters": sum(p.numel() for p in net.parameters()),
            "step_s": batch / statistics.median(rates) if rates else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="N: training steps of each VAE (default 800)")
    parser.add_argument("--root", default=str(REPO / "experiments" / "bench_switched_vae"))
    parser.add_argument("--set", nargs="*", default=[], help="more key=value overrides for all three runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = Path(args.root).resolve()
    results = [train(run, args.steps, root, args.set) for run in RUNS]
    plain = results[0]
    print(f"\nheld-out reconstruction (coffee, chelsea, motorcycle_right; EMA weights) after {args.steps} steps")
    print(f"{'run':<26} {'steps':>12} {'PSNR dB':>8} {'SSIM':>7} {'params':>10} {'s/step':>7} {'vs plain':>9} "
          f"{'load':>5}")
    for r in results:
        steps = f"{args.steps // 2}+{r['steps']}" if r["run"] in HALF_RUNS else str(r["steps"])
        ratio = r["step_s"] / plain["step_s"] if r["step_s"] and plain["step_s"] else float("nan")
        print(f"{r['run']:<26} {steps:>12} {r['psnr']:8.2f} {r['ssim']:7.4f} {r['parameters']:>10,} "
              f"{r['step_s']:7.3f} {ratio:8.2f}x {r['loadavg_at_end']:5.1f}")
    print(f"plain_vae at step {args.steps // 2} (where the conversion starts): PSNR {plain['psnr_halfway']:.2f} dB")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
