"""ONNX export of the SR generators: export time, agreement with PyTorch, and onnxruntime vs PyTorch CPU speed.

    python scripts/bench/onnx_speed.py [--size 64] [--repeats 3] [--threads N] [--networks compact_sr rrdbnet]
                                       [--json PATH]

For each network (``compact_sr`` and ``rrdbnet`` at their default sizes, randomly initialised, every weight
perturbed so that no layer is zero) it exports with scripts/export_onnx.py's exporter call (dynamic batch, height
and width), then runs PyTorch and onnxruntime on the same ``--size`` pixel crop of scikit-image's coffee
photograph, with the same number of threads, after one warm-up run each: the median of ``--repeats`` runs, and
their ratio measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from dlas.registry import NETWORKS

ROOT = Path(__file__).resolve().parents[2]
NETWORK_CONFIGS = {"compact_sr": {"type": "compact_sr"}, "rrdbnet": {"type": "rrdbnet"}}


def exporter():
    spec = importlib.util.spec_from_file_location("export_onnx", ROOT / "scripts" / "export_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up: allocations, onnxruntime's first-run planning
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per runtime (default 3)")
    parser.add_argument("--networks", nargs="+", default=list(NETWORK_CONFIGS), choices=list(NETWORK_CONFIGS))
    parser.add_argument("--threads", type=int, help="threads of each runtime (default: torch's default)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.size < 8 or args.repeats < 1:
        print("onnx_speed: --size must be >= 8 and --repeats >= 1", file=sys.stderr)
        return 2
    import onnxruntime

    export_onnx = exporter()
    image, _ = export_onnx.check_image(export_onnx.CHECK_IMAGE, args.size, 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    results = {}
    folder = Path(tempfile.mkdtemp(prefix="dlas_bench_onnx_"))
    for name in args.networks:
        torch.manual_seed(0)
        net = NETWORKS.build(dict(NETWORK_CONFIGS[name]), name).eval()
        with torch.no_grad():  # no zero-initialised layer (compact_sr's last): every layer must matter
            for parameter in net.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        file = folder / f"{name}.onnx"
        start = time.perf_counter()
        export_onnx.export(net, torch.cat([image, image])[..., : args.size // 2, : args.size // 2], file, None, name)
        export_seconds = time.perf_counter() - start
        session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        feed = {"input": image.numpy()}
        with torch.no_grad():
            reference = net(image).numpy()
            torch_seconds = median_seconds(partial(net, image), args.repeats)
        onnx_seconds = median_seconds(partial(session.run, None, feed), args.repeats)
        difference = float(np.abs(session.run(None, feed)[0] - reference).max())
        results[name] = {"parameters": sum(p.numel() for p in net.parameters()), "export_s": export_seconds,
                         "max_abs_difference": difference, "torch_s": torch_seconds, "onnxruntime_s": onnx_seconds,
                         "onnx_mb": file.stat().st_size / 2**20}
    load = os.getloadavg()
    print(f"{args.size}x{args.size} input (center of skimage coffee), {threads} threads each, median of "
          f"{args.repeats} warm runs; {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'network':<12}{'params':>11}{'export s':>10}{'max |diff|':>12}{'PyTorch s':>11}{'ORT s':>9}"
          f"{'ORT speed-up':>14}")
    for name, r in results.items():
        print(f"{name:<12}{r['parameters']:>11,}{r['export_s']:>10.1f}{r['max_abs_difference']:>12.1e}"
              f"{r['torch_s']:>11.3f}{r['onnxruntime_s']:>9.3f}{r['torch_s'] / r['onnxruntime_s']:>13.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "threads": threads, "results": results,
                                               "loadavg": load}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
