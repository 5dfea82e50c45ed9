"""``dlas-test`` / ``python codes/test.py``: run a trained network on images, score it, or run evaluators.

Two modes:

* ``--run experiments/NAME --input DIR|FILE --output DIR``: load the run's network from its newest (``--step N``,
  ``--best``) checkpoint, EMA weights by default, upscale every image (tiled with ``--tile``), save PNGs; with
  ``--metrics --reference DIR`` also score against HR images matched by file stem and print a table.
* ``-opt test.yml``: build the ``networks`` (weights from ``path.pretrain_model_NET``), ``datasets`` and ``eval``
  sections of a config, run each evaluator once, print and write ``metrics.json``.

Exit codes: 0 success; 2 bad arguments, config or input (one ``error: …`` line each, no traceback; an unreadable
input image is reported and skipped, the others still run); 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from dlas.errors import ConfigError, DataError, UserError

EXIT_OK, EXIT_USER_ERROR = 0, 2
DEFAULT_METRICS = ["psnr", "ssim"]
SCALE_PROBE_SIZE = 64  # LQ pixels: the corner crop the network's scale is measured on


class Parser(argparse.ArgumentParser):
    """argparse with the project's error convention (a ConfigError: one line, exit code 2)."""

    def error(self, message: str) -> None:  # one "error:" line and exit code 2, like every other user error
        self.print_usage(sys.stderr)
        raise ConfigError(f"{message} (see --help)", "arguments")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options choosing a run's network and checkpoint (shared with ``codes/process_video.py``)."""
    parser.add_argument("--run", metavar="experiments/NAME", help="the run folder to load the network from")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="use the checkpoint of this step (default: the newest)")
    which.add_argument("--best", action="store_true", help="use the checkpoint recorded in checkpoints/best.json")
    parser.add_argument("--network", help="network name in the config (default: the first sr evaluator's, "
                                          "else 'generator')")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=True,
                     help="use NET_ema.safetensors when the checkpoint has it (the default)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw (non-EMA) weights")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Tiling, precision and device options (shared with ``codes/process_video.py``)."""
    parser.add_argument("--tile", type=int, help="process images in tiles of N LQ pixels (bounds memory)")
    parser.add_argument("--tile-overlap", type=int, default=16,
                        help="LQ pixels shared by neighbouring tiles, at most tile/2 (default 16)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="fp32 (default), bf16 (CPU or GPU), fp16 (GPU only)")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA when present), cpu, cuda, cuda:N")


def check_tiling(args: argparse.Namespace) -> None:
    """A ConfigError for a --tile / --tile-overlap pair that cannot work."""
    if args.tile is not None and args.tile < 1:
        raise ConfigError(f"--tile must be at least 1 (LQ pixels per tile side), got {args.tile}", "--tile")
    if args.tile is not None and not 0 <= args.tile_overlap <= args.tile // 2:
        raise ConfigError(f"--tile-overlap must be between 0 and tile/2, got tile {args.tile}, overlap "
                          f"{args.tile_overlap}", "--tile-overlap")


def measure_scale(forward, lq, tile: Optional[int], network: str) -> int:
    """The network's upscaling factor (on a corner crop); a ConfigError naming ``--network`` when it does not
    return an image that is an integer multiple of its input (a discriminator picked by mistake)."""
    from dlas.inference import infer_scale

    try:
        return infer_scale(forward, lq, tile or SCALE_PROBE_SIZE)
    except ValueError as exc:
        raise ConfigError(f"network '{network}' does not upscale images: {exc}; pick the generator with "
                          "--network", "--network") from exc


def report_user_errors(exc: UserError) -> int:
    """Print one ``error:`` line per problem; return exit code 2."""
    for problem in exc.problems:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_USER_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dlas-test", description=__doc__.split("\n\n")[0])
    parser.add_argument("-opt", "--opt", metavar="TEST.yml", help="evaluate with a config's datasets + eval sections")
    add_run_arguments(parser)
    parser.add_argument("--input", metavar="DIR|FILE", help="LQ image or folder of images")
    parser.add_argument("--output", metavar="DIR", help="where to write results")
    add_inference_arguments(parser)
    parser.add_argument("--metrics", nargs="*", choices=["psnr", "ssim", "lpips"], default=None,
                        help="score outputs against --reference (no names: psnr ssim)")
    parser.add_argument("--reference", metavar="DIR", help="HR images, matched to inputs by file stem")
    parser.add_argument("--channel", choices=["y", "rgb"], default="y",
                        help="score the MATLAB BT.601 luma (default, papers' convention) or RGB")
    parser.add_argument("--crop-border", type=int, help="pixels ignored at each edge when scoring (default: scale)")
    parser.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex", help="LPIPS backbone (default alex)")
    parser.add_argument("--lpips-weights", metavar="FILE",
                        help="LPIPS backbone weights (default: torchvision's cache, $TORCH_HOME/hub/checkpoints)")
    parser.add_argument("--temperature", type=float, nargs="+", metavar="T",
                        help="sampling temperature(s) for stochastic networks with sample(lq, temperature); "
                             "several give one grid image per input, left to right")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit code."""
    try:
        args = build_parser().parse_args(argv)
        if args.opt and args.run:
            raise ConfigError("give either -opt TEST.yml or --run experiments/NAME, not both", "arguments")
        if args.opt:
            return evaluate_config(args)
        if args.run:
            return upscale_folder(args)
        raise ConfigError("give --run experiments/NAME --input DIR --output DIR, or -opt TEST.yml", "arguments")
    except UserError as exc:
        return report_user_errors(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------- --run mode
def _match_references(inputs: list[Path], reference: str) -> dict[Path, Path]:
    from dlas.inference import list_images

    by_stem: dict[str, Path] = {}
    for path in list_images(reference):
        if path.stem in by_stem and any(p.stem == path.stem for p in inputs):
            raise DataError(f"'{by_stem[path.stem].name}' and '{path.name}' both match the input of that stem; "
                            "keep one reference per stem", reference)
        by_stem[path.stem] = path
    missing = [p.name for p in inputs if p.stem not in by_stem]
    if missing:
        raise DataError(f"no reference image with the stem of {', '.join(missing[:5])}"
                        f"{' …' if len(missing) > 5 else ''} (references are matched by file name without "
                        "extension)", reference)
    return {p: by_stem[p.stem] for p in inputs}


def _check_output_names(inputs: list[Path], references: dict[Path, Path], output_dir: Path) -> None:
    """Refuse, before any work, outputs that would overwrite each other, an input or a reference image."""
    by_stem: dict[str, Path] = {}
    for path in inputs:
        if path.stem in by_stem:
            raise DataError(f"'{by_stem[path.stem].name}' and '{path.name}' would both be written as "
                            f"{path.stem}.png; rename one", str(path.parent))
        by_stem[path.stem] = path
    protected = {p.resolve(): "input" for p in inputs} | {p.resolve(): "reference" for p in references.values()}
    for stem in by_stem:
        target = output_dir / f"{stem}.png"
        if target.resolve() in protected:
            raise ConfigError(f"the output {target} would overwrite its {protected[target.resolve()]} image; "
                              "choose another --output folder", "--output")


def upscale_folder(args: argparse.Namespace) -> int:
    """The ``--run`` mode: upscale ``--input`` into ``--output`` and optionally score it."""
    import torch
    from tqdm import tqdm

    from dlas.data.image_file import IMAGE_EXTENSIONS
    from dlas.inference import (autocast_context, batch_forward, list_images, load_image, load_trained_network,
                                prepare_output_folder, run_network, save_image, select_device)

    if not args.input or not args.output:
        raise ConfigError("--run needs --input DIR|FILE and --output DIR", "arguments")
    if args.metrics is not None and not args.reference:
        raise ConfigError("--metrics needs --reference DIR with the HR images", "--reference")
    check_tiling(args)
    inputs = list_images(args.input)
    references = _match_references(inputs, args.reference) if args.reference else {}
    output_dir = Path(args.output)
    if not output_dir.is_dir() and output_dir.suffix.lower() in IMAGE_EXTENSIONS:
        raise ConfigError(f"--output is a folder (results are saved as FOLDER/<input stem>.png), got the file name "
                          f"'{args.output}'; give e.g. --output {output_dir.parent / 'results'}", "--output")
    _check_output_names(inputs, references, output_dir)
    device = select_device(args.device)
    prepare_output_folder(output_dir)
    loaded = load_trained_network(args.run, args.network, args.step, args.best, args.ema, device)
    autocast = autocast_context(args.precision or "fp32", device)
    forwards = [batch_forward(loaded.network, t) for t in (args.temperature or [None])]
    print(f"{loaded.name} from {loaded.weights_file} (step {loaded.step}), {len(inputs)} image(s) -> {args.output}")
    scale, scores = None, {}
    scorer = _Scorer(args.metrics or DEFAULT_METRICS, args.channel == "y", args.crop_border, args.lpips_net,
                     args.lpips_weights, device) if references else None
    unreadable = 0
    for path in tqdm(inputs, desc="dlas-test", unit="img", disable=None):
        try:
            lq = load_image(path)[None].to(device)
        except DataError as exc:  # one broken file among many: report it, upscale the others, exit 2 at the end
            report_user_errors(exc)
            unreadable += 1
            continue
        outputs = []
        with torch.no_grad(), autocast():
            if scale is None:  # measured on a small corner crop: cheap, and tiling needs it before the first tile
                scale = measure_scale(forwards[0], lq, args.tile, loaded.name)
            for forward in forwards:
                output = run_network(forward, lq, scale, args.tile, args.tile_overlap)
                outputs.append(output.float().clamp(0, 1)[0].cpu())
        nonfinite = sum(int((~torch.isfinite(output)).sum()) for output in outputs)
        if nonfinite:  # saved as black pixels: say so rather than leave a silently broken image
            print(f"warning: {path.name}: {nonfinite} non-finite output values (NaN/Inf, written as black); the "
                  "network overflowed or diverged (try --precision fp32)", file=sys.stderr)
        save_image(output_dir / f"{path.stem}.png", torch.cat(outputs, dim=-1))
        if scorer:
            for temperature, output in zip(args.temperature or [None], outputs):
                key = path.stem if temperature is None else f"{path.stem} T={temperature:g}"
                scores[key] = scorer(output, references[path], scale)
    if scorer and scores:
        means = _print_table(scores, scorer.convention(scale))
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(
            {"mean": means, "images": scores, "convention": scorer.convention(scale), "step": loaded.step,
             "weights": str(loaded.weights_file)}, indent=1))
    return EXIT_USER_ERROR if unreadable else EXIT_OK


class _Scorer:
    """PSNR/SSIM/LPIPS of one output against its HR file, with the chosen convention."""

    def __init__(self, metrics: list[str], y_channel: bool, crop_border: Optional[int], lpips_net: str,
                 lpips_weights: Optional[str], device):
        self.metrics = list(dict.fromkeys(metrics))
        self.y_channel = y_channel
        self.crop_border = crop_border
        self.lpips_net = lpips_net
        self.lpips = None
        if "lpips" in self.metrics:
            from dlas.metrics import LPIPSMetric

            self.lpips = LPIPSMetric(lpips_net, lpips_weights, device)

    def __call__(self, output, reference_file: Path, scale: int) -> dict[str, float]:
        from dlas.inference import load_image, tensor_to_uint8
        from dlas.metrics import psnr, ssim

        out = tensor_to_uint8(output)
        ref = tensor_to_uint8(load_image(reference_file))
        if all(o <= r < o + scale for o, r in zip(out.shape[:2], ref.shape[:2])):
            # An HR side that is not a multiple of the scale (LQ = floor(HR / scale)): drop its bottom/right
            # remainder, as BasicSR's mod_crop and the GTmod12 benchmark files do.
            ref = ref[: out.shape[0], : out.shape[1]]
        if out.shape != ref.shape:
            raise DataError(f"reference is {ref.shape[1]}x{ref.shape[0]} but the output is {out.shape[1]}x"
                            f"{out.shape[0]}; the reference must be scale x the LQ size (a remainder below "
                            "the scale is cropped)", str(reference_file))
        crop = scale if self.crop_border is None else self.crop_border
        values = {}
        try:
            if "psnr" in self.metrics:
                values["psnr"] = psnr(out, ref, crop, self.y_channel)
            if "ssim" in self.metrics:
                values["ssim"] = ssim(out, ref, crop, self.y_channel)
        except ValueError as exc:  # too small for the crop (or SSIM's 11x11 window)
            hint = "; lower --crop-border or leave out ssim" if "shape" not in str(exc) else ""
            raise DataError(f"cannot score this image: {exc}{hint}", str(reference_file)) from exc
        if self.lpips is not None:
            values["lpips"] = self.lpips(out, ref)
        return values

    def convention(self, scale: int) -> str:
        crop = scale if self.crop_border is None else self.crop_border
        lpips = f"; LPIPS {self.lpips_net}, RGB, whole image" if self.lpips else ""
        return f"PSNR/SSIM on {'Y (BT.601)' if self.y_channel else 'RGB'}, {crop} px cropped per edge{lpips}"


def _print_table(scores: dict[str, dict[str, float]], convention: str) -> dict[str, float]:
    names = list(next(iter(scores.values())))
    means = {n: sum(v[n] for v in scores.values()) / len(scores) for n in names}
    width = max(len("mean"), *(len(k) for k in scores))
    fmt = lambda n, v: ("inf" if math.isinf(v) else f"{v:.4f}" if n != "psnr" else f"{v:.2f}").rjust(8)
    print(f"{'image'.ljust(width)} " + " ".join(n.rjust(8) for n in names))
    for key, values in scores.items():
        print(f"{key.ljust(width)} " + " ".join(fmt(n, values[n]) for n in names))
    print(f"{'mean'.ljust(width)} " + " ".join(fmt(n, means[n]) for n in names))
    print(f"({convention})")
    return means


# ---------------------------------------------------------------------- -opt mode
def evaluate_config(args: argparse.Namespace) -> int:
    """The ``-opt`` mode: run every evaluator of a test config once; print and write the metrics."""
    import torch

    from dlas import load_network_weights
    from dlas.config.inherit import load_with_bases, strip_replace
    from dlas.config.load import plugin_path
    from dlas.evaluators.base import EvalContext
    from dlas.inference import autocast_context, build_network, select_device
    from dlas.registry import import_plugins
    from dlas.trainer.run import build_datasets, build_evaluators

    used = [option for option, value in (("--input", args.input), ("--reference", args.reference),
                                         ("--metrics", args.metrics), ("--tile", args.tile), ("--step", args.step),
                                         ("--best", args.best), ("--network", args.network),
                                         ("--temperature", args.temperature)) if value not in (None, False)]
    if used:  # the config's eval: section says what to run; these would be silently ignored
        raise ConfigError(f"{', '.join(used)} only apply with --run; with -opt, set them in the config's eval: "
                          "section", used[0])
    file = Path(args.opt)
    if not file.is_file():
        raise ConfigError("config file does not exist", str(file))
    cfg = strip_replace(load_with_bases(file)[0])  # base: files as in training configs
    import_plugins([plugin_path(m, file.parent) for m in cfg.get("imports") or []])  # as train.py finds them
    if not cfg.get("eval"):
        raise ConfigError("a test config needs an 'eval:' section (e.g. {sr: {type: sr}})", "eval")
    device = select_device(args.device if args.device != "auto" else str(cfg.get("device", "auto")))
    paths = cfg.get("path") or {}
    datasets = build_datasets(cfg)
    evaluators = build_evaluators(cfg)
    # Evaluators name the networks they run; the others (a reused training config's discriminator) need no weights.
    evaluated = {getattr(e, "network_name", None) for e in evaluators.values()}
    networks = {}
    for name in cfg.get("networks") or {}:
        weights = paths.get(f"pretrain_model_{name}")
        if not weights and name not in evaluated:
            continue
        if not weights:
            raise ConfigError(f"no weights for network '{name}': set path.pretrain_model_{name}: FILE",
                              f"path.pretrain_model_{name}")
        net = build_network(cfg, name, f"networks.{name}")
        if not Path(weights).is_file():
            raise DataError("weights file does not exist", str(weights))
        load_network_weights(net, weights, strict=paths.get("strict_load", True))
        networks[name] = net.to(device).eval()
    root = Path(args.output or paths.get("results") or Path("results") / str(cfg.get("name", file.stem)))
    autocast = autocast_context(args.precision or cfg.get("precision", "fp32"), device)
    metrics: dict[str, float] = {}
    for name, evaluator in evaluators.items():
        ctx = EvalContext(networks=networks, datasets=datasets, out_dir=root / name, step=0, device=device,
                          autocast=autocast)
        with torch.no_grad():
            metrics.update({f"{name}/{k}": float(v) for k, v in evaluator(ctx).items()})
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.json").write_text(json.dumps(metrics, indent=1))
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    print(f"results in {root}")
    return EXIT_OK
