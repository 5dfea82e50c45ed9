"""Specification of codes/process_video.py on a synthetic 8-frame 32x32 clip."""
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_inference_cli import make_run

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("process_video", REPO / "codes" / "process_video.py")
process_video = importlib.util.module_from_spec(spec)
spec.loader.exec_module(process_video)


def write_clip(path: Path, frames=8, size=32, fps=12.0) -> list[np.ndarray]:
    """A lossless-ish clip: flat colours change per frame, so codec blur barely matters."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size, size))
    clip = []
    for i in range(frames):
        frame = np.zeros((size, size, 3), np.uint8)
        frame[:, : size // 2] = (20 * i, 100, 200 - 10 * i)  # BGR
        frame[:, size // 2 :] = (50, 30 * i % 256, 80)
        writer.write(frame)
        clip.append(frame)
    writer.release()
    return clip


def read_clip(path: Path) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames, fps


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path, bias_of_step=lambda s: 0.0)  # identity-ish x2 network


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_upscales_every_frame_keeping_the_frame_rate(tmp_path, run, suffix):
    source = tmp_path / "clip.avi"
    write_clip(source)
    out = tmp_path / f"out{suffix}"
    assert process_video.main(["--run", str(run), "--input", str(source), "--output", str(out), "--batch", "3"]) == 0
    frames, fps = read_clip(out)
    assert len(frames) == 8 and fps == pytest.approx(12.0)
    assert frames[0].shape == (64, 64, 3)
    # nearest x2 of flat colours: the frame content survives the codecs (within compression error)
    assert abs(float(frames[5][10, 10].astype(int)[0]) - 100) < 12  # frame 5 left half blue channel = 20*5


def test_frames_dir_holds_every_upscaled_frame_as_png(tmp_path, run):
    source = tmp_path / "clip.avi"
    write_clip(source)
    decoded, _ = read_clip(source)
    assert process_video.main(["--run", str(run), "--input", str(source), "--output", str(tmp_path / "o.avi"),
                               "--frames-dir", str(tmp_path / "frames"), "--batch", "4", "--tile", "16",
                               "--tile-overlap", "4"]) == 0
    pngs = sorted((tmp_path / "frames").glob("frame_*.png"))
    assert [p.name for p in pngs] == [f"frame_{i:06d}.png" for i in range(8)]
    frame3 = cv2.imread(str(pngs[3]))
    expected = np.repeat(np.repeat(decoded[3], 2, axis=0), 2, axis=1)  # exact: PNG frames are lossless
    assert np.array_equal(frame3, expected)


def test_a_missing_video_is_exit_2_with_one_line(tmp_path, run, capsys):
    assert process_video.main(["--run", str(run), "--input", str(tmp_path / "nope.mp4"),
                               "--output", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such video file" in err[0]


def test_a_file_that_is_not_a_video_is_exit_2(tmp_path, run, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    assert process_video.main(["--run", str(run), "--input", str(bad), "--output", str(tmp_path / "o.mp4")]) == 2
    assert "bad.mp4" in capsys.readouterr().err


def test_an_unknown_output_container_is_exit_2(tmp_path, run, capsys):
    source = tmp_path / "clip.avi"
    write_clip(source)
    assert process_video.main(["--run", str(run), "--input", str(source), "--output", str(tmp_path / "o.xyz")]) == 2
    assert "--fourcc" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["output", "frames-dir"])
def test_an_output_that_cannot_be_written_is_exit_2_naming_it(tmp_path, run, capsys, where):
    source = tmp_path / "clip.avi"
    write_clip(source, frames=2)
    (tmp_path / "afile").write_text("a file, not a folder")
    paths = {"output": tmp_path / "o.avi", "frames-dir": tmp_path / "frames"}
    paths[where] = tmp_path / "afile" / "x.avi" if where == "output" else tmp_path / "afile" / "frames"
    assert process_video.main(["--run", str(run), "--input", str(source), "--output", str(paths["output"]),
                               "--frames-dir", str(paths["frames-dir"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "afile" in err[0]


def test_each_batch_of_frames_runs_once_and_tiling_measures_the_scale_on_a_small_crop(tmp_path, run, monkeypatch):
    from dlas.build import RunNetworks

    seen = []
    load = RunNetworks.load

    def recording_load(self, *args, **kwargs):
        fresh = not self._loaded
        loaded = load(self, *args, **kwargs)
        if fresh:
            loaded.network.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape)))
        return loaded

    monkeypatch.setattr(RunNetworks, "load", recording_load)
    source = tmp_path / "clip.avi"
    write_clip(source, frames=2, size=96)
    assert process_video.main(["--run", str(run), "--input", str(source), "--output", str(tmp_path / "o.avi"),
                               "--batch", "2"]) == 0
    assert seen == [(2, 3, 96, 96)]  # no probe: the scale is read off the output
    seen.clear()
    assert process_video.main(["--run", str(run), "--input", str(source), "--output", str(tmp_path / "t.avi"),
                               "--batch", "2", "--tile", "48", "--tile-overlap", "8"]) == 0
    assert seen[0] == (1, 3, 48, 48) and all(shape[-1] == 48 for shape in seen)  # a one-tile probe, then tiles


def test_writing_the_output_over_the_input_video_is_refused(tmp_path, run, capsys):
    source = tmp_path / "clip.avi"
    write_clip(source, frames=2)
    before = source.read_bytes()
    assert process_video.main(["--run", str(run), "--input", str(source), "--output", str(source)]) == 2
    assert "overwrite" in capsys.readouterr().err and source.read_bytes() == before
