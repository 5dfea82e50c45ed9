"""Does the triforce draw what the caption says? Colours and shape kind of its pictures, for seen and held-out
combinations.

    python scripts/bench/triforce_colors.py --dvae experiments/triforce_dvae_shapes \\
        --dalle experiments/triforce_dalle_shapes --diffusion experiments/triforce_diffusion_shapes \\
        --captions 100 --seed 1 --json triforce_colors.json

Captions come from the ``shapes`` dataset (variant 2, scenes no run trained or validated on): ``--captions`` of
combinations the transformer saw in training and as many of the held-out combinations (``--holdout``; by default
the ``holdout`` its training tokens were extracted with, read from their manifest). Each caption goes through
scripts/triforce_sample.py's pipeline (``--n`` samples, seed ``--seed``, its sampling options; by default the dalle
run's own, for the shapes recipe guidance 1.5 at temperature 0.5, the best of the sweep in docs/dalle.md); every
final picture is read by ``dlas.data.shapes.classify_image``, which names the palette colour nearest the median of
the border (background) and of the pixels most unlike it (the shape), and fits the four outlines. Reported per
group: the share of pictures whose background colour, shape colour, both colours and shape kind are the caption's,
for the upsampled picture and for the dVAE decode it came from, and the upsampled pictures' rates by the shape's
size (small shapes cover about 2 x 2 of the 8 x 8 tokens). Prints ``os.getloadavg()`` with the numbers; ``--json``
also keeps each caption with what its pictures show.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import yaml

from dlas.build import select_device
from dlas.cli.test import report_user_errors
from dlas.data.shapes import ShapesDataset, classify_image
from dlas.errors import ConfigError, UserError

SCRIPTS = Path(__file__).resolve().parents[1]
CHECKS = {"background": ("background",), "shape colour": ("color",), "both colours": ("color", "background"),
          "shape kind": ("shape",)}


def load_pipeline_module():
    spec = importlib.util.spec_from_file_location("triforce_sample", SCRIPTS / "triforce_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trained_holdout(dalle_run: Path) -> list[str]:
    """The ``holdout`` the dalle run's training tokens were extracted with (their manifest's source dataset)."""
    config = yaml.safe_load((dalle_run / "config.yml").read_text())
    paths = ((config.get("datasets") or {}).get("train") or {}).get("paths") or []
    for path in paths:
        for base in (Path(path), dalle_run.resolve().parent.parent / path):
            manifest = base / "manifest.json"
            if manifest.is_file():
                return list(json.loads(manifest.read_text())["source"]["dataset"].get("holdout") or [])
    raise ConfigError(f"cannot find the training tokens' manifest of {dalle_run} (datasets.train.paths); give the "
                      "held-out combinations with --holdout", "--holdout")


def captions(holdout: list[str], count: int) -> dict[str, list[dict[str, str]]]:
    """``count`` items of seen and of held-out combinations: their captions and attributes."""
    groups = {"seen": ShapesDataset(count=count, holdout=holdout, split="train", variant=2, new_each_epoch=False)}
    if holdout:
        groups["held-out"] = ShapesDataset(count=count, holdout=holdout, split="holdout", variant=2,
                                           new_each_epoch=False)
    fields = ("caption", "color", "background", "shape", "size")
    return {name: [{key: data[i][key] for key in fields} for i in range(count)] for name, data in groups.items()}


def score(readings: list[dict[str, str]], item: dict[str, str]) -> dict[str, int]:
    """How many of the pictures' readings (``classify_image``) pass each check against the caption's item."""
    return {check: sum(all(seen[k] == item[k] for k in keys) for seen in readings) for check, keys in CHECKS.items()}


def rates(records: list[dict], kind: str) -> dict[str, float]:
    """The share of the ``kind`` pictures (``upsampled`` or ``decode``) of ``records`` passing each check."""
    pictures = sum(len(record[kind]) for record in records)
    totals = dict.fromkeys(CHECKS, 0)
    for record in records:
        for check, hits in score(record[kind], record).items():
            totals[check] += hits
    return {check: hits / max(1, pictures) for check, hits in totals.items()}


def summarize(records: list[dict]) -> tuple[dict, dict]:
    """Per group, the rates of both kinds of picture, and the upsampled pictures' rates per shape size."""
    results, by_size = {}, {}
    for group in dict.fromkeys(record["group"] for record in records):
        mine = [record for record in records if record["group"] == group]
        results[group] = {kind: rates(mine, kind) for kind in ("upsampled", "decode")}
        by_size[group] = {size: rates([r for r in mine if r["size"] == size], "upsampled")
                          for size in sorted({r["size"] for r in mine})}
    return results, by_size


def main(argv: list[str] | None = None) -> int:
    triforce = load_pipeline_module()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    triforce.add_pipeline_arguments(parser)  # the run folders and the sampling options, as triforce_sample.py's
    parser.add_argument("--captions", type=int, default=60, help="captions per group (default 60)")
    parser.add_argument("--n", type=int, default=1, help="samples per caption (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", action="append", help="a held-out combination (repeatable; default: the "
                                                           "dalle run's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    try:
        holdout = args.holdout if args.holdout is not None else trained_holdout(Path(args.dalle))
        pipeline = triforce.Pipeline(args, select_device(args.device, option="--device"))
    except UserError as exc:
        return report_user_errors(exc)
    start = time.perf_counter()
    readings: list[dict] = []
    for group, items in captions(holdout, args.captions).items():
        for item in items:
            decodes, images = pipeline(item["caption"], args.seed, args.n)
            readings.append({"group": group, **item, "upsampled": [classify_image(p) for p in images],
                             "decode": [classify_image(p) for p in decodes]})
    results, by_size = summarize(readings)
    seconds = time.perf_counter() - start
    load = os.getloadavg()
    sampling = pipeline.sampling
    print(f"triforce colours: {args.captions} captions per group x {args.n} sample(s), seed {args.seed}, guidance "
          f"{sampling['guidance_scale']}, temperature {sampling['temperature']}, top-k {sampling['top_k']}; "
          f"held out: {', '.join(holdout) or '(none)'}")
    print(f"{seconds:.0f} s, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'group':<10}{'picture':<11}" + "".join(f"{c:>14}" for c in CHECKS))
    for group, kinds in results.items():
        for kind, shares in kinds.items():
            print(f"{group:<10}{kind:<11}" + "".join(f"{shares[c]:>14.1%}" for c in CHECKS))
    print("upsampled pictures by the shape's size:")
    for group, sizes in by_size.items():
        for size, shares in sizes.items():
            count = sum(r["size"] == size for r in readings if r["group"] == group)
            print(f"{group:<10}{f'{size} ({count})':<11}" + "".join(f"{shares[c]:>14.1%}" for c in CHECKS))
    if args.json:
        Path(args.json).write_text(json.dumps({"captions_per_group": args.captions, "samples": args.n,
                                               "seed": args.seed, **sampling,
                                               "holdout": holdout, "seconds": seconds, "load_average": load,
                                               "rates": results, "rates_by_size": by_size,
                                               "captions": readings}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
