"""Does the triforce draw what the caption says? Colours and shape kind of its pictures, for seen and held-out
combinations.

    python scripts/bench/triforce_colors.py --dvae experiments/triforce_dvae_shapes \\
        --dalle experiments/triforce_dalle_shapes --diffusion experiments/triforce_diffusion_shapes \\
        --captions 60 --json triforce_colors.json

Captions come from the ``shapes`` dataset (variant 2, scenes no run trained or validated on): ``--captions`` of
combinations the transformer saw in training and as many of the held-out combinations (``--holdout``; by default
the ``holdout`` its training tokens were extracted with, read from their manifest). Each caption goes through
scripts/triforce_sample.py's pipeline (``--n`` samples, seed ``--seed``, its sampling options, guidance 3 unless
``--guidance-scale`` says otherwise); every final picture is read by
``dlas.data.shapes.classify_image``, which names the palette colour nearest the median of the border
(background) and of the pixels most unlike it (the shape), and fits the four outlines. Reported per group: the
share of pictures whose background colour, shape colour, both colours and shape kind are the caption's, for the
upsampled picture and for the dVAE decode it came from. Prints ``os.getloadavg()`` with the numbers.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
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
    fields = ("caption", "color", "background", "shape")
    return {name: [{key: data[i][key] for key in fields} for i in range(count)] for name, data in groups.items()}


def score(images: torch.Tensor, item: dict[str, str]) -> dict[str, int]:
    hits = dict.fromkeys(CHECKS, 0)
    for image in images:
        seen = classify_image(image)
        for check, keys in CHECKS.items():
            hits[check] += all(seen[k] == item[k] for k in keys)
    return hits


def main(argv: list[str] | None = None) -> int:
    triforce = load_pipeline_module()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    triforce.add_pipeline_arguments(parser)  # the run folders and the sampling options, as triforce_sample.py's
    parser.set_defaults(guidance_scale=3.0)
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
    results: dict[str, dict[str, dict[str, float]]] = {}
    for group, items in captions(holdout, args.captions).items():
        totals = {"upsampled": dict.fromkeys(CHECKS, 0), "decode": dict.fromkeys(CHECKS, 0)}
        for item in items:
            decodes, images = pipeline(item["caption"], args.seed, args.n)
            for kind, pictures in (("upsampled", images), ("decode", decodes)):
                for check, hits in score(pictures, item).items():
                    totals[kind][check] += hits
        pictures = len(items) * args.n
        results[group] = {kind: {check: hits / pictures for check, hits in counts.items()}
                          for kind, counts in totals.items()}
    seconds = time.perf_counter() - start
    load = os.getloadavg()
    print(f"triforce colours: {args.captions} captions per group x {args.n} sample(s), seed {args.seed}, guidance "
          f"{args.guidance_scale}, temperature {args.temperature}, top-k {args.top_k}; "
          f"held out: {', '.join(holdout) or '(none)'}")
    print(f"{seconds:.0f} s, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'group':<10}{'picture':<11}" + "".join(f"{c:>14}" for c in CHECKS))
    for group, kinds in results.items():
        for kind, rates in kinds.items():
            print(f"{group:<10}{kind:<11}" + "".join(f"{rates[c]:>14.1%}" for c in CHECKS))
    if args.json:
        Path(args.json).write_text(json.dumps({"captions_per_group": args.captions, "samples": args.n,
                                               "seed": args.seed, "guidance_scale": args.guidance_scale,
                                               "temperature": args.temperature, "top_k": args.top_k,
                                               "holdout": holdout, "seconds": seconds, "load_average": load,
                                               "rates": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
