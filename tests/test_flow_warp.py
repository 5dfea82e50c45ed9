"""flow_warp / resize_flow and the flow_warp injector: conventions, exactness, gradients, dtypes, errors."""
from __future__ import annotations

import pytest
import torch

from dlas.context import Context
from dlas.models.ops import flow_warp, resize_flow
from dlas.registry import INJECTORS

MODES = ["bilinear", "nearest", "bicubic"]
PADDINGS = ["zeros", "border", "reflection"]


def random_image(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def constant_flow(n: int, height: int, width: int, dx: float, dy: float, dtype=torch.float32) -> torch.Tensor:
    flow = torch.empty(n, 2, height, width, dtype=dtype)
    flow[:, 0], flow[:, 1] = dx, dy
    return flow


def position_tolerance(*size: int) -> float:
    """grid_sample's normalised float32 coordinates place samples to about 1.2e-7 * size pixels."""
    return 2.5e-7 * max(size)


def reference_warp(image: torch.Tensor, flow: torch.Tensor, padding: str) -> torch.Tensor:
    """Bilinear backward warp written out by hand: four taps per output pixel, padding applied per coordinate."""
    n, c, height, width = image.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=image.dtype), torch.arange(width, dtype=image.dtype),
                            indexing="ij")
    sx, sy = xs + flow[:, 0], ys + flow[:, 1]  # (N, H, W) source coordinates in pixels

    def fold(coord: torch.Tensor, size: int) -> torch.Tensor:
        if padding == "reflection":  # mirror at the outer edges -0.5 and size - 0.5
            period = 2 * size
            t = torch.remainder(coord + 0.5, period)
            coord = torch.where(t > size, period - t, t) - 0.5
        return coord.clamp(0, size - 1) if padding in ("border", "reflection") else coord

    sx, sy = fold(sx, width), fold(sy, height)
    x0, y0 = sx.floor(), sy.floor()
    out = torch.zeros_like(image)
    for tap_x, weight_x in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
        for tap_y, weight_y in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
            inside = (tap_x >= 0) & (tap_x <= width - 1) & (tap_y >= 0) & (tap_y <= height - 1)
            index = (tap_y.clamp(0, height - 1) * width + tap_x.clamp(0, width - 1)).long().view(n, 1, -1)
            values = image.view(n, c, -1).gather(2, index.expand(n, c, -1)).view(n, c, height, width)
            out += values * (weight_x * weight_y * inside).unsqueeze(1)
    return out


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(1, 1), (1, 7), (5, 3), (16, 24)])
def test_zero_flow_is_the_identity(mode, padding, size):
    image = random_image(2, 3, *size)
    out = flow_warp(image, torch.zeros(2, 2, *size), mode, padding)
    torch.testing.assert_close(out, image, atol=position_tolerance(*size), rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dx,dy", [(1, 0), (0, 1), (-2, 3), (3, -1)])
def test_integer_flow_shifts_the_image_exactly(mode, dx, dy):
    image = random_image(1, 2, 12, 10)
    out = flow_warp(image, constant_flow(1, 12, 10, dx, dy), mode, "zeros")
    expected = torch.zeros_like(image)
    rows, cols = slice(max(0, -dy), 12 - max(0, dy)), slice(max(0, -dx), 10 - max(0, dx))
    sources = slice(rows.start + dy, rows.stop + dy), slice(cols.start + dx, cols.stop + dx)
    expected[..., rows, cols] = image[..., sources[0], sources[1]]
    torch.testing.assert_close(out, expected, atol=position_tolerance(12, 10), rtol=0)


def test_positive_x_flow_reads_from_the_right():
    image = torch.zeros(1, 1, 1, 5)
    image[..., 3] = 1.0
    out = flow_warp(image, constant_flow(1, 1, 5, 1, 0))
    assert out[0, 0, 0].tolist() == pytest.approx([0, 0, 1, 0, 0], abs=1e-6)  # content moved one pixel left


@pytest.mark.parametrize("padding", PADDINGS)
def test_bilinear_matches_a_hand_written_reference_at_random_flows(padding):
    image = random_image(2, 3, 9, 11, dtype=torch.float64)
    flow = (random_image(2, 2, 9, 11, seed=1, dtype=torch.float64) - 0.5) * 12  # reaches well outside the image
    torch.testing.assert_close(flow_warp(image, flow, "bilinear", padding), reference_warp(image, flow, padding),
                               atol=1e-10, rtol=0)


def test_half_pixel_beyond_the_edge_reads_half_the_edge_with_zero_padding():
    image = torch.ones(1, 1, 4, 4)
    out = flow_warp(image, constant_flow(1, 4, 4, -0.5, 0), "bilinear", "zeros")
    assert out[0, 0, :, 0].tolist() == pytest.approx([0.5] * 4) and out[0, 0, :, 1:].min().item() == pytest.approx(1)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_gradients_match_finite_differences_for_image_and_flow(mode):
    image = random_image(1, 2, 5, 6, dtype=torch.float64).requires_grad_()
    flow = ((random_image(1, 2, 5, 6, seed=2, dtype=torch.float64) - 0.5) * 3 + 0.31).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, f: flow_warp(i, f, mode, "border"), (image, flow))


def test_nearest_mode_gradient_reaches_the_image():
    image = random_image(1, 1, 4, 5, dtype=torch.float64).requires_grad_()
    flow = (random_image(1, 2, 4, 5, seed=3, dtype=torch.float64) - 0.5) * 2 + 0.2
    assert torch.autograd.gradcheck(lambda i: flow_warp(i, flow, "nearest", "zeros"), (image,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_images_are_sampled_in_float32_and_keep_their_dtype(dtype):
    image = random_image(1, 3, 8, 300).to(dtype)
    flow = constant_flow(1, 8, 300, 0.25, 0.0)
    out = flow_warp(image, flow)
    assert out.dtype == dtype
    # exactly the float32 result rounded once: a grid in 8 bits would put samples pixels away at this width
    assert torch.equal(out, flow_warp(image.float(), flow).to(dtype))


def test_any_channel_count_and_a_broadcast_batch():
    image = random_image(1, 7, 6, 6)
    flows = torch.stack([constant_flow(1, 6, 6, 0, 0)[0], constant_flow(1, 6, 6, 1, 0)[0]])
    out = flow_warp(image, flows)
    assert out.shape == (2, 7, 6, 6)
    torch.testing.assert_close(out[0], image[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1, :, :, :5], image[0, :, :, 1:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("flow_shape", [(2, 2, 8, 9), (2, 3, 8, 8), (3, 2, 8, 8), (2, 8, 8, 2)])
def test_a_flow_of_the_wrong_shape_is_one_error_naming_both_shapes(flow_shape):
    with pytest.raises(ValueError) as error:
        flow_warp(torch.rand(2, 3, 8, 8), torch.zeros(flow_shape))
    message = str(error.value)
    assert "(2, 3, 8, 8)" in message and str(tuple(flow_shape)) in message and "\n" not in message


def test_resize_flow_rescales_the_vectors_with_the_field():
    flow = constant_flow(1, 8, 12, 2.0, -4.0)
    half = resize_flow(flow, scale_factor=0.5)
    assert half.shape == (1, 2, 4, 6)
    torch.testing.assert_close(half[:, 0], torch.full((1, 4, 6), 1.0))
    torch.testing.assert_close(half[:, 1], torch.full((1, 4, 6), -2.0))
    wide = resize_flow(flow, size=(8, 36))  # only the width triples: only x vectors triple
    torch.testing.assert_close(wide[:, 0], torch.full((1, 8, 36), 6.0))
    torch.testing.assert_close(wide[:, 1], torch.full((1, 8, 36), -4.0))


def test_a_resized_flow_warps_the_downscaled_image_like_the_full_one():
    image = random_image(1, 3, 16, 16)
    flow = constant_flow(1, 16, 16, 2, -2)
    small = torch.nn.functional.avg_pool2d(image, 2)
    warped_small = flow_warp(small, resize_flow(flow, scale_factor=0.5), padding="border")
    expected = torch.nn.functional.avg_pool2d(flow_warp(image, flow, padding="border"), 2)
    torch.testing.assert_close(warped_small[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_the_injector_warps_and_resizes_a_low_resolution_flow():
    injector = INJECTORS.build({"type": "flow_warp", "in": "hq", "flow": "flow", "out": "warped",
                                "resize_flow": True, "padding": "border"})
    assert injector.reads == ["hq", "flow"] and injector.writes == ["warped"]
    hq = random_image(2, 3, 8, 8).requires_grad_()
    flow = constant_flow(2, 4, 4, 0.5, 0).requires_grad_()  # half a pixel at 4x4 is one pixel at 8x8
    out = injector({"hq": hq, "flow": flow}, Context(networks={}))["warped"]
    torch.testing.assert_close(out[..., :7], hq[..., 1:].detach(), atol=1e-5, rtol=0)
    out.sum().backward()
    assert hq.grad.abs().sum() > 0 and flow.grad is not None


def test_the_injector_without_resize_refuses_a_flow_of_another_size():
    injector = INJECTORS.build({"type": "flow_warp", "in": "hq", "flow": "flow", "out": "warped"})
    with pytest.raises(ValueError, match=r"\(1, 2, 4, 4\)"):
        injector({"hq": torch.rand(1, 3, 8, 8), "flow": torch.zeros(1, 2, 4, 4)}, Context(networks={}))
