"""Specification of dlas.metrics: PSNR/SSIM with BasicSR's conventions, LPIPS loading, FID maths."""
import math

import cv2
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from dlas.errors import DataError
from dlas.metrics import fid, frechet_distance, lpips, psnr, rgb_to_y, ssim
from dlas.metrics.fid import InceptionFeatures, feature_statistics
from dlas.metrics.lpips import LPIPSMetric


def random_image(seed: int, shape=(48, 40, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 236, size=shape, dtype=np.uint8)


def wang_ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. SSIM written out directly: 11x11 Gaussian (sigma 1.5) via cv2, valid region, channel mean."""
    window = cv2.getGaussianKernel(11, 1.5) @ cv2.getGaussianKernel(11, 1.5).T
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        f = lambda im: cv2.filter2D(im, -1, window)[5:-5, 5:-5]
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        values.append((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())
    return float(np.mean(values))


# ---------------------------------------------------------------- PSNR
def test_psnr_of_identical_images_is_infinite():
    img = random_image(0)
    assert psnr(img, img.copy()) == math.inf


def test_psnr_of_a_known_uniform_error_matches_the_formula():
    img = random_image(1)
    shifted = img + np.uint8(3)  # every pixel off by exactly 3 → MSE 9
    assert psnr(img, shifted) == pytest.approx(10 * math.log10(255**2 / 9), abs=1e-10)


def test_psnr_of_random_noise_matches_a_hand_computed_mse():
    img = random_image(2).astype(np.float64)
    noise = np.random.default_rng(3).normal(0, 5, img.shape)
    noisy = img + noise
    expected = 10 * math.log10(255**2 / np.mean(noise**2))
    assert psnr(img, noisy) == pytest.approx(expected, abs=1e-9)


def test_psnr_accepts_uint8_and_float_alike():
    a, b = random_image(4), random_image(5)
    assert psnr(a, b) == psnr(a.astype(np.float32), b.astype(np.float64))


def test_crop_border_ignores_the_edges():
    a = random_image(6)
    b = a.copy()
    b[:4] = 0  # damage only the top 4 rows
    assert psnr(a, b, crop_border=4) == math.inf
    assert psnr(a, b, crop_border=3) < 40


def test_crop_border_removes_exactly_that_many_pixels_per_edge():
    a, b = random_image(7), random_image(8)
    expected = psnr(a[2:-2, 2:-2], b[2:-2, 2:-2])
    assert psnr(a, b, crop_border=2) == expected


# ---------------------------------------------------------------- Y channel
@pytest.mark.parametrize(
    "rgb, y",
    [((255, 255, 255), 235.0), ((0, 0, 0), 16.0), ((255, 0, 0), 81.481), ((0, 255, 0), 144.553),
     ((0, 0, 255), 40.966), ((100, 150, 200), 16 + (65.481 * 100 + 128.553 * 150 + 24.966 * 200) / 255)],
)
def test_y_channel_is_matlab_bt601_of_rgb(rgb, y):
    pixel = np.array(rgb, dtype=np.uint8).reshape(1, 1, 3)
    assert rgb_to_y(pixel)[0, 0, 0] == pytest.approx(y, abs=1e-4)


def test_y_channel_psnr_equals_psnr_of_the_luma_planes():
    a, b = random_image(10), random_image(11)
    ya, yb = rgb_to_y(a).astype(np.float64), rgb_to_y(b).astype(np.float64)
    expected = 10 * math.log10(255**2 / np.mean((ya - yb) ** 2))
    assert psnr(a, b, y_channel=True) == pytest.approx(expected, abs=1e-10)


def test_y_channel_psnr_agrees_with_float64_bt601_to_1e_4_db():
    # BasicSR's float32 steps vs the exact formula: published tables are comparable to this tolerance
    a, b = random_image(26), random_image(27)
    weights = np.array([65.481, 128.553, 24.966])
    ya, yb = 16 + a.astype(np.float64) @ weights / 255, 16 + b.astype(np.float64) @ weights / 255
    exact = 10 * math.log10(255**2 / np.mean((ya[2:-2, 2:-2] - yb[2:-2, 2:-2]) ** 2))
    assert psnr(a, b, crop_border=2, y_channel=True) == pytest.approx(exact, abs=1e-4)


def test_set5_like_anchor_on_a_real_photo_matches_skimage():
    # skimage's bundled astronaut, x4 down and up with OpenCV bicubic, scored like an x4 paper table
    from skimage import data
    from skimage.metrics import peak_signal_noise_ratio

    hr = data.astronaut()[:240, :240]
    sr = cv2.resize(cv2.resize(hr, (60, 60), interpolation=cv2.INTER_AREA), (240, 240), interpolation=cv2.INTER_CUBIC)
    y_hr, y_sr = rgb_to_y(hr)[4:-4, 4:-4, 0], rgb_to_y(sr)[4:-4, 4:-4, 0]
    assert psnr(hr, sr, crop_border=4, y_channel=True) == pytest.approx(
        peak_signal_noise_ratio(y_hr.astype(np.float64), y_sr.astype(np.float64), data_range=255), abs=1e-9)
    assert ssim(hr, sr, crop_border=4, y_channel=True) == pytest.approx(structural_similarity(
        y_hr.astype(np.float64), y_sr.astype(np.float64), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=255), abs=1e-6)
    assert 20 < psnr(hr, sr, crop_border=4, y_channel=True) < 35  # a plausible bicubic x4 number


# ---------------------------------------------------------------- SSIM
def test_ssim_of_identical_images_is_one():
    img = random_image(12)
    assert ssim(img, img.copy()) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_a_direct_implementation_of_wang_et_al():
    a = random_image(13)
    b = np.clip(a + np.random.default_rng(14).normal(0, 12, a.shape), 0, 255).round().astype(np.uint8)
    assert ssim(a, b) == pytest.approx(wang_ssim_reference(a, b), abs=1e-10)


def test_ssim_matches_skimage_gaussian_population_covariance():
    a = random_image(15)
    b = np.clip(a + np.random.default_rng(16).normal(0, 20, a.shape), 0, 255).round().astype(np.uint8)
    expected = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
    )
    assert ssim(a, b) == pytest.approx(expected, abs=1e-6)


def test_ssim_on_y_channel_with_crop_matches_the_reference_on_the_prepared_luma():
    a = random_image(17)
    b = np.clip(a.astype(int) + 9, 0, 255).astype(np.uint8)
    ya, yb = rgb_to_y(a[4:-4, 4:-4]), rgb_to_y(b[4:-4, 4:-4])
    assert ssim(a, b, crop_border=4, y_channel=True) == pytest.approx(wang_ssim_reference(ya, yb), abs=1e-10)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="11x11"):
        ssim(random_image(18, (12, 12, 3)), random_image(19, (12, 12, 3)), crop_border=1)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        psnr(random_image(20, (16, 16, 3)), random_image(21, (16, 17, 3)))


@pytest.mark.parametrize("shape", [(3, 16, 16), (16, 16, 4)])
def test_y_channel_on_something_other_than_hwc_rgb_is_an_error_not_a_silent_rgb_number(shape):
    # a CHW array (a tensor's layout) or RGBA would otherwise be scored channel by channel, silently not on Y
    a = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    with pytest.raises(ValueError, match="y_channel"):
        psnr(a, a // 2, y_channel=True)
    with pytest.raises(ValueError, match="y_channel"):
        ssim(a, a // 2, y_channel=True)


# ---------------------------------------------------------------- LPIPS
def test_lpips_without_backbone_weights_names_the_file_and_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(DataError) as err:
        lpips(random_image(22), random_image(23))
    message = str(err.value)
    assert "alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message


def test_lpips_vgg_names_its_own_file(tmp_path):
    with pytest.raises(DataError, match="vgg16-397923af.pth"):
        LPIPSMetric(net="vgg", weights_path=tmp_path / "missing.pth")


def test_lpips_loads_torchvision_backbone_weights_from_a_local_file(tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(0)
    features = alexnet(weights=None).features.state_dict()
    file = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({f"features.{k}": v for k, v in features.items()}, file)
    metric = LPIPSMetric(weights_path=file)
    loaded = metric.model.net.state_dict()
    assert torch.equal(loaded["slice1.0.weight"], features["0.weight"])
    assert torch.equal(loaded["slice5.10.bias"], features["10.bias"])
    a, b = random_image(24, (32, 32, 3)), random_image(25, (32, 32, 3))
    assert metric(a, a) == pytest.approx(0.0, abs=1e-7)
    assert metric(a, b) > 0


def test_lpips_rejects_a_file_that_is_not_backbone_weights(tmp_path):
    file = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({"something": torch.zeros(1)}, file)
    with pytest.raises(DataError, match="features.0.weight"):
        LPIPSMetric(weights_path=file)


# ---------------------------------------------------------------- FID
def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 6))
    sigma = m @ m.T
    assert frechet_distance(np.ones(6), sigma, np.ones(6), sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)  # 5 + 1 + 1 + 4
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, abs=1e-12)
    assert expected == 11.0


def test_frechet_distance_of_non_commuting_2x2_covariances_matches_the_hand_formula():
    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    # for 2x2 PSD products: Tr sqrt(S1 S2) = sqrt(Tr(S1 S2) + 2 sqrt(det S1 det S2))
    trace_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 1.0 + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance([0, 0], s1, [1, 0], s2) == pytest.approx(expected, abs=1e-12)


def test_frechet_distance_is_finite_for_singular_covariances():
    features = np.random.default_rng(1).normal(size=(5, 32))  # 5 samples in 32-d: rank-deficient
    sigma = np.cov(features, rowvar=False)
    value = frechet_distance(features.mean(0), sigma, features.mean(0) + 0.1, sigma * 1.5)
    assert math.isfinite(value) and value > 0


class TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def batches(seed, n=3, size=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, size, size, generator=g) for _ in range(n)]


def test_fid_of_a_set_against_itself_is_zero_and_against_another_is_positive():
    net = TinyFeatures()
    assert fid(batches(0), batches(0), extractor=net) == pytest.approx(0.0, abs=1e-6)
    shifted = [b * 0.5 for b in batches(1)]
    assert fid(shifted, batches(0), extractor=net) > 1e-3


def test_fid_reference_statistics_are_cached_to_npz_and_reused(tmp_path):
    net = TinyFeatures()
    cache = tmp_path / "ref_stats.npz"
    first = fid(batches(2), batches(3), extractor=net, reference_cache=cache)
    assert cache.is_file()
    with np.load(cache) as data:
        assert data["mu"].shape == (8,) and data["sigma"].shape == (8, 8)
    # the cache is used: passing other (empty) reference images changes nothing
    assert fid(batches(2), [], extractor=net, reference_cache=cache) == pytest.approx(first, abs=1e-9)
    assert fid(batches(2), cache, extractor=net) == pytest.approx(first, abs=1e-9)


def test_inception_features_without_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(DataError, match="inception_v3_google-0cc3c7bd.pth"):
        InceptionFeatures()


def test_inception_feature_path_runs_with_random_weights_from_a_local_file(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    file = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), file)
    net = InceptionFeatures(weights_path=file)
    mu, sigma = feature_statistics([torch.rand(2, 3, 40, 48)], net)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
