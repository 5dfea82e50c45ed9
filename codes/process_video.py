"""Upscale a video with a trained run's network: ``python codes/process_video.py --run experiments/NAME
--input clip.mp4 --output clip_x4.mp4 [--batch 4] [--tile 256] [--frames-dir DIR]``.

Frames are read with OpenCV, upscaled in batches (tiled when ``--tile`` is set) with the same loading code as
``dlas-test`` (newest checkpoint, EMA weights by default), and written at the input's frame rate: ``.mp4`` with
the ``mp4v`` codec, ``.avi`` with ``MJPG`` (``--fourcc`` to choose another). Audio is not copied; mux it back
with e.g. ``ffmpeg -i out.mp4 -i in.mp4 -map 0:v -map 1:a -c copy final.mp4``.
Exit codes: 0 done; 2 bad arguments or input (one ``error:`` line); 1 anything else.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from dlas.cli.test import (
    Parser,
    add_inference_arguments,
    add_run_arguments,
    report_user_errors,
    task_flag_problems,
    task_options,
)
from dlas.errors import ConfigError, DataError, UserError

FOURCC_BY_SUFFIX = {".mp4": "mp4v", ".avi": "MJPG", ".mov": "mp4v", ".mkv": "mp4v"}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="process_video.py", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--input", required=True, metavar="VIDEO", help="the video to upscale")
    parser.add_argument("--output", required=True, metavar="VIDEO", help="the upscaled video (.mp4 or .avi)")
    parser.add_argument("--batch", type=int, default=4, help="frames per forward pass (default 4)")
    parser.add_argument("--frames-dir", metavar="DIR", help="also write every upscaled frame as frame_NNNNNN.png")
    parser.add_argument("--fourcc", help="OpenCV codec code (default: mp4v for .mp4, MJPG for .avi)")
    add_inference_arguments(parser)
    return parser


def read_batches(capture, batch: int) -> Iterator[list[np.ndarray]]:
    """Lists of up to ``batch`` RGB uint8 frames, in order, until the video ends."""
    import cv2

    frames: list[np.ndarray] = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        if len(frames) == batch:
            yield frames
            frames = []
    if frames:
        yield frames


def open_writer(path: Path, fourcc: str, fps: float, width: int, height: int):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        raise DataError(f"OpenCV cannot write a '{fourcc}' video here; try an .avi output (MJPG) or another "
                        "--fourcc", str(path))
    return writer


def process(args: argparse.Namespace) -> int:
    import cv2
    import torch
    from tqdm import tqdm

    from dlas.build import RunNetworks, autocast, select_device
    from dlas.inference import prepare_output_folder, save_image, tensor_to_uint8
    from dlas.inference.tasks import UpscaleTask

    if not args.run:
        raise ConfigError("give the trained run: --run experiments/NAME", "--run")
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}", "--batch")
    source, output = Path(args.input), Path(args.output)
    if not source.is_file():
        raise DataError("no such video file", str(source))
    if output.resolve() == source.resolve():
        raise ConfigError("the output would overwrite the input video while it is read; choose another --output",
                          "--output")
    fourcc = args.fourcc or FOURCC_BY_SUFFIX.get(output.suffix.lower())
    if fourcc is None or len(fourcc) != 4:
        raise ConfigError(f"cannot pick a codec for '{output.suffix}': use .mp4 or .avi, or give a 4-letter "
                          "--fourcc", "--output")
    frames_dir = Path(args.frames_dir) if args.frames_dir else None
    prepare_output_folder(output.parent)  # before the video is read: fail at once, not after the first batch
    if frames_dir:
        prepare_output_folder(frames_dir)
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise DataError("OpenCV cannot open this video (unknown container or codec)", str(source))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0  # some containers do not store it: 25 is the common default
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    device = select_device(args.device, option="--device")
    networks = RunNetworks(args.run, args.step, args.best, args.ema, device)
    try:
        task = UpscaleTask(networks, networks.config, device, autocast(args.precision or "fp32", device, "--precision"),
                           **task_options(args))
    except ConfigError as exc:
        raise task_flag_problems(exc) from None
    writer, written = None, 0
    try:
        with tqdm(total=total, desc="process_video", unit="frame", disable=None) as progress:
            for frames in read_batches(capture, args.batch):
                lq = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255)
                try:
                    upscaled = task.upscale(lq)
                except ConfigError as exc:  # a network that does not return images: named by its flag
                    raise task_flag_problems(exc) from None
                for frame in upscaled:
                    rgb = tensor_to_uint8(frame)
                    if writer is None:
                        writer = open_writer(output, fourcc, fps, rgb.shape[1], rgb.shape[0])
                    writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                    if frames_dir:
                        save_image(frames_dir / f"frame_{written:06d}.png", rgb)
                    written += 1
                progress.update(len(frames))
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if written == 0:
        raise DataError("the video has no readable frames", str(source))
    print(f"{written} frames x{task.scale_factor} at {fps:g} fps -> {output}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return process(build_parser().parse_args(argv))
    except UserError as exc:
        return report_user_errors(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
