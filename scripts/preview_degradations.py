"""Write the first N LQ/HQ pairs a config's dataset produces, to see what the network will be trained on.

    python scripts/preview_degradations.py -opt options/x.yml [--dataset train] [-n 16] [--out DIR] [key=value ...]

The dataset is built exactly as training builds it (same options, same ``seed``) and the items are taken in
the order the training sampler hands them out on one rank, so ``000`` is the first sample of the run. For
each item it writes ``NNN_lq.png``, ``NNN_hq.png`` and ``NNN_side.png`` (LQ enlarged with nearest-neighbour
next to HQ). Trailing ``key=value`` overrides work as in ``train.py``. Default output folder:
``experiments/NAME/preview_DATASET``. Exit codes: 0 done, 2 bad config or data, 1 anything else.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dlas import build
from dlas.config import load_config
from dlas.data.collate import wants_epoch_keys
from dlas.data.image_file import write_image
from dlas.data.sampler import ResumableSampler
from dlas.errors import ConfigError, UserError


def build_dataset(cfg: dict[str, Any], name: str) -> Any:
    if name not in cfg["datasets"]:
        raise ConfigError(f"no dataset '{name}'; the config has: {', '.join(cfg['datasets']) or 'none'}", "--dataset")
    return build.build_datasets(cfg, [name])[name]


def side_by_side(lq: np.ndarray, hq: np.ndarray) -> np.ndarray:
    factor = max(1, hq.shape[0] // lq.shape[0])
    enlarged = lq.repeat(factor, axis=0).repeat(factor, axis=1)
    height = max(enlarged.shape[0], hq.shape[0])
    canvas = np.ones((height, enlarged.shape[1] + 4 + hq.shape[1], 3), np.float32)
    canvas[:enlarged.shape[0], :enlarged.shape[1]] = enlarged
    canvas[:hq.shape[0], enlarged.shape[1] + 4:] = hq
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-opt", "--opt", required=True, metavar="FILE.yml", help="the training config")
    parser.add_argument("--dataset", default="train", help="which entry of datasets: (default train)")
    parser.add_argument("-n", type=int, default=16, help="how many pairs to write (default 16)")
    parser.add_argument("--out", help="output folder (default experiments/NAME/preview_DATASET)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train.py")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.n < 1:
        print("preview_degradations: -n must be at least 1", file=sys.stderr)
        return 2
    cfg: Any = {}
    out: Any = args.out
    try:
        cfg = load_config(args.opt, args.overrides, training=False)  # only the datasets matter here
        dataset = build_dataset(cfg, args.dataset)
        sampler = ResumableSampler(len(dataset), shuffle=cfg["datasets"][args.dataset]["shuffle"], seed=cfg["seed"],
                                   epoch_keys=wants_epoch_keys(dataset))
        out = Path(args.out or Path(cfg["path"]["root"]) / cfg["name"] / f"preview_{args.dataset}")
        out.mkdir(parents=True, exist_ok=True)
        keys = iter(sampler)
        for i in range(args.n):
            item = dataset[next(keys)]
            lq = item["lq"].permute(1, 2, 0).numpy()
            hq = item["hq"].permute(1, 2, 0).numpy()
            write_image(str(out / f"{i:03d}_lq.png"), lq)
            write_image(str(out / f"{i:03d}_hq.png"), hq)
            write_image(str(out / f"{i:03d}_side.png"), side_by_side(lq, hq))
    except UserError as exc:
        # The resolved config knows each key's file and line; the dataset only knows the dotted key.
        problems = cfg.attach_lines(exc.problems) if hasattr(cfg, "attach_lines") else exc.problems
        for problem in problems:
            print(f"preview_degradations: {problem}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output folder cannot be created or written
        print(f"preview_degradations: cannot write '{exc.filename or out}': {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} LQ/HQ pairs of dataset '{args.dataset}' to {out}")
    if getattr(dataset, "bad_count", 0):
        print(f"({dataset.bad_count} unusable images were skipped; see the warnings above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
