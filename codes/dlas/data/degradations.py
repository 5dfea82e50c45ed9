"""Composable image degradations: how a dataset turns an HQ crop into its LQ input.

A chain is an ordered YAML list; each entry has a ``type``, an optional ``prob`` (chance the step runs,
default 1) and the step's own options. Ranges are written ``[low, high]`` and drawn uniformly per sample; a
single number means a fixed value. Every draw comes from the item's generator, so a chain is reproducible
per ``(seed, epoch, index)``. Images are float32 HWC RGB in [0, 1] and are clamped to [0, 1] after each step.

Degradation types (registered in :data:`dlas.registry.DEGRADATIONS`, so ``dlas-train --list degradation`` lists
them, ``--describe blur`` shows one's options, and a plugin can add its own; details in docs/data.md):

=================  ============================================================================================
``blur``           Gaussian (or generalized/plateau) blur, isotropic or elliptical at a random angle
``motion_blur``    a straight-line blur of random length and angle (camera shake)
``sinc``           a circular low-pass (sinc) filter: ringing and overshoot artifacts
``resize``         rescale by a random factor with a random interpolation mode (antialiased when shrinking)
``noise``          Gaussian (sigma in 8-bit levels) or Poisson noise, optionally the same on all channels
``jpeg``           JPEG compression at a random quality (OpenCV)
``color_jitter``   random brightness, contrast, saturation and hue
``resize_to_lq``   resize to the LQ size (HQ size / scale) with a random mode
``chain``          a nested list of steps run in order (gives a group one ``prob``)
``shuffle``        a nested list of steps run in a random order
``one_of``         one step of a nested list, chosen with given weights
=================  ============================================================================================

Whatever the list does, the result is finally brought to the LQ size: if it is not that size after the last
step (no ``resize_to_lq`` in the list, or its ``prob`` skipped it), a bicubic ``resize_to_lq`` runs.

A ``degradations:`` option may also name a preset: ``bicubic`` (the default: plain antialiased bicubic
downscaling) or ``real_esrgan`` (the second-order chain of Real-ESRGAN, see :data:`PRESETS`).
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from dlas.errors import ConfigError, did_you_mean
from dlas.registry import DEGRADATIONS

Range = Union[float, list[float]]
IntRange = Union[int, list[int]]
Mode = Literal["bicubic", "bilinear", "area", "nearest"]

_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ---------------------------------------------------------------------------------------------- helpers
def _span(value: Union[float, list[float]], path: str, low_bound: float = -math.inf,
          high_bound: float = math.inf) -> tuple[float, float]:
    """``value`` (a number or ``[low, high]``) as a checked (low, high) pair."""
    if isinstance(value, (int, float)):
        low = high = float(value)
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        low, high = float(value[0]), float(value[1])
    else:
        raise ConfigError(f"expected a number or a [low, high] pair, got {value!r}", path)
    if low > high:
        raise ConfigError(f"range [{low:g}, {high:g}] is reversed; write [low, high]", path)
    if low < low_bound or high > high_bound:
        raise ConfigError(f"range [{low:g}, {high:g}] must lie within [{low_bound:g}, {high_bound:g}]", path)
    return low, high


def _uniform(rng: np.random.Generator, span: tuple[float, float]) -> float:
    return float(rng.uniform(span[0], span[1]))


def _odd_size(rng: np.random.Generator, span: tuple[float, float]) -> int:
    """A random odd kernel size within ``span`` (both ends odd)."""
    low, high = int(span[0]) // 2, int(span[1]) // 2
    return 2 * int(rng.integers(low, high + 1)) + 1


def _check_odd_sizes(span: tuple[float, float], path: str) -> None:
    if span[0] != int(span[0]) or int(span[0]) % 2 == 0 or int(span[1]) % 2 == 0 or span[0] < 3:
        raise ConfigError(f"kernel sizes must be odd integers >= 3, got {list(span)}", path)


def _check_prob(value: float, path: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"must be a probability between 0 and 1, got {value}", path)
    return float(value)


def _to_gray(image: np.ndarray) -> np.ndarray:
    return image @ _GRAY_WEIGHTS


def _filter(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # Reflect the border (without repeating the edge pixel) so the crop's edges do not darken.
    return cv2.filter2D(image, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def resize_image(image: np.ndarray, height: int, width: int, mode: str, antialias: bool = True) -> np.ndarray:
    """Resize an HWC float image. ``bicubic``/``bilinear`` use PyTorch (antialiased when shrinking, which for
    bicubic matches MATLAB's ``imresize`` closely, the convention SR benchmarks use); ``area`` and
    ``nearest`` use OpenCV."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    if mode in ("bicubic", "bilinear"):
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        shrinking = height < image.shape[0] or width < image.shape[1]
        out = F.interpolate(tensor, size=(height, width), mode=mode, align_corners=False,
                            antialias=antialias and shrinking)
        return out[0].numpy().transpose(1, 2, 0)
    flag = cv2.INTER_AREA if mode == "area" else cv2.INTER_NEAREST
    out = cv2.resize(image, (width, height), interpolation=flag)
    return out[:, :, None] if out.ndim == 2 else out


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, angle: float, shape: str = "gaussian",
                    beta: float = 1.0) -> np.ndarray:
    """A normalised ``size`` x ``size`` blur kernel with scales ``sigma_x``/``sigma_y`` along axes rotated by
    ``angle`` radians (``sigma_x == sigma_y``: isotropic).

    With ``d`` the squared Mahalanobis distance from the centre, ``shape`` is ``gaussian`` (``exp(-d/2)``),
    ``generalized`` (``exp(-(d^beta)/2)``: flatter top and sharper fall-off for beta > 1, peakier for beta < 1)
    or ``plateau`` (``1 / (1 + d^beta)``: a flat top with heavy tails), the kernel family of Real-ESRGAN.
    """
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    covariance = rotation @ np.diag([sigma_x ** 2, sigma_y ** 2]) @ rotation.T
    inverse = np.linalg.inv(covariance)
    half = size // 2
    ys, xs = np.mgrid[-half:half + 1, -half:half + 1]
    points = np.stack([xs, ys], axis=-1).astype(np.float64)
    distance = np.einsum("...i,ij,...j->...", points, inverse, points)
    if shape == "generalized":
        kernel = np.exp(-0.5 * distance ** beta)
    elif shape == "plateau":
        kernel = 1.0 / (1.0 + distance ** beta)
    else:
        kernel = np.exp(-0.5 * distance)
    return kernel / kernel.sum()


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """A normalised circular low-pass kernel with cutoff frequency ``cutoff`` (radians per pixel, 0..pi)."""
    from scipy.special import j1  # scipy comes with scikit-image

    half = size // 2
    ys, xs = np.mgrid[-half:half + 1, -half:half + 1]
    radius = np.hypot(xs, ys)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = cutoff * j1(cutoff * radius) / (2 * math.pi * radius)
    kernel[half, half] = cutoff ** 2 / (4 * math.pi)  # the limit at r = 0
    return kernel / kernel.sum()


# ---------------------------------------------------------------------------------------------- steps
class Degradation:
    """Base class of degradations: ``apply(image, lq_size, rng)`` returns the degraded HWC float image.

    A degradation is registered in :data:`dlas.registry.DEGRADATIONS`; its constructor's keyword arguments are
    its YAML options (checked against the signature), plus ``path``, the dotted config path of the entry,
    which the framework passes for error messages. ``apply`` draws every random number from ``rng`` (the item's
    generator) and may return any size: the pipeline brings the final result to ``lq_size``.
    """

    def apply(self, image: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


@DEGRADATIONS.register("blur")
class Blur(Degradation):
    """Gaussian blur, optionally anisotropic and with generalized or plateau kernel shapes.

    kernel_size: odd kernel side in pixels, or a ``[low, high]`` range of odd sizes (default 21).
    sigma: kernel scale (the standard deviation for a Gaussian) in pixels, or a range (default [0.2, 3]).
        Anisotropic kernels draw the two axes' sigmas independently from it.
    anisotropic: chance (0-1) that a kernel is elliptical, rotated by a uniform angle (default 0: always
        isotropic). Real-ESRGAN's kernel mix is anisotropic 31% of the time.
    generalized: chance (0-1) of a generalized Gaussian ``exp(-(d^beta)/2)`` instead of a Gaussian (default 0).
    plateau: chance (0-1) of a plateau kernel ``1 / (1 + d^beta)`` (default 0); ``generalized + plateau``
        must not exceed 1. Real-ESRGAN uses 0.15 each.
    beta_generalized: the generalized kernel's exponent, or a range (default [0.5, 4]).
    beta_plateau: the plateau kernel's exponent, or a range (default [1, 2]).
    """

    def __init__(self, kernel_size: IntRange = 21, sigma: Range = [0.2, 3.0], anisotropic: float = 0.0,
                 generalized: float = 0.0, plateau: float = 0.0, beta_generalized: Range = [0.5, 4.0],
                 beta_plateau: Range = [1.0, 2.0], path: str = "blur"):
        self.kernel_size = _span(kernel_size, f"{path}.kernel_size")
        _check_odd_sizes(self.kernel_size, f"{path}.kernel_size")
        self.sigma = _span(sigma, f"{path}.sigma", low_bound=1e-3)
        self.anisotropic = _check_prob(anisotropic, f"{path}.anisotropic")
        self.generalized = _check_prob(generalized, f"{path}.generalized")
        self.plateau = _check_prob(plateau, f"{path}.plateau")
        if generalized + plateau > 1:
            raise ConfigError(f"generalized ({generalized}) + plateau ({plateau}) chances exceed 1", f"{path}.plateau")
        self.beta_generalized = _span(beta_generalized, f"{path}.beta_generalized", low_bound=1e-3)
        self.beta_plateau = _span(beta_plateau, f"{path}.beta_plateau", low_bound=1e-3)

    def apply(self, image: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        size = _odd_size(rng, self.kernel_size)
        if rng.random() < self.anisotropic:
            sigma_x, sigma_y = _uniform(rng, self.sigma), _uniform(rng, self.sigma)
            angle = float(rng.uniform(-math.pi, math.pi))
        else:
            sigma_x = sigma_y = _uniform(rng, self.sigma)
            angle = 0.0
        pick = rng.random()
        if pick < self.generalized:
            shape, beta = "generalized", _uniform(rng, self.beta_generalized)
        elif pick < self.generalized + self.plateau:
            shape, beta = "plateau", _uniform(rng, self.beta_plateau)
        else:
            shape, beta = "gaussian", 1.0
        return _filter(image, gaussian_kernel(size, sigma_x, sigma_y, angle, shape, beta))


@DEGRADATIONS.register("motion_blur")
class MotionBlur(Degradation):
    """Linear motion blur (camera shake): the average along a straight line.

    length: line length in pixels, or a range (default [5, 15]).
    angle: direction in degrees, or a range (default [0, 180]: any direction).
    """

    def __init__(self, length: IntRange = [5, 15], angle: Range = [0.0, 180.0], path: str = "motion_blur"):
        self.length = _span(length, f"{path}.length", low_bound=1)
        self.angle = _span(angle, f"{path}.angle")

    def apply(self, image: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        length = int(rng.integers(int(self.length[0]), int(self.length[1]) + 1))
        angle = math.radians(_uniform(rng, self.angle))
        size = length if length % 2 else length + 1
        kernel = np.zeros((size, size), np.float32)
        centre = size // 2
        dx, dy = math.cos(angle) * (length - 1) / 2, -math.sin(angle) * (length - 1) / 2
        # Anti-aliased line so short kernels at odd angles are not jagged.
        cv2.line(kernel, (round((centre - dx) * 16), round((centre - dy) * 16)),
                 (round((centre + dx) * 16), round((centre + dy) * 16)), 1.0, 1, cv2.LINE_AA, shift=4)
        if kernel.sum() <= 0:
            return image
        return _filter(image, kernel / kernel.sum())


@DEGRADATIONS.register("sinc")
class Sinc(Degradation):
    """Circular low-pass (sinc) filter: the ringing and overshoot of over-sharpened or resampled images.

    kernel_size: odd kernel side, or a range of odd sizes (default [7, 21]).
    cutoff: cutoff frequency in radians per pixel, 0..pi, or a range (default [pi/3, pi]; lower = stronger).
    """

    def __init__(self, kernel_size: IntRange = [7, 21], cutoff: Range = [math.pi / 3, math.pi], path: str = "sinc"):
        self.kernel_size = _span(kernel_size, f"{path}.kernel_size")
        _check_odd_sizes(self.kernel_size, f"{path}.kernel_size")
        # Allow a rounded pi (3.1416) from YAML; the kernel uses at most pi.
        self.cutoff = _span(cutoff, f"{path}.cutoff", low_bound=1e-3, high_bound=math.pi * 1.001)

    def apply(self, image: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        cutoff = min(_uniform(rng, self.cutoff), math.pi)
        return _filter(image, sinc_kernel(_odd_size(rng, self.kernel_size), cutoff))


@DEGRADATIONS.register("resize")
class Resize(Degradation):
    """Rescale by a random factor with a random interpolation mode.

    scale: factor, or a ``[low, high]`` range drawn uniformly (default [0.5, 1.5]).
    modes: interpolation modes to pick from uniformly: bicubic, bilinear, area, nearest
        (default [bicubic, bilinear, area]).
    up_down_keep: optional ``[p_up, p_down, p_keep]``: first choose to enlarge (factor from [1, high]),
        shrink (from [low, 1]) or keep the size, as Real-ESRGAN does (it uses [0.2, 0.7, 0.1]).
    relative_to: ``input`` (default) scales the current image; ``lq`` scales the final LQ size, as
        Real-ESRGAN's second round does.
    antialias: low-pass before shrinking with bicubic/bilinear (default true).
    """

    def __init__(self, scale: Range = [0.5, 1.5], modes: list[Mode] = ["bicubic", "bilinear", "area"],
                 up_down_keep: Optional[list[float]] = None, relative_to: Literal["input", "lq"] = "input",
                 antialias: bool = True, path: str = "resize"):
        self.scale = _span(scale, f"{path}.scale", low_bound=1e-3)
        if not modes:
            raise ConfigError("name at least one mode (bicubic, bilinear, area, nearest)", f"{path}.modes")
        self.modes = list(modes)
        if up_down_keep is not None:
            if len(up_down_keep) != 3 or min(up_down_keep) < 0 or sum(up_down_keep) <= 0:
                raise ConfigError(f"expected three non-negative chances [up, down, keep], got {up_down_keep}",
                                  f"{path}.up_down_keep")
            if self.scale[0] > 1 or self.scale[1] < 1:
                raise ConfigError("with up_down_keep the scale range must contain 1", f"{path}.scale")
            total = float(sum(up_down_keep))
            up_down_keep = [p / total for p in up_down_keep]
        self.up_down_keep = up_down_keep
        self.relative_to = relative_to
        self.antialias = antialias

    def _factor(self, rng: np.random.Generator) -> float:
        if self.up_down_keep is None:
            return _uniform(rng, self.scale)
        branch = int(rng.choice(3, p=self.up_down_keep))
        if branch == 0:
            return _uniform(rng, (1.0, self.scale[1]))
        if branch == 1:
            return _uniform(rng, (self.scale[0], 1.0))
        return 1.0

    def apply(self, image: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        factor = self._factor(rng)
        mode = self.modes[int(rng.integers(len(self.modes)))]
        base = lq_size if self.relative_to == "lq" else image.shape[:2]
        height, width = max(1, round(base[0] * factor)), max(1, round(base[1] * factor))
        return resize_image(image, height, width, mode, self.antialias)


@DEGRADATIONS.register("resize_to_lq")
class ResizeToLq(Degradation):
    """Resize to the LQ size (the HQ crop's size divided by the dataset's ``scale``).

    modes: interpolation modes to pick from uniformly (default [bicubic]).
    antialias: low-pass before shrinking with bicubic/bilinear (default true).
    """

    def __init__(self, modes: list[Mode] = ["bicubic"], antialias: bool = True, path: str = "resize_to_lq"):
        if not modes:
            raise ConfigError("name at least one mode (bicubic, bilinear, area, nearest)", f"{path}.modes")
        self.modes = list(modes)
        self.antialias = antialias

    def apply(self, image: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        mode = self.modes[int(rng.integers(len(self.modes)))]
        return resize_image(image, lq_size[0], lq_size[1], mode, self.antialias)


@DEGRADATIONS.register("noise")
class Noise(Degradation):
    """Additive Gaussian or Poisson (shot) noise.

    gaussian: noise standard deviation in 8-bit levels (1 = 1/255), or a range (default [1, 30]).
    poisson: chance (0-1) of Poisson noise instead of Gaussian (default 0).
    poisson_scale: strength of the Poisson noise, a multiplier of photon noise at 255 photons per unit of
        intensity, or a range (default [0.05, 3]).
    gray: chance (0-1) that the noise is the same on the three channels (luminance noise; default 0).
    """

    def __init__(self, gaussian: Range = [1.0, 30.0], poisson: float = 0.0, poisson_scale: Range = [0.05, 3.0],
                 gray: float = 0.0, path: str = "noise"):
        self.gaussian = _span(gaussian, f"{path}.gaussian", low_bound=0)
        self.poisson = _check_prob(poisson, f"{path}.poisson")
        self.poisson_scale = _span(poisson_scale, f"{path}.poisson_scale", low_bound=0)
        self.gray = _check_prob(gray, f"{path}.gray")

    def apply(self, image: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        use_poisson = rng.random() < self.poisson
        gray = rng.random() < self.gray
        height, width, channels = image.shape
        if use_poisson:
            strength = _uniform(rng, self.poisson_scale)
            base = _to_gray(image)[:, :, None] if gray else image
            levels = 255.0
            noise = (rng.poisson(np.clip(base, 0, 1) * levels) / levels - base).astype(np.float32) * strength
        else:
            sigma = _uniform(rng, self.gaussian) / 255.0
            noise = rng.standard_normal((height, width, 1 if gray else channels), dtype=np.float32) * sigma
        return image + noise


@DEGRADATIONS.register("jpeg")
class Jpeg(Degradation):
    """JPEG compression with OpenCV: 8x8 block artifacts and chroma blur.

    quality: JPEG quality 1-100, or an integer range (default [30, 95]).
    """

    def __init__(self, quality: IntRange = [30, 95], path: str = "jpeg"):
        self.quality = _span(quality, f"{path}.quality", low_bound=1, high_bound=100)

    def apply(self, image: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        quality = int(rng.integers(int(self.quality[0]), int(self.quality[1]) + 1))
        pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("OpenCV could not encode a JPEG")
        decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


@DEGRADATIONS.register("color_jitter")
class ColorJitter(Degradation):
    """Random brightness, contrast, saturation and hue (applied in this order), drawn as in torchvision's
    ColorJitter.

    brightness: multiply by a factor from [1 - b, 1 + b] (default 0: off).
    contrast: blend with the mean gray by a factor from [1 - c, 1 + c] (default 0).
    saturation: blend with the grayscale image by a factor from [1 - s, 1 + s] (default 0).
    hue: rotate hue by a fraction of the colour circle from [-h, h], h <= 0.5 (default 0).
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0, path: str = "color_jitter"):
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise ConfigError(f"must be >= 0, got {value}", f"{path}.{name}")
        if not 0 <= hue <= 0.5:
            raise ConfigError(f"must be within [0, 0.5], got {hue}", f"{path}.hue")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def apply(self, image: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        b = float(rng.uniform(1 - self.brightness, 1 + self.brightness))
        c = float(rng.uniform(1 - self.contrast, 1 + self.contrast))
        s = float(rng.uniform(1 - self.saturation, 1 + self.saturation))
        h = float(rng.uniform(-self.hue, self.hue))
        image = image * b
        mean = float(_to_gray(image).mean())
        image = (image - mean) * c + mean
        gray = _to_gray(image)[:, :, None]
        image = np.clip((image - gray) * s + gray, 0.0, 1.0).astype(np.float32)
        if h:
            hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # float input: hue in degrees [0, 360)
            hsv[:, :, 0] = (hsv[:, :, 0] + h * 360.0) % 360.0
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        return image


@DEGRADATIONS.register("chain")
class Chain(Degradation):
    """A nested list of steps run in order, so a group can share one ``prob``.

    steps: the nested degradation list (same vocabulary).
    """

    def __init__(self, steps: list[dict], path: str = "chain"):
        self.steps = build_steps(steps, f"{path}.steps")

    def apply(self, image: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        return run_steps(self.steps, image, lq_size, rng)


@DEGRADATIONS.register("shuffle")
class Shuffle(Degradation):
    """A nested list of steps run in a random order (e.g. Real-ESRGAN's final resize/sinc vs. JPEG order).

    steps: the nested degradation list (same vocabulary).
    """

    def __init__(self, steps: list[dict], path: str = "shuffle"):
        self.steps = build_steps(steps, f"{path}.steps")

    def apply(self, image: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        order = rng.permutation(len(self.steps))
        return run_steps([self.steps[i] for i in order], image, lq_size, rng)


@DEGRADATIONS.register("one_of")
class OneOf(Degradation):
    """One step of a nested list, chosen at random (e.g. a sinc filter instead of a Gaussian blur).

    steps: the nested degradation list (same vocabulary).
    weights: relative chances of the steps (default: equal).
    """

    def __init__(self, steps: list[dict], weights: Optional[list[float]] = None, path: str = "one_of"):
        self.steps = build_steps(steps, f"{path}.steps")
        if weights is None:
            weights = [1.0] * len(self.steps)
        if len(weights) != len(self.steps) or min(weights, default=0) < 0 or sum(weights) <= 0:
            raise ConfigError(f"expected {len(self.steps)} non-negative weights, one per step, got {weights}",
                              f"{path}.weights")
        self.chances = np.asarray(weights, dtype=np.float64) / float(sum(weights))

    def apply(self, image: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        chosen = int(rng.choice(len(self.steps), p=self.chances))
        return run_steps([self.steps[chosen]], image, lq_size, rng)


_MODES3 = ["area", "bilinear", "bicubic"]
_KERNEL_MIX = {"anisotropic": 0.31, "generalized": 0.15, "plateau": 0.15, "beta_generalized": [0.5, 4.0],
               "beta_plateau": [1.0, 2.0]}

PRESETS: dict[str, list[dict[str, Any]]] = {
    "bicubic": [{"type": "resize_to_lq", "modes": ["bicubic"]}],
    # Real-ESRGAN's second-order chain (Wang et al. 2021, options/train_realesrnet_x4plus.yml) in this
    # vocabulary. Its kernel mix (iso/aniso x gaussian/generalized/plateau 0.45/0.25/0.12/0.03/0.12/0.03) is
    # drawn here as independent anisotropy (0.31) and shape (0.15 generalized, 0.15 plateau) choices.
    "real_esrgan": [
        {"type": "one_of", "weights": [0.9, 0.1], "steps": [
            {"type": "blur", "kernel_size": [7, 21], "sigma": [0.2, 3.0], **_KERNEL_MIX},
            {"type": "sinc", "kernel_size": [7, 21], "cutoff": [math.pi / 3, math.pi]},
        ]},
        {"type": "resize", "scale": [0.15, 1.5], "up_down_keep": [0.2, 0.7, 0.1], "modes": _MODES3},
        {"type": "noise", "gaussian": [1, 30], "poisson": 0.5, "poisson_scale": [0.05, 3.0], "gray": 0.4},
        {"type": "jpeg", "quality": [30, 95]},
        {"type": "one_of", "prob": 0.8, "weights": [0.9, 0.1], "steps": [
            {"type": "blur", "kernel_size": [7, 21], "sigma": [0.2, 1.5], **_KERNEL_MIX},
            {"type": "sinc", "kernel_size": [7, 21], "cutoff": [math.pi / 3, math.pi]},
        ]},
        {"type": "resize", "scale": [0.3, 1.2], "up_down_keep": [0.3, 0.4, 0.3], "modes": _MODES3,
         "relative_to": "lq"},
        {"type": "noise", "gaussian": [1, 25], "poisson": 0.5, "poisson_scale": [0.05, 2.5], "gray": 0.4},
        {"type": "shuffle", "steps": [
            {"type": "chain", "steps": [
                {"type": "resize_to_lq", "modes": _MODES3},
                {"type": "sinc", "prob": 0.8, "kernel_size": [7, 21], "cutoff": [math.pi / 3, math.pi]},
            ]},
            {"type": "jpeg", "quality": [30, 95]},
        ]},
    ],
}


def build_steps(specs: list[dict], path: str) -> list[tuple[float, Degradation]]:
    """Validate and build a degradation list into ``(prob, step)`` pairs; errors name ``path[i].key``."""
    if not isinstance(specs, (list, tuple)):
        raise ConfigError(f"expected a list of degradation steps, got {type(specs).__name__}", path)
    steps = []
    for i, spec in enumerate(specs):
        where = f"{path}[{i}]"
        problems = DEGRADATIONS.check(spec, where, reserved=("prob",))
        if problems:
            raise ConfigError(problems)
        prob = spec.get("prob", 1.0)
        if isinstance(prob, bool) or not isinstance(prob, (int, float)):
            raise ConfigError(f"expected a number between 0 and 1, got {prob!r}", f"{where}.prob")
        _check_prob(prob, f"{where}.prob")
        options = {k: v for k, v in spec.items() if k not in ("type", "prob")}
        steps.append((float(prob), DEGRADATIONS.get(spec["type"])(**options, path=where)))
    return steps


def run_steps(steps: list[tuple[float, Degradation]], image: np.ndarray, lq_size: tuple[int, int],
              rng: np.random.Generator) -> np.ndarray:
    for prob, step in steps:
        # Draw the coin even for prob 1, so adding or removing a `prob:` never shifts later draws' meaning.
        if rng.random() < prob:
            image = np.clip(step.apply(image, lq_size, rng), 0.0, 1.0).astype(np.float32, copy=False)
    return image


class DegradationPipeline:
    """A validated degradation chain: ``pipeline(hq, lq_size, rng)`` -> LQ image of exactly ``lq_size``.

    ``degradations`` is a list of step mappings, a preset name (``bicubic``, ``real_esrgan``) or ``None``
    (``bicubic``). ``quantize`` rounds the result to 8-bit levels, as a saved LQ file would be.
    """

    def __init__(self, degradations: Union[None, str, list[dict]] = None, quantize: bool = True,
                 path: str = "degradations"):
        if degradations is None:
            degradations = "bicubic"
        if isinstance(degradations, str):
            if degradations not in PRESETS:
                raise ConfigError(f"unknown degradation preset '{degradations}'"
                                  f"{did_you_mean(degradations, PRESETS)}; presets: {', '.join(PRESETS)}, "
                                  f"or write a list of steps", path)
            degradations = PRESETS[degradations]
        self.steps = build_steps(degradations, path)
        self.quantize = quantize

    def __call__(self, hq: np.ndarray, lq_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        image = run_steps(self.steps, np.asarray(hq, dtype=np.float32), lq_size, rng)
        if image.shape[:2] != tuple(lq_size):
            image = np.clip(resize_image(image, lq_size[0], lq_size[1], "bicubic"), 0.0, 1.0)
        if self.quantize:
            image = np.rint(image * 255.0) / 255.0
        return image.astype(np.float32, copy=False)
