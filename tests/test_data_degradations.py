"""Specification of the degradation chain (dlas.data.degradations): each step's measurable effect."""
import numpy as np
import pytest

from dlas.data.degradations import Degradation, DegradationPipeline, gaussian_kernel, sinc_kernel
from dlas.errors import ConfigError
from dlas.registry import DEGRADATIONS


@DEGRADATIONS.register("test_darken")
class Darken(Degradation):
    """Multiplies the image by ``factor`` (a plugin degradation)."""

    def __init__(self, factor: float = 0.5, path: str = "test_darken"):
        if not 0 <= factor <= 1:
            raise ConfigError(f"must be within [0, 1], got {factor}", f"{path}.factor")
        self.factor = factor

    def apply(self, image, lq_size, rng):
        return image * self.factor


def textured_image(size: int = 96, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus fine random texture, values inside (0.1, 0.9)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.3 + 0.3 * xs, 0.3 + 0.3 * ys, 0.5 - 0.2 * xs * ys], axis=-1)
    return (base + rng.uniform(-0.1, 0.1, base.shape)).astype(np.float32)


def degrade(steps, image, lq_size=None, seed=0, quantize=False):
    pipeline = DegradationPipeline(steps, quantize=quantize)
    return pipeline(image, lq_size or image.shape[:2], np.random.default_rng(seed))


def high_frequency_energy(image: np.ndarray) -> float:
    gray = image.mean(axis=2)
    laplacian = 4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
    return float((laplacian ** 2).mean())


def test_blur_lowers_high_frequency_energy():
    image = textured_image()
    blurred = degrade([{"type": "blur", "kernel_size": 9, "sigma": 1.5}], image)
    assert high_frequency_energy(blurred) < 0.1 * high_frequency_energy(image)


def test_blur_keeps_mean_brightness():
    image = textured_image()
    blurred = degrade([{"type": "blur", "kernel_size": [7, 21], "sigma": [0.2, 3], "anisotropic": 0.5}], image)
    assert abs(blurred.mean() - image.mean()) < 2e-3


def test_anisotropic_kernel_is_elongated_along_its_long_axis():
    kernel = gaussian_kernel(21, sigma_x=3.0, sigma_y=0.7, angle=0.0)
    offsets = np.arange(-10, 11)
    variance_x = (kernel.sum(axis=0) * offsets ** 2).sum()
    variance_y = (kernel.sum(axis=1) * offsets ** 2).sum()
    assert kernel.sum() == pytest.approx(1.0)
    assert variance_x == pytest.approx(9.0, rel=0.05)
    assert variance_y == pytest.approx(0.49, rel=0.05)


def test_plateau_kernel_has_heavier_tails_than_a_gaussian():
    gaussian = gaussian_kernel(21, 2.0, 2.0, 0.0)
    plateau = gaussian_kernel(21, 2.0, 2.0, 0.0, shape="plateau", beta=1.0)
    # Relative weight 3 sigma from the centre: exp(-4.5) ~ 0.011 for the Gaussian, 1/(1+9) = 0.1 for the plateau.
    assert gaussian[10, 16] / gaussian[10, 10] == pytest.approx(np.exp(-4.5), rel=1e-6)
    assert plateau[10, 16] / plateau[10, 10] == pytest.approx(0.1, rel=1e-6)


def test_generalized_kernel_with_large_beta_has_a_flat_top():
    gaussian = gaussian_kernel(21, 3.0, 3.0, 0.0)
    flat = gaussian_kernel(21, 3.0, 3.0, 0.0, shape="generalized", beta=4.0)
    # 2 px from the centre (squared distance d = 4/9): exp(-d/2) = 0.80 for the Gaussian, exp(-(d^4)/2) = 0.98.
    assert flat[10, 12] / flat[10, 10] > 0.98 and gaussian[10, 12] / gaussian[10, 10] < 0.81


def test_blur_kernel_shape_chances_must_not_exceed_one():
    with pytest.raises(ConfigError) as error:
        DegradationPipeline([{"type": "blur", "generalized": 0.6, "plateau": 0.5}])
    assert error.value.problems[0].path == "degradations[0].plateau"


def test_one_of_runs_only_the_chosen_step():
    image = np.full((64, 64, 3), 0.5, np.float32)
    steps = [{"type": "one_of", "weights": [0, 1], "steps": [{"type": "noise", "gaussian": 20}, {"type": "jpeg"}]}]
    assert np.array_equal(degrade(steps, image), np.full((64, 64, 3), 128 / 255, np.float32))


def test_one_of_weights_must_match_its_steps():
    with pytest.raises(ConfigError) as error:
        DegradationPipeline([{"type": "one_of", "weights": [1], "steps": [{"type": "jpeg"}, {"type": "blur"}]}])
    assert error.value.problems[0].path == "degradations[0].weights"


def test_motion_blur_at_angle_zero_smears_only_horizontally():
    image = np.zeros((31, 31, 3), np.float32)
    image[15, 15] = 1.0
    smeared = degrade([{"type": "motion_blur", "length": 9, "angle": 0}], image)[:, :, 0]
    assert np.count_nonzero(smeared[15] > 1e-4) >= 7
    assert np.count_nonzero(smeared[:, 15] > 1e-4) <= 3  # the anti-aliased line is at most ~1 px thick


def test_sinc_kernel_has_negative_lobes_and_unit_sum():
    kernel = sinc_kernel(21, cutoff=np.pi / 3)
    assert kernel.sum() == pytest.approx(1.0)
    assert kernel.min() < 0  # the lobes that make ringing


def test_jpeg_introduces_8x8_blocking():
    image = textured_image(128)
    compressed = degrade([{"type": "jpeg", "quality": 10}], image)

    def boundary_to_interior_ratio(img):
        steps = np.abs(np.diff(img.mean(axis=2), axis=1))  # steps[:, c] is between columns c and c+1
        boundary = steps[:, 7::8].mean()  # across block edges (7|8, 15|16, ...)
        interior = np.concatenate([steps[:, c::8] for c in (2, 3, 4)], axis=1).mean()
        return boundary / interior

    assert boundary_to_interior_ratio(image) == pytest.approx(1.0, abs=0.1)
    assert boundary_to_interior_ratio(compressed) > 1.3


@pytest.mark.parametrize("sigma", [5, 20])
def test_gaussian_noise_std_matches_configured_sigma(sigma):
    image = np.full((256, 256, 3), 0.5, np.float32)
    noisy = degrade([{"type": "noise", "gaussian": sigma}], image)
    assert (noisy - image).std() * 255 == pytest.approx(sigma, rel=0.03)


def test_gray_noise_is_identical_on_all_channels():
    image = np.full((64, 64, 3), 0.5, np.float32)
    noisy = degrade([{"type": "noise", "gaussian": 10, "gray": 1.0}], image)
    assert np.array_equal(noisy[:, :, 0], noisy[:, :, 1]) and np.array_equal(noisy[:, :, 1], noisy[:, :, 2])
    assert noisy.std() > 0.02


def test_color_noise_differs_between_channels():
    image = np.full((64, 64, 3), 0.5, np.float32)
    noisy = degrade([{"type": "noise", "gaussian": 10}], image)
    assert not np.allclose(noisy[:, :, 0], noisy[:, :, 1])


def test_poisson_noise_grows_with_brightness():
    dark = np.full((128, 128, 3), 0.1, np.float32)
    bright = np.full((128, 128, 3), 0.8, np.float32)
    step = [{"type": "noise", "poisson": 1.0, "poisson_scale": 1.0}]
    dark_std = (degrade(step, dark) - dark).std()
    bright_std = (degrade(step, bright) - bright).std()
    # Shot noise: std = sqrt(intensity * 255) / 255, so the ratio is sqrt(8).
    assert bright_std / dark_std == pytest.approx(np.sqrt(8), rel=0.1)


def test_resize_scales_by_the_drawn_factor():
    image = textured_image(80)
    out = degrade([{"type": "resize", "scale": 0.5, "modes": ["area"]}], image, lq_size=(40, 40))
    assert out.shape == (40, 40, 3)
    assert np.abs(out - image.reshape(40, 2, 40, 2, 3).mean(axis=(1, 3))).max() < 1e-5


def test_resize_relative_to_lq_uses_the_lq_size():
    image = textured_image(64)
    steps = [{"type": "resize", "scale": 2.0, "relative_to": "lq", "modes": ["bilinear"]},
             {"type": "jpeg", "quality": 95}]
    pipeline = DegradationPipeline(steps, quantize=False)
    intermediate = pipeline.steps[0][1].apply(image, (16, 16), np.random.default_rng(0))
    assert intermediate.shape == (32, 32, 3)


def test_chain_always_ends_at_the_lq_size():
    image = textured_image(96)
    out = degrade([{"type": "blur", "sigma": 1.0}, {"type": "resize", "scale": [0.3, 1.4]}], image, lq_size=(24, 24))
    assert out.shape == (24, 24, 3)


def test_default_chain_is_antialiased_bicubic_downscaling():
    image = textured_image(96)
    lq = degrade(None, image, lq_size=(24, 24))
    block_means = image.reshape(24, 4, 24, 4, 3).mean(axis=(1, 3))
    assert np.abs(lq - block_means).mean() < 0.02  # aliasing-free: close to the local average


def test_quantized_output_lies_on_8_bit_levels_within_unit_range():
    lq = degrade("real_esrgan", textured_image(128), lq_size=(32, 32), quantize=True)
    assert lq.min() >= 0 and lq.max() <= 1
    assert np.allclose(lq * 255, np.rint(lq * 255), atol=1e-4)


def test_same_generator_seed_gives_the_same_degradation():
    image = textured_image(128)
    first = degrade("real_esrgan", image, lq_size=(32, 32), seed=7)
    again = degrade("real_esrgan", image, lq_size=(32, 32), seed=7)
    other = degrade("real_esrgan", image, lq_size=(32, 32), seed=8)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_prob_zero_skips_a_step():
    image = textured_image(64)
    out = degrade([{"type": "noise", "gaussian": 30, "prob": 0.0}], image)
    assert np.array_equal(out, image)


def test_a_fractional_prob_runs_a_step_on_that_fraction_of_samples():
    image = textured_image(16)
    pipeline = DegradationPipeline([{"type": "noise", "gaussian": 30, "prob": 0.3}], quantize=False)
    runs = sum(not np.array_equal(pipeline(image, (16, 16), np.random.default_rng(seed)), image)
               for seed in range(400))
    assert 0.22 * 400 < runs < 0.38 * 400  # binomial(400, 0.3): mean 120, sd 9


def test_a_plugin_degradation_runs_in_a_chain_and_its_options_are_checked():
    image = textured_image(16)
    out = degrade([{"type": "test_darken", "factor": 0.25}, {"type": "chain", "steps": [{"type": "test_darken"}]}],
                  image)
    assert np.allclose(out, image * 0.125, atol=1e-6)
    with pytest.raises(ConfigError) as error:
        degrade([{"type": "test_darken", "factr": 0.2}], image)
    assert error.value.problems[0].path == "degradations[0].factr" and "factor" in error.value.problems[0].message
    with pytest.raises(ConfigError) as error:
        degrade([{"type": "blur"}, {"type": "test_darken", "factor": 2.0}], image)
    assert error.value.problems[0].path == "degradations[1].factor"


def test_color_jitter_brightness_scales_the_image():
    image = textured_image(64)
    out = degrade([{"type": "color_jitter", "brightness": 0.5}], image)
    ratio = out.mean() / image.mean()
    assert 0.5 <= ratio <= 1.5 and ratio != pytest.approx(1.0, abs=1e-4)


def test_shuffle_runs_every_nested_step():
    image = np.full((64, 64, 3), 0.5, np.float32)
    out = degrade([{"type": "shuffle", "steps": [{"type": "noise", "gaussian": 10}, {"type": "resize_to_lq"}]}],
                  image, lq_size=(32, 32))
    assert out.shape == (32, 32, 3) and out.std() > 0.005


def test_unknown_type_names_its_list_position_and_suggests_a_fix():
    with pytest.raises(ConfigError) as error:
        DegradationPipeline([{"type": "blur"}, {"type": "noise"}, {"type": "jpg"}])
    assert error.value.problems[0].path == "degradations[2].type"
    assert "did you mean 'jpeg'" in str(error.value)


def test_unknown_type_inside_a_nested_list_names_the_nested_position():
    with pytest.raises(ConfigError) as error:
        DegradationPipeline([{"type": "shuffle", "steps": [{"type": "jpeg"}, {"type": "resise_to_lq"}]}])
    assert error.value.problems[0].path == "degradations[0].steps[1].type"


def test_unknown_option_is_an_error_with_its_path():
    with pytest.raises(ConfigError) as error:
        DegradationPipeline([{"type": "blur", "sigam": 2}])
    assert error.value.problems[0].path == "degradations[0].sigam"
    assert "did you mean 'sigma'" in str(error.value)


@pytest.mark.parametrize("step, path", [
    ({"type": "noise", "gaussian": [30, 1]}, "degradations[0].gaussian"),
    ({"type": "blur", "kernel_size": 20}, "degradations[0].kernel_size"),
    ({"type": "jpeg", "quality": [0, 101]}, "degradations[0].quality"),
    ({"type": "jpeg", "prob": 1.5}, "degradations[0].prob"),
    ({"type": "resize", "modes": ["bicubc"]}, "degradations[0].modes"),
])
def test_bad_option_values_are_config_errors(step, path):
    with pytest.raises(ConfigError) as error:
        DegradationPipeline([step])
    assert error.value.problems[0].path == path


def test_unknown_preset_is_an_error():
    with pytest.raises(ConfigError, match="real_esrgan"):
        DegradationPipeline("realesrgan")


def matlab_imresize_matrix(in_length: int, out_length: int) -> np.ndarray:
    """MATLAB imresize's bicubic (a = -0.5) antialiased weights for shrinking, as a matrix (reference)."""
    scale = out_length / in_length
    width = 4 / scale
    centres = np.arange(1, out_length + 1) / scale + 0.5 * (1 - 1 / scale)
    taps = np.floor(centres - width / 2)[:, None] + np.arange(int(np.ceil(width)) + 2)[None]
    distance = np.abs(scale * (centres[:, None] - taps))
    kernel = np.where(distance <= 1, 1.5 * distance ** 3 - 2.5 * distance ** 2 + 1,
                      np.where(distance <= 2, -0.5 * distance ** 3 + 2.5 * distance ** 2 - 4 * distance + 2, 0))
    kernel = kernel / kernel.sum(axis=1, keepdims=True)
    matrix = np.zeros((out_length, in_length))
    for row in range(out_length):
        np.add.at(matrix[row], np.clip(taps[row], 1, in_length).astype(int) - 1, kernel[row])
    return matrix


def test_default_bicubic_matches_matlab_imresize_away_from_the_border():
    gray = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    lq = degrade(None, np.repeat(gray[:, :, None], 3, axis=2), lq_size=(16, 16))[:, :, 0]
    matrix = matlab_imresize_matrix(64, 16)
    reference = matrix @ gray @ matrix.T
    assert np.abs(lq - reference)[2:-2, 2:-2].max() < 1e-5


def test_real_esrgan_yaml_in_the_docs_is_the_preset():
    import pathlib

    import yaml

    from dlas.data.degradations import PRESETS

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    start = doc.index("```yaml\ndegradations:\n  # first round") + len("```yaml\n")
    written = yaml.safe_load(doc[start:doc.index("```", start)])["degradations"]
    DegradationPipeline(written)  # a user can paste it

    def rounded(value):
        if isinstance(value, float):
            return round(value, 3)
        if isinstance(value, list):
            return [rounded(v) for v in value]
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return value

    assert rounded(written) == rounded(PRESETS["real_esrgan"])
