"""Specification of dlas.inference: tiled inference equals untiled inference, image helpers."""
import numpy as np
import pytest
import torch

from dlas.errors import ConfigError, DataError
from dlas.inference import infer_scale, list_images, load_image, save_image, tensor_to_uint8, tiled_forward


class SmallUpsampler(torch.nn.Module):
    """Receptive-field radius 3 input pixels: two 3x3 convs, pixel shuffle x2, a 3x3 conv at the output scale."""

    def __init__(self, scale: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(8, 3 * scale * scale, 3, padding=1), torch.nn.PixelShuffle(scale),
            torch.nn.Conv2d(3, 3, 3, padding=1),
        )

    def forward(self, x):
        return self.body(x)


def images(n=1, h=37, w=29, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("h, w", [(37, 29), (64, 64), (50, 23)])
def test_tiled_equals_untiled_for_sizes_not_multiple_of_the_tile(h, w):
    net = SmallUpsampler()
    lq = images(h=h, w=w)
    tiled = tiled_forward(net, lq, scale=2, tile=24, overlap=12)
    assert tiled.shape == (1, 3, 2 * h, 2 * w)
    assert torch.allclose(tiled, net(lq), atol=1e-5, rtol=0)


@torch.no_grad()
def test_tiled_handles_a_batch_of_images():
    net = SmallUpsampler()
    lq = images(n=3, h=40, w=33, seed=1)
    assert torch.allclose(tiled_forward(net, lq, 2, 24, 12), net(lq), atol=1e-5, rtol=0)


@torch.no_grad()
def test_tiled_at_scale_one_and_odd_scale():
    for scale in (1, 3):
        net = SmallUpsampler(scale)
        lq = images(h=30, w=26, seed=scale)
        assert torch.allclose(tiled_forward(net, lq, scale, 24, 12), net(lq), atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_tile_at_least_as_large_as_the_image_runs_the_network_once():
    calls = []
    net = SmallUpsampler()
    counting = lambda x: calls.append(tuple(x.shape)) or net(x)
    lq = images(h=20, w=18)
    out = tiled_forward(counting, lq, 2, 32, 8)
    assert calls == [(1, 3, 20, 18)]
    assert torch.equal(out, net(lq))


@torch.no_grad()
def test_only_the_long_axis_is_split_when_the_other_fits_in_a_tile():
    calls = []
    net = SmallUpsampler()
    counting = lambda x: calls.append(tuple(x.shape[-2:])) or net(x)
    lq = images(h=12, w=60)
    out = tiled_forward(counting, lq, 2, 24, 12)
    assert all(shape == (12, 24) for shape in calls) and len(calls) == 4  # ceil((60 - 12) / (24 - 12)) tiles
    assert torch.allclose(out, net(lq), atol=1e-5, rtol=0)


@torch.no_grad()
def test_without_enough_overlap_tiles_differ_from_untiled_near_seams():
    # the spec above is not vacuous: a receptive field (radius 3) wider than overlap // 4 shows at the seams
    net = SmallUpsampler()
    lq = images(h=48, w=48, seed=3)
    assert (tiled_forward(net, lq, 2, 24, 8) - net(lq)).abs().max() > 1e-4


def test_an_overlap_over_half_the_tile_is_a_config_error():
    with pytest.raises(ConfigError, match="overlap"):
        tiled_forward(SmallUpsampler(), images(), 2, 16, 9)


@torch.no_grad()
def test_infer_scale_measures_the_output_input_ratio():
    assert infer_scale(SmallUpsampler(3), images(h=10, w=12)) == 3


def test_tensor_to_uint8_rounds_like_a_saved_png():
    t = torch.tensor([0.0, 0.5 / 255, 1.49 / 255, 1.51 / 255, 1.2, -0.1]).view(1, 1, 6).expand(3, 1, 6)
    assert tensor_to_uint8(t)[0, :, 0].tolist() == [0, 0, 1, 2, 255, 0]  # 0.5 rounds half to even


def test_save_then_load_image_round_trips_uint8_pixels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    save_image(tmp_path / "sub" / "a.png", pixels)
    loaded = load_image(tmp_path / "sub" / "a.png")
    assert loaded.shape == (3, 9, 7)
    assert np.array_equal(tensor_to_uint8(loaded), pixels)


def test_an_unreadable_image_is_a_data_error_naming_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError) as err:
        load_image(bad)
    assert str(bad) in str(err.value)


def test_list_images_of_a_missing_folder_or_an_empty_one_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such"):
        list_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        list_images(tmp_path)


def test_list_images_ignores_hidden_files_like_the_datasets_do(tmp_path):
    save_image(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble stub")
    (tmp_path / ".thumb.png").write_bytes(b"junk")
    assert list_images(tmp_path) == [tmp_path / "a.png"]


def test_save_image_into_an_unwritable_place_is_a_data_error_naming_the_file(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(DataError) as err:
        save_image(tmp_path / "file" / "out.png", np.zeros((4, 4, 3), np.uint8))
    assert "out.png" in str(err.value)
    (tmp_path / "taken.png").mkdir()  # a folder where the image should go: OpenCV's imwrite fails
    with pytest.raises(DataError, match="taken.png"):
        save_image(tmp_path / "taken.png", np.zeros((4, 4, 3), np.uint8))

