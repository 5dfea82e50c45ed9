"""``dlas-test`` / ``python codes/test.py``: run a trained network on images or captions, score it, or run evaluators.

Two modes:

* ``--run experiments/NAME --output DIR`` with ``--input DIR|FILE`` and/or ``--caption TEXT`` / ``--captions FILE``
  (or neither, for unconditional sampling): load the run's networks from its newest (``--step N``, ``--best``)
  checkpoint, EMA weights by default, and run its inference task (``--task``; default: the one its network
  declares, ``upscale`` for SR generators) on every input. ``upscale`` saves ``DIR/<stem>.png`` per input (tiled
  with ``--tile``; with ``--metrics --reference DIR`` also scored against HR images matched by file stem);
  sampling tasks save ``DIR/<name>_<k>.png`` for the ``--n`` samples of each input and a ``grid.png``.
* ``-opt test.yml``: build the ``networks`` (weights from ``path.pretrain_model_NET``), ``datasets`` and ``eval``
  sections of a config, validated like a training config, run each evaluator once, print and write
  ``metrics.json``.

Exit codes: 0 success; 2 bad arguments, config or input (one ``error: …`` line each, no traceback; an unreadable
input image is reported and skipped, the others still run); 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from dlas.errors import ConfigError, DataError, Problem, UserError

EXIT_OK, EXIT_USER_ERROR = 0, 2
DEFAULT_METRICS = ["psnr", "ssim"]
# task options set by dedicated flags (the rest: --task-option KEY=VALUE)
TASK_FLAGS = {"network": "--network", "tile": "--tile", "tile_overlap": "--tile-overlap",
              "temperatures": "--temperature"}


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
    parser.add_argument("--network", help="network name in the config (default: the one its first evaluator "
                                          "scores, else 'generator')")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=True,
                     help="use NET_ema.safetensors when the checkpoint has it (the default)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw (non-EMA) weights")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Tiling, precision and device options (shared with ``codes/process_video.py``)."""
    parser.add_argument("--tile", type=int, help="process images in tiles of N LQ pixels (bounds memory)")
    parser.add_argument("--tile-overlap", type=int,
                        help="LQ pixels shared by neighbouring tiles, at most tile/2 (default 16)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="fp32 (default), bf16 or fp16 (autocast)")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA when present), cpu, cuda, cuda:N")


def report_user_errors(exc: UserError) -> int:
    """Print one ``error:`` line per problem; return exit code 2."""
    for problem in exc.problems:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_USER_ERROR


def log_warnings_to_stderr() -> None:
    """Warnings of the ``dlas`` logger (a non-finite output, a skipped file) as ``warning: …`` lines on stderr."""
    logger = logging.getLogger("dlas")
    if not any(isinstance(h, _StderrWarnings) for h in logger.handlers):
        logger.addHandler(_StderrWarnings(logging.WARNING))
        logger.propagate = False
    if logger.level == logging.NOTSET or logger.level > logging.WARNING:
        logger.setLevel(logging.WARNING)


class _StderrWarnings(logging.Handler):
    """Writes ``level: message`` to whatever ``sys.stderr`` is at the time (pytest swaps it per test)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dlas-test", description=__doc__.split("\n\n")[0])
    parser.add_argument("-opt", "--opt", metavar="TEST.yml", help="evaluate with a config's datasets + eval sections")
    add_run_arguments(parser)
    parser.add_argument("--input", metavar="DIR|FILE", help="LQ image or folder of images")
    parser.add_argument("--output", metavar="DIR", help="where to write results")
    parser.add_argument("--task", help="the inference task (default: the network's own; upscale for SR "
                                       "networks); `dlas-train --list task` lists them")
    parser.add_argument("--caption", action="append", metavar="TEXT", help="a caption to sample for (repeatable)")
    parser.add_argument("--captions", metavar="FILE", help="a text file of captions, one per line")
    parser.add_argument("--n", type=int, default=1, metavar="COUNT", help="samples per input (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                        help="another option of the task (YAML-typed, e.g. steps=50); repeatable")
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
        log_warnings_to_stderr()
        if args.opt and args.run:
            raise ConfigError("give either -opt TEST.yml or --run experiments/NAME, not both", "arguments")
        if args.opt:
            return evaluate_config(args)
        if args.run:
            return run_task(args)
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


def read_captions(args: argparse.Namespace) -> list[str]:
    """The captions of ``--caption`` and ``--captions FILE`` (one per non-empty line), in order."""
    captions = list(args.caption or [])
    if args.captions:
        file = Path(args.captions)
        if not file.is_file():
            raise DataError("captions file does not exist", str(file))
        try:
            captions += [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read the captions file: {exc}", str(file)) from exc
        if not captions:
            raise DataError("captions file holds no captions (one per line)", str(file))
    if any(not c.strip() for c in captions):
        raise ConfigError("a caption is empty", "--caption")
    return captions


def caption_stem(caption: str, seed: int) -> str:
    """A file stem for a caption and seed: ``a_red_circle_seed0`` (at most 60 characters of caption)."""
    words = re.sub(r"[^A-Za-z0-9]+", "_", caption.lower()).strip("_")[:60].rstrip("_") or "caption"
    return f"{words}_seed{seed}"


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The task's options from the dedicated flags that were given and ``--task-option KEY=VALUE``."""
    from dlas.config.overrides import parse_override

    options: dict[str, Any] = {}
    if args.network:
        options["network"] = args.network
    if args.tile is not None:
        options["tile"] = args.tile
    if args.tile_overlap is not None:
        options["tile_overlap"] = args.tile_overlap
    if getattr(args, "temperature", None):
        options["temperatures"] = list(args.temperature)
    for text in getattr(args, "task_option", None) or []:
        try:
            override = parse_override(text)
        except ConfigError as exc:
            raise ConfigError(f"expected KEY=VALUE, got {text!r} ({exc.problems[0].message})", "--task-option") from exc
        if len(override.keys) != 1 or not isinstance(override.keys[0], str):
            raise ConfigError(f"expected KEY=VALUE with a plain option name, got {text!r}", "--task-option")
        options[override.keys[0]] = override.value
    return options


def task_flag_problems(exc: ConfigError) -> ConfigError:
    """A task's option problems named by the command-line flag that set them (``task.tile`` -> ``--tile``)."""
    problems = []
    for p in exc.problems:
        key = p.path.split(".", 1)[1] if p.path.startswith("task.") else p.path
        flag = TASK_FLAGS.get(key) or (f"--task-option {key}" if p.path.startswith("task.") else p.path)
        message = p.message.replace("unknown option", "does not apply to this task") \
            if p.message.startswith("unknown option") else p.message
        problems.append(Problem(flag, message, p.line, p.file))
    return ConfigError(problems)


def run_task(args: argparse.Namespace) -> int:
    """The ``--run`` mode: run the run's task on every input into ``--output``; optionally score it."""
    import torch

    from dlas.build import RunNetworks, autocast, select_device
    from dlas.data.image_file import IMAGE_EXTENSIONS
    from dlas.inference import list_images, load_image, prepare_output_folder, save_image
    from dlas.inference.tasks import build_task, default_task, recipe_task_options

    if not args.output:
        raise ConfigError("--run needs --output DIR", "arguments")
    if args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}", "--n")
    if args.metrics is not None and not args.reference:
        raise ConfigError("--metrics needs --reference DIR with the HR images", "--reference")
    captions = read_captions(args)
    inputs = list_images(args.input) if args.input else []
    references = _match_references(inputs, args.reference) if args.reference else {}
    output_dir = Path(args.output)
    if not output_dir.is_dir() and output_dir.suffix.lower() in IMAGE_EXTENSIONS:
        raise ConfigError(f"--output is a folder (results are saved as FOLDER/<input stem>.png), got the file name "
                          f"'{args.output}'; give e.g. --output {output_dir.parent / 'results'}", "--output")
    _check_output_names(inputs, references, output_dir)
    device = select_device(args.device, option="--device")
    networks = RunNetworks(args.run, args.step, args.best, args.ema, device)
    name = args.task or default_task(networks.config, args.network)
    options = task_options(args)
    source, recipe = recipe_task_options(networks.config, name, args.network)
    inherited = {k: v for k, v in recipe.items() if k not in options and not (k == "temperature" and
                                                                               "temperatures" in options)}
    if inherited:
        print(f"{name} options from the run's {source}: " + ", ".join(f"{k}={v}" for k, v in inherited.items())
              + " (a flag or --task-option overrides each)")
    try:
        task = build_task(name, networks, networks.config, device,
                          autocast(args.precision or "fp32", device, "--precision"), {**inherited, **options})
    except ConfigError as exc:
        if exc.problems and exc.problems[0].path == "task.type":
            raise ConfigError(exc.problems[0].message, "--task") from None
        raise task_flag_problems(exc) from None
    if not task.scored and (args.reference or args.metrics is not None):
        raise ConfigError(f"the {name} task makes new images; --metrics/--reference score upscaled inputs only",
                          "--reference")
    if inputs and not ({"image"} & (task.needs | task.accepts)):
        raise ConfigError(f"the {name} task takes no input images", "--input")
    if captions and not ({"caption"} & (task.needs | task.accepts)):
        raise ConfigError(f"the {name} task takes no captions", "--caption")
    if "image" in task.needs and not inputs:
        raise ConfigError(f"the {name} task needs --input DIR|FILE with the images to work on", "--input")
    if "caption" in task.needs and not captions:
        raise ConfigError(f"the {name} task needs --caption TEXT or --captions FILE", "--caption")
    if task.scored and args.n != 1:
        raise ConfigError(f"the {name} task makes one output per input; --n applies to sampling tasks", "--n")
    prepare_output_folder(output_dir)
    first = networks.load(getattr(task, "network_name", None) or args.network or next(iter(networks)))
    what = f"{len(inputs)} image(s)" if inputs else f"{len(captions)} caption(s)" if captions else "samples"
    print(f"{name}: {first.name} from {first.weights_file} (step {first.step}), {what} -> {args.output}")

    scorer = _scorer(args, device) if references else None
    scores: dict[str, dict[str, float]] = {}
    unreadable = 0
    grid: list[torch.Tensor] = []
    for request, path in _requests(args, inputs, captions, task.scored):
        if path is not None:
            try:
                request.image = load_image(path)
            except DataError as exc:  # one broken file among many: report it, do the others, exit 2 at the end
                report_user_errors(exc)
                unreadable += 1
                continue
        try:
            images = task(request).clamp(0, 1)
        except ConfigError as exc:
            raise task_flag_problems(exc) from None
        if task.scored:
            save_image(output_dir / f"{request.name}.png", torch.cat(list(images), dim=-1))
            if scorer:
                temperatures = args.temperature or [None]
                # an upscaler's outputs come with what plain bicubic upscaling of the same input scores
                lq = request.image if task.scale_factor > 1 else None
                for temperature, values in zip(temperatures, scorer(images, references[path], task.scale_factor, lq)):
                    scores[request.name if temperature is None else f"{request.name} T={temperature:g}"] = values
        else:
            for k, image in enumerate(images):
                save_image(output_dir / f"{request.name}_{k}.png", image)
            grid += list(images)
    if grid:
        from dlas.logging.visuals import image_grid

        save_image(output_dir / "grid.png", image_grid(torch.stack(_same_size(grid)), max_images=len(grid)))
    if scorer and scores:
        means = _print_table(scores, scorer.convention(task.scale_factor))
        (output_dir / "metrics.json").write_text(json.dumps(
            {"mean": means, "images": scores, "convention": scorer.convention(task.scale_factor),
             "step": first.step, "weights": str(first.weights_file)}, indent=1))
    return EXIT_USER_ERROR if unreadable else EXIT_OK


def _requests(args: argparse.Namespace, inputs: list[Path], captions: list[str], scored: bool):
    """``(Request, image path or None)`` for every input image and/or caption (their product when both)."""
    from tqdm import tqdm

    from dlas.inference.tasks import Request

    images: list[Optional[Path]] = list(inputs) or [None]
    texts: list[Optional[str]] = list(captions) or [None]
    work = [(path, text) for path in images for text in texts]
    for path, text in tqdm(work, desc="dlas-test", unit="input", disable=None):
        parts = [path.stem] if path is not None else []
        if text is not None:
            parts.append(caption_stem(text, args.seed))
        elif not scored:
            parts.append(f"seed{args.seed}" if parts else f"sample_seed{args.seed}")
        yield Request("_".join(parts), caption=text, seed=args.seed, count=args.n), path


def _same_size(images: list) -> list:
    """``images`` padded to the size of the largest (a grid of samples of different sizes)."""
    import torch.nn.functional as F

    height = max(i.shape[-2] for i in images)
    width = max(i.shape[-1] for i in images)
    return [F.pad(i, (0, width - i.shape[-1], 0, height - i.shape[-2]), value=1.0) for i in images]


def _scorer(args: argparse.Namespace, device):
    from dlas.metrics.scoring import ImageScorer

    return _ReferenceScorer(ImageScorer(args.metrics or DEFAULT_METRICS, args.crop_border, args.channel == "y",
                                        args.lpips_net, args.lpips_weights, device, crop_option="--crop-border"))


class _ReferenceScorer:
    """Scores one output against its HR file, cropping an HR remainder below the scale as BasicSR does."""

    def __init__(self, scorer):
        self.scorer = scorer

    def convention(self, scale: int) -> str:
        return self.scorer.convention(scale)

    def __call__(self, outputs, reference_file: Path, scale: int, lq=None) -> list[dict[str, float]]:
        """The scores of each output (one per temperature) against the reference file, read once; with ``lq``
        (the input), each also holds ``psnr_bicubic``: bicubic upscaling of it under the same convention."""
        from dlas.inference import tensor_to_uint8

        outs = [tensor_to_uint8(output) for output in outputs]
        ref = self._reference(outs[0], reference_file, scale)
        try:
            scores = [self.scorer(out, ref, scale) for out in outs]
        except ValueError as exc:  # too small for the crop (or SSIM's 11x11 window)
            raise DataError(f"cannot score this image: {exc}", str(reference_file)) from exc
        if lq is not None:
            baseline = self.scorer.baseline_psnr(lq, ref, scale)
            for values in scores:
                values["psnr_bicubic"] = baseline
        return scores

    @staticmethod
    def _reference(out, reference_file: Path, scale: int):
        from dlas.inference import load_image, tensor_to_uint8

        ref = tensor_to_uint8(load_image(reference_file))
        if all(o <= r < o + scale for o, r in zip(out.shape[:2], ref.shape[:2])):
            # An HR side that is not a multiple of the scale (LQ = floor(HR / scale)): drop its bottom/right
            # remainder, as BasicSR's mod_crop and the GTmod12 benchmark files do.
            ref = ref[: out.shape[0], : out.shape[1]]
        if out.shape != ref.shape:
            raise DataError(f"reference is {ref.shape[1]}x{ref.shape[0]} but the output is {out.shape[1]}x"
                            f"{out.shape[0]}; the reference must be scale x the LQ size (a remainder below "
                            "the scale is cropped)", str(reference_file))
        return ref


def _print_table(scores: dict[str, dict[str, float]], convention: str) -> dict[str, float]:
    names = list(next(iter(scores.values())))
    means = {n: sum(v[n] for v in scores.values()) / len(scores) for n in names}
    width = max(len("mean"), *(len(k) for k in scores))
    fmt = lambda n, v: ("inf" if math.isinf(v) else f"{v:.4f}" if not n.startswith("psnr") else f"{v:.2f}").rjust(8)
    cell = {n: max(8, len(n)) for n in names}
    print(f"{'image'.ljust(width)} " + " ".join(n.rjust(cell[n]) for n in names))
    for key, values in scores.items():
        print(f"{key.ljust(width)} " + " ".join(fmt(n, values[n]).rjust(cell[n]) for n in names))
    print(f"{'mean'.ljust(width)} " + " ".join(fmt(n, means[n]).rjust(cell[n]) for n in names))
    print(f"({convention})")
    return means


# ---------------------------------------------------------------------- -opt mode
def evaluate_config(args: argparse.Namespace) -> int:
    """The ``-opt`` mode: run every evaluator of a test config once; print and write the metrics."""
    import torch

    from dlas import build
    from dlas.config import load_config
    from dlas.evaluators.base import EvalContext, Validation
    from dlas.weights import load_network_weights

    used = [option for option, value in (("--input", args.input), ("--reference", args.reference),
                                         ("--metrics", args.metrics), ("--tile", args.tile), ("--step", args.step),
                                         ("--best", args.best), ("--network", args.network),
                                         ("--temperature", args.temperature), ("--task", args.task),
                                         ("--caption", args.caption), ("--captions", args.captions))
            if value not in (None, False)]
    if used:  # the config's eval: section says what to run; these would be silently ignored
        raise ConfigError(f"{', '.join(used)} only apply with --run; with -opt, set them in the config's eval: "
                          "section", used[0])
    cfg = load_config(args.opt, training=False, default_name=Path(args.opt).stem)
    if not cfg["eval"]:
        raise ConfigError(cfg.attach_lines([Problem("eval", "a test config needs an 'eval:' section (e.g. "
                                                             "{sr: {type: sr}})")]))
    try:
        device = build.select_device(args.device if args.device != "auto" else cfg["device"])
        paths = cfg["path"]
        datasets = build.build_datasets(cfg)
        evaluators = build.build_evaluators(cfg)
        # Evaluators name the networks they run; the others (a reused training config's discriminator) need no
        # weights.
        evaluated = {getattr(e, "network_name", None) for e in evaluators.values()}
        networks = {}
        for name in cfg["networks"]:
            weights = paths.get(f"pretrain_model_{name}")
            if not weights and name not in evaluated:
                continue
            if not weights:
                raise ConfigError(f"no weights for network '{name}': set path.pretrain_model_{name}: FILE",
                                  f"path.pretrain_model_{name}")
            net = build.build_network(cfg, name, f"networks.{name}")
            if not Path(weights).is_file():
                raise DataError("weights file does not exist", str(weights))
            load_network_weights(net, weights, strict=paths["strict_load"])
            networks[name] = net.to(device).eval()
    except ConfigError as exc:
        raise ConfigError(cfg.attach_lines(exc.problems)) from None
    root = Path(args.output or paths["results"] or Path("results") / cfg["name"])
    precision = build.autocast(args.precision or build.concrete_precision(cfg["precision"]), device)

    def make_context(name: str, step: int) -> EvalContext:
        return EvalContext(networks=networks, datasets=datasets, out_dir=root / name, step=step, device=device,
                           autocast=precision, config=cfg)

    validation = Validation(evaluators, make_context)
    with torch.no_grad():
        metrics = validation(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.json").write_text(json.dumps(metrics, indent=1))
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    for line in validation.summary(metrics):
        print(line)
    print(f"results in {root}")
    return EXIT_OK
