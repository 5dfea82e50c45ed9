"""The triforce from a caption to a picture: DALL-E tokens -> dVAE decode -> diffusion upsampling -> PNG.

    python scripts/triforce_sample.py --dvae experiments/triforce_dvae_shapes \\
        --dalle experiments/triforce_dalle_shapes --diffusion experiments/triforce_diffusion_shapes \\
        --caption "a large red circle in the center on a blue background" --n 8 --seed 0 --output out/
    python scripts/triforce_sample.py ... --captions captions.txt --steps 50 --guidance-scale 3 --output out/

For each caption the dalle run's transformer writes ``--n`` token grids (the ``dalle`` task: temperature, top-k and
classifier-free guidance as there), the dvae run's dVAE decodes them, and the diffusion run's upsampler (the
``diffusion`` task, with that run's own schedule and ``--steps`` sampling steps) turns each decode into the final,
larger image. Written: ``OUTPUT/<caption>_seed<S>_<k>.png`` per sample (``--save-decodes``: also ``..._<k>_decode.png``
before upsampling), and ``OUTPUT/grid.png`` with one row per caption. The same seed gives the same pictures:
sample k of a caption upsamples with seed ``S * 1000 + k``.

The transformer samples as the dalle run's own evaluators did (their ``options:``: the shapes recipe's guidance 1.5
at temperature 0.5); ``--temperature``, ``--top-k`` and ``--guidance-scale`` override each. Each run uses its
newest checkpoint's EMA weights (``--no-ema``: the raw ones). ``--captions FILE`` reads one
caption per line (blank lines and ``#`` comments skipped). Exit codes: 0 done; 2 a wrong or incomplete run folder
(named with its flag), bad arguments or an unknown caption word; 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torchvision.utils import make_grid

from dlas.build import RunNetworks, autocast, select_device
from dlas.cli.test import caption_stem, report_user_errors
from dlas.errors import ConfigError, UserError
from dlas.inference import save_image
from dlas.inference.tasks import Request, build_task, recipe_task_options


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The options :class:`Pipeline` reads: the three run folders and how to sample them."""
    parser.add_argument("--dvae", required=True, metavar="RUN", help="the dVAE's run folder (experiments/NAME)")
    parser.add_argument("--dalle", required=True, metavar="RUN", help="the DALL-E transformer's run folder")
    parser.add_argument("--diffusion", required=True, metavar="RUN", help="the diffusion upsampler's run folder")
    parser.add_argument("--steps", help="diffusion sampling steps: a count, ddimN or a,b,c (default: the run's)")
    parser.add_argument("--temperature", type=float,
                        help="the transformer's sampling temperature (default: the dalle run's, else 1)")
    parser.add_argument("--top-k", type=int, help="sample image tokens among the k most likely only "
                                                  "(default: the dalle run's, else all)")
    parser.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance of the transformer (default: the dalle run's, else none)")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_arguments(parser)
    parser.add_argument("--caption", action="append", default=[], help="a caption (repeatable)")
    parser.add_argument("--captions", metavar="FILE", help="a text file with one caption per line")
    parser.add_argument("--n", type=int, default=8, help="samples per caption (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="the seed (default 0)")
    parser.add_argument("--save-decodes", action="store_true", help="also write each dVAE decode")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--output", required=True, help="the folder to write the PNGs into")
    return parser.parse_args(argv)


def read_captions(args: argparse.Namespace) -> list[str]:
    captions = list(args.caption)
    if args.captions:
        file = Path(args.captions)
        if not file.is_file():
            raise ConfigError(f"no such file: {file}", "--captions")
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
        captions += [line for line in lines if line and not line.startswith("#")]
    if not captions:
        raise ConfigError("give at least one --caption TEXT or a --captions FILE", "--caption")
    if args.n < 1:
        raise ConfigError(f"must be at least 1, got {args.n}", "--n")
    return captions


def load_run(folder: str, flag: str, kind: str, ema: bool, device: torch.device) -> tuple[RunNetworks, str]:
    """A run's networks and the name of its network of type ``kind``; a wrong or incomplete folder is a
    ConfigError naming ``flag``."""
    try:
        networks = RunNetworks(folder, ema=ema, device=device)
        entries: Mapping[str, Any] = networks.config.get("networks") or {}
        name = next((n for n, e in entries.items() if isinstance(e, dict) and e.get("type") == kind), None)
        if name is None:
            raise ConfigError(f"the run has no {kind} network (it has: {', '.join(entries) or 'none'})", flag)
        networks.load(name, flag)  # build and load now, so a missing weights file is reported as this run's
    except UserError as exc:
        raise ConfigError(f"{folder}: {exc.problems[0].message}", flag) from None
    return networks, name


class Pipeline:
    """The three runs chained: ``pipeline(caption, seed, count) -> (decodes, images)``."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        dvae_run, dvae = load_run(args.dvae, "--dvae", "dvae", args.ema, device)
        dalle_run, dalle = load_run(args.dalle, "--dalle", "dalle", args.ema, device)
        diffusion_run, diffusion = load_run(args.diffusion, "--diffusion", "diffusion_unet", args.ema, device)
        codes = int(dvae_run.config["networks"][dvae].get("codebook_size", 512))
        vocabulary = int(dalle_run.config["networks"][dalle].get("image_vocab_size", 512))
        if codes != vocabulary:
            raise ConfigError(f"the transformer writes tokens of a {vocabulary}-code vocabulary, but the dVAE of "
                              f"{args.dvae} has {codes} codes: they were not trained together", "--dalle")
        precision = autocast("fp32", device)
        # sampled as the dalle run's own evaluators sample it, unless a flag says otherwise
        _, recipe = recipe_task_options(dalle_run.config, "dalle", dalle)
        given = {"temperature": args.temperature, "top_k": args.top_k, "guidance_scale": args.guidance_scale}
        self.sampling = {"temperature": 1.0, "top_k": None, "guidance_scale": None,
                         **{k: v for k, v in recipe.items() if k in given},
                         **{k: v for k, v in given.items() if v is not None}}
        options = {"network": dalle, "dvae": dvae, **self.sampling}
        # the dalle run's transformer with the dvae run's decoder (the dalle run's own copy may differ)
        self.tokens_to_images = build_task("dalle", {dalle: dalle_run[dalle], dvae: dvae_run[dvae]},
                                           dalle_run.config, device, precision, options, "dalle")
        upsampling = {"network": diffusion, **({"steps": _steps(args.steps)} if args.steps else {})}
        try:
            self.upsample = build_task("diffusion", {diffusion: diffusion_run[diffusion]}, diffusion_run.config,
                                       device, precision, upsampling, "diffusion")
        except ConfigError as exc:
            if exc.problems[0].path.endswith("steps"):
                raise ConfigError(exc.problems[0].message, "--steps") from None
            raise

    def __call__(self, caption: str, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        decodes = self.tokens_to_images(Request(caption_stem(caption, seed), caption=caption, seed=seed,
                                                count=count)).clamp(0, 1)
        images = [self.upsample(Request(f"{caption_stem(caption, seed)}_{k}", image=decode, seed=seed * 1000 + k))
                  for k, decode in enumerate(decodes)]
        return decodes, torch.cat(images).clamp(0, 1)


def _steps(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def run(args: argparse.Namespace) -> int:
    captions = read_captions(args)
    device = select_device(args.device, option="--device")
    pipeline = Pipeline(args, device)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output} is a file; --output is a folder", "--output")
    output.mkdir(parents=True, exist_ok=True)
    print("sampling: " + ", ".join(f"{k} {v}" for k, v in pipeline.sampling.items()))
    rows = []
    for caption in captions:
        try:
            decodes, images = pipeline(caption, args.seed, args.n)
        except ValueError as exc:  # a caption the tokenizer or the shapes vocabulary cannot read
            raise ConfigError(f"'{caption}': {exc}", "--caption") from None
        stem = caption_stem(caption, args.seed)
        for k, image in enumerate(images):
            save_image(output / f"{stem}_{k}.png", image)
            if args.save_decodes:
                save_image(output / f"{stem}_{k}_decode.png", decodes[k])
        rows.append(images)
        print(f"{caption!r}: {len(images)} images -> {output / stem}_*.png")
    # one row per caption, its samples left to right, on white
    save_image(output / "grid.png", make_grid(torch.cat(rows), nrow=args.n, padding=2, pad_value=1.0))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        return report_user_errors(exc)


if __name__ == "__main__":
    sys.exit(main())
