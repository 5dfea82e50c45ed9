"""Export a trained image-to-image network (an SR generator, a restorer) to ONNX, checked against PyTorch.

    python scripts/export_onnx.py --run experiments/esrgan_x4 --output esrgan_x4.onnx
    python scripts/export_onnx.py --run experiments/esrgan_x4 --no-ema --step 50000 --output raw.onnx \\
        --check-image photo.png

Loads the run's network like ``dlas-test`` (newest checkpoint, EMA weights; ``--step``/``--best``, ``--no-ema``,
``--network``), exports it with torch's exporter (``torch.onnx.export(..., dynamo=True)``) with a dynamic batch,
height and width, and runs the exported file with onnxruntime on a real photograph (the center of scikit-image's
``coffee``, or ``--check-image FILE``) at a size other than the one it was traced at. The file is written only
when every output value is within ``--tolerance`` (default 1e-4) of PyTorch's; the difference is printed.
``scripts/bench/onnx_speed.py`` compares the two runtimes' speed.

The model: input ``input``, float32 NCHW RGB in [0, 1]; output ``output``, the network's image (not clamped).
Its metadata (``dlas.*`` properties) records the run, network, step, weights, scale and the side multiple an
input must have (``size_multiple``, 1 when the network takes any size).

Exit codes: 0 written; 1 the network cannot be exported (one line naming the operator) or does not match;
2 bad arguments, run folder or image.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from dlas.build import RunNetworks, default_network_name
from dlas.cli.test import Parser, add_run_arguments, report_user_errors
from dlas.errors import ConfigError, DataError, UserError

CHECK_IMAGE = "skimage:coffee"


class ExportFailed(Exception):
    """The network cannot be exported or its export does not match PyTorch (exit code 1); ``str()`` says why."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--output", metavar="model.onnx", help="the ONNX file to write")
    parser.add_argument("--check-image", default=CHECK_IMAGE,
                        help=f"image the export is checked on (default {CHECK_IMAGE}: a scikit-image photograph)")
    parser.add_argument("--check-size", type=int, default=96,
                        help="check on the center crop of at most this many input pixels a side (default 96)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest allowed |onnxruntime - PyTorch| of an output value (default 1e-4)")
    parser.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    args = parser.parse_args(argv)
    if not args.run or not args.output:
        parser.error("--run and --output are required")
    if args.check_size < 2 or args.tolerance <= 0:
        parser.error("--check-size must be at least 2 and --tolerance positive")
    return args


def import_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs onnx, onnxruntime and onnxscript ({exc.name} is missing): "
                          f'pip install -e ".[onnx]"', "arguments") from exc


def check_image(source: str, size: int, multiple: int) -> tuple[torch.Tensor, str]:
    """The center of ``source`` (at most ``size`` pixels a side, sides a multiple of ``multiple``) as 1CHW."""
    from dlas.data.file_index import SKIMAGE_PREFIX, skimage_images
    from dlas.inference import load_image

    file = skimage_images(source[len(SKIMAGE_PREFIX):], "--check-image")[0] if source.startswith(
        SKIMAGE_PREFIX) else source
    if not Path(file).is_file():
        raise DataError("no such image file", file)
    image = load_image(file)
    height, width = (min(side, size) // multiple * multiple for side in image.shape[1:])
    if height == 0 or width == 0:
        raise DataError(f"{image.shape[2]}x{image.shape[1]} is smaller than the network's size multiple "
                        f"{multiple}; pick a larger --check-image", file)
    top, left = (image.shape[1] - height) // 2, (image.shape[2] - width) // 2
    return image[None, :, top:top + height, left:left + width].contiguous(), Path(file).name


def why_not_exportable(exc: BaseException) -> str:
    """One line from the exporter's exception chain: the operator it could not convert, and why."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    reason = next((line.strip() for line in str(chain[-1]).splitlines() if line.strip()), type(chain[-1]).__name__)
    reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)[:300]
    for error in chain:
        match = (re.search(r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]", str(error))
                 or re.search(r"OpOverload\(op='([\w.]+)'", str(error)))
        if match:
            return f"operator {match.group(1)} has no ONNX conversion ({reason})"
    return f"torch's exporter failed: {type(chain[-1]).__name__}: {reason}"


def export(net: torch.nn.Module, example: torch.Tensor, file: Path, opset: int | None, name: str) -> None:
    """``torch.onnx.export`` with a dynamic batch, height and width; an ExportFailed naming the operator."""
    dynamic = torch.export.Dim.DYNAMIC
    try:
        program = torch.onnx.export(net, (example,), dynamo=True, input_names=["input"], output_names=["output"],
                                    dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},), opset_version=opset,
                                    verbose=False)
    except Exception as exc:  # the exporter raises many kinds; all end in one message
        raise ExportFailed(f"network '{name}' cannot be exported to ONNX: {why_not_exportable(exc)}") from exc
    if program is None:
        raise ExportFailed(f"network '{name}': torch's exporter returned no program")
    program.save(str(file))


def add_metadata(file: Path, properties: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(file))
    for key, value in properties.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(file))


def run_onnxruntime(file: Path, image: torch.Tensor) -> np.ndarray:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors reach us as exceptions; its own log lines would only repeat them
    session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": image.numpy()})[0]


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        import_onnx()
        networks = RunNetworks(args.run, args.step, args.best, args.ema, "cpu")
        name = args.network or default_network_name(networks.config)
        trained = networks.load(name)
        net = trained.network
        multiple = int(getattr(net, "size_multiple", 1))
        step = math.lcm(8, multiple)
        image, image_name = check_image(args.check_image, args.check_size, step)
        # Traced at about half the size it is checked at, so the check proves the height and width are dynamic;
        # and on a batch of two, since a dimension traced at 1 is fixed at 1.
        height, width = (max(step, side // 2 // step * step) for side in image.shape[-2:])
        example = torch.cat([image, image.flip(-1)])[..., :height, :width].contiguous()
        with torch.no_grad():
            reference = net(image)
        if not isinstance(reference, torch.Tensor) or reference.dim() != 4:
            raise ConfigError(f"network '{name}' is not an image-to-image network (its forward returns "
                              f"{type(reference).__name__}, not an NCHW image); export supports networks whose "
                              f"forward maps an image to an image", "--network")
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        temporary = output.with_name(f".{output.name}.tmp{os.getpid()}")
        try:
            export(net, example, temporary, args.opset, name)
            scale = reference.shape[-1] / image.shape[-1]
            add_metadata(temporary, {"dlas.run": str(args.run), "dlas.network": name, "dlas.step": str(trained.step),
                                     "dlas.weights": trained.weights_file.name, "dlas.scale": f"{scale:g}",
                                     "dlas.size_multiple": str(multiple),
                                     "dlas.input": "float32 NCHW RGB in [0, 1]"})
            exported = run_onnxruntime(temporary, image)
            difference = float(np.abs(exported - reference.numpy()).max()) if exported.shape == reference.shape \
                else math.inf
            if not difference <= args.tolerance:
                raise ExportFailed(f"the ONNX model's output differs from PyTorch's by up to {difference:.3g} "
                                   f"(tolerance {args.tolerance:g}) on {image_name}; not written")
            os.replace(temporary, output)
        finally:
            temporary.unlink(missing_ok=True)
    except UserError as exc:
        return report_user_errors(exc)
    except ExportFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # an output folder that cannot be made, a read-only or full disk
        print(f"error: {args.output}: cannot write the model: {exc.strerror or exc}", file=sys.stderr)
        return 2
    height, width = image.shape[-2:]
    print(f"wrote {output} (network '{name}', step {trained.step}, {trained.weights_file.name}, x{scale:g}; "
          f"dynamic batch, height and width{f', sides a multiple of {multiple}' if multiple > 1 else ''})")
    print(f"onnxruntime matches PyTorch within {difference:.2g} on {image_name} {width}x{height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
