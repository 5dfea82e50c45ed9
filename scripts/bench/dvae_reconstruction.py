"""How well a trained dVAE run reconstructs: held-out shapes, photographs, codebook usage, perplexity, wall time.

    python scripts/bench/dvae_reconstruction.py --run experiments/triforce_dvae_shapes [--count 512] [--json out.json]

Reported, for the EMA weights and the raw weights of the newest checkpoint (ratios in the same run, since the
machine may be shared):

* PSNR (RGB, uint8 as saved, the ``reconstruction`` evaluator's convention) on ``--count`` held-out scenes of the
  run's validation dataset (``datasets.val``, the training set's variant never drawn) and on the scikit-image
  photographs (``--photos``), each resized (shorter side) and centre-cropped to ``--photo-size`` pixels, plus the
  PSNR of predicting the mean image of the held-out scenes (a floor: a model that learnt nothing);
* caption agreement (shapes with one shape per scene): the fraction of reconstructions in which
  ``dlas.data.shapes.classify_image`` still reads each of the scene's attributes (colour, kind, ...);
* codebook usage (fraction of codes the held-out tokens use) and perplexity (exp entropy of their histogram);
* from ``train.log``: the training wall time (first to last line) and the last logged windowed usage/perplexity.

The load average is printed with the numbers: on a shared CPU, wall times say little without it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from dlas.build import RunNetworks, build_datasets
from dlas.data.file_index import skimage_images
from dlas.data.image_file import read_image
from dlas.data.shapes import ATTRIBUTES, classify_image
from dlas.data.text_image import center_crop, shorter_side_to
from dlas.errors import UserError
from dlas.metrics import psnr
from dlas.metrics.convention import tensor_to_uint8


def mean_psnr(originals: torch.Tensor, rebuilt: torch.Tensor) -> float:
    return float(np.mean([psnr(tensor_to_uint8(r), tensor_to_uint8(o)) for o, r in zip(originals, rebuilt)]))


def code_statistics(tokens: torch.Tensor, codebook_size: int) -> dict[str, float]:
    counts = torch.bincount(tokens.flatten(), minlength=codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    return {"codebook_usage": float((counts > 0).double().mean()), "perplexity": math.exp(float(-(p * p.log()).sum()))}


def photos(names: str, size: int) -> torch.Tensor:
    images = [shorter_side_to(read_image(file), size) for file in skimage_images(names, "--photos")]
    return torch.stack([torch.from_numpy(np.ascontiguousarray(center_crop(i, size).transpose(2, 0, 1)))
                        for i in images])


def training_log(run: Path) -> dict[str, float]:
    """Wall time of training (first to last timestamped line of train.log) and the last logged debug values."""
    file = run / "train.log"
    if not file.is_file():
        return {}
    text = file.read_text()
    stamps = [datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S") for line in text.splitlines()
              if re.match(r"\d{4}-\d\d-\d\d ", line)]
    out: dict[str, float] = {"train_wall_s": (stamps[-1] - stamps[0]).total_seconds()} if len(stamps) > 1 else {}
    for key in ("codebook_usage", "perplexity"):
        found = [float(m.group(1)) for m in re.finditer(rf"debug/\w+/{key}=([\d.e+-]+)", text)]
        if found:
            out[f"train_window_{key}"] = found[-1]
    return out


def caption_agreement(rebuilt: torch.Tensor, attributes: list[dict[str, str]]) -> dict[str, float]:
    """Per attribute, the fraction of reconstructions whose pixels (``classify_image``) still show the caption's
    value; ``all``: every attribute right. Only for one-shape scenes."""
    read = [classify_image(image) for image in rebuilt]
    out = {key: float(np.mean([r[key] == a[key] for r, a in zip(read, attributes)])) for key in ATTRIBUTES}
    out["all"] = float(np.mean([all(r[k] == a[k] for k in ATTRIBUTES) for r, a in zip(read, attributes)]))
    for size in sorted({a["size"] for a in attributes}):  # the kind is what a coarse token grid loses first
        kept = [r["shape"] == a["shape"] for r, a in zip(read, attributes) if a["size"] == size]
        out[f"shape ({size})"] = float(np.mean(kept))
    return out


def measure(run: Path, ema: bool, held_out: torch.Tensor, photo_batch: torch.Tensor,
            attributes: list[dict[str, str]] | None) -> dict[str, float]:
    networks = RunNetworks(run, ema=ema)
    name = next(n for n, c in networks.config["networks"].items() if c.get("type") == "dvae")
    dvae = networks[name]
    with torch.no_grad():
        tokens = torch.cat([dvae.encode(held_out[i:i + 64]) for i in range(0, len(held_out), 64)])
        rebuilt = torch.cat([dvae.decode(tokens[i:i + 64]) for i in range(0, len(tokens), 64)])
        photo_rebuilt = dvae.reconstruct(photo_batch)
    result = {"step": networks.step, "shapes_psnr": mean_psnr(held_out, rebuilt),
              "photos_psnr": mean_psnr(photo_batch, photo_rebuilt), **code_statistics(tokens, dvae.codebook_size)}
    if attributes:
        result["caption_agreement"] = caption_agreement(rebuilt, attributes)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a dVAE run folder (experiments/NAME)")
    parser.add_argument("--count", type=int, default=512, help="held-out scenes to reconstruct (default 512)")
    parser.add_argument("--photos", default="color", help="scikit-image photographs (default: the nine colour ones)")
    parser.add_argument("--photo-size", type=int, default=64, help="photo side after resize and crop (default 64)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    run = Path(args.run)
    try:
        config = RunNetworks(run).config
        val = dict(config["datasets"]["val"], count=args.count)
        dataset = build_datasets({**config, "datasets": {"val": val}})["val"]
        items = [dataset[i] for i in range(len(dataset))]
        held_out = torch.stack([item["hq"] for item in items])
        single = all(" and " not in item.get("shape", " and ") for item in items)  # shapes scenes of one shape
        attributes = [{k: item[k] for k in ATTRIBUTES} for item in items] if single else None
        photo_batch = photos(args.photos, args.photo_size)
        results = {label: measure(run, ema, held_out, photo_batch, attributes)
                   for label, ema in (("ema", True), ("raw", False))}
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    floor = float(np.mean([psnr(tensor_to_uint8(held_out.mean(0)), tensor_to_uint8(h)) for h in held_out]))
    report = {"run": str(run), "load_average": os.getloadavg(), "held_out": len(held_out),
              "photos": len(photo_batch), "photo_size": args.photo_size, "mean_image_psnr": floor, **results,
              **training_log(run)}
    print(f"{run} (step {results['ema']['step']}), load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'weights':8} {'shapes PSNR':>12} {'photos PSNR':>12} {'usage':>7} {'perplexity':>11}")
    for label, r in results.items():
        print(f"{label:8} {r['shapes_psnr']:12.2f} {r['photos_psnr']:12.2f} {r['codebook_usage']:7.3f} "
              f"{r['perplexity']:11.1f}")
    if attributes:
        print("reconstructions whose pixels still show the caption (classify_image): " + ", ".join(
            f"{k} {v:.3f}" for k, v in results["ema"]["caption_agreement"].items()) + " (EMA)")
    print(f"mean image of the held-out scenes: {floor:.2f} dB; {len(held_out)} scenes, {len(photo_batch)} photos at "
          f"{args.photo_size} px")
    if "train_wall_s" in report:
        print(f"training wall time {report['train_wall_s'] / 60:.1f} min; last logged window: usage "
              f"{report.get('train_window_codebook_usage', float('nan')):.3f}, perplexity "
              f"{report.get('train_window_perplexity', float('nan')):.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
