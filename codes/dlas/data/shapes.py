"""``shapes``: procedural captioned images of coloured shapes, so the triforce trains and is checked on a CPU.

Each image shows one or more shapes on a plain background, each shape a kind (:data:`SHAPES`), a colour of
the fixed :data:`PALETTE`, a size (:data:`SIZES`) and one of nine positions (:data:`POSITIONS`, a 3 x 3 grid);
its caption says what is drawn ("a small red circle in the top left on a blue background"). Shapes are drawn
analytically with 4x4 supersampling (smooth edges), so the same scene can be rendered at any resolution: the
``lq`` option gives a low-resolution rendering of exactly the same scene beside ``hq`` (for an upsampler).

Public helpers, for the models trained on it and for the benchmarks that check them:

* :data:`PALETTE` (name -> RGB 0-255), :data:`SHAPES`, :data:`SIZES`, :data:`POSITIONS`, :data:`PHRASINGS`;
* :func:`caption_of` (attributes -> caption in a phrasing) and :func:`parse_caption` (any caption this module
  writes -> attributes; also accepts a partial description such as "red circle");
* :func:`classify_image`: what a one-shape image shows (background colour, shape colour, kind, size,
  position), measured from the pixels: it scores generated images against their captions.

Attributes are strings: ``shape``, ``color``, ``size``, ``position``, ``background``. An image with several
shapes joins the per-shape values with " and " in caption order (``shape: "circle and square"``).

Colours are jittered by at most ``color_jitter`` levels per channel (default 8). The closest two palette
colours are 81 levels apart (orange and yellow), so up to 23 levels of jitter every pixel of a shape stays
nearest to its named colour (``tests/test_shapes.py`` checks it).
"""
from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from dlas.data.base import SampleKey, SeededDataset, sample_rng, split_key
from dlas.errors import ConfigError, did_you_mean
from dlas.registry import DATASETS

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (130, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "cyan": (40, 200, 210),
    "pink": (245, 150, 200),
    "brown": (130, 80, 40),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Diameter (the side of the shape's bounding square) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.22, "medium": 0.33, "large": 0.44}

# Grid lines of the 3 x 3 positions, as fractions of the image side: a large shape at the edge still fits.
_GRID = {"top": 0.28, "middle": 0.5, "bottom": 0.72, "left": 0.28, "center": 0.5, "right": 0.72}
POSITIONS: dict[str, tuple[float, float]] = {  # name -> (x, y) of the shape's centre
    "top left": (0.28, 0.28), "top": (0.5, 0.28), "top right": (0.72, 0.28),
    "left": (0.28, 0.5), "center": (0.5, 0.5), "right": (0.72, 0.5),
    "bottom left": (0.28, 0.72), "bottom": (0.5, 0.72), "bottom right": (0.72, 0.72),
}
_POSITION_PHRASE = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}  # of the bounding square
_TEMPLATE_BLURS = (0.0, 0.4, 0.7, 1.0, 1.4)  # pixels: the blurs classify_image tries on each shape's outline
_POSITION_JITTER = 0.03  # of the image side: far less than the 0.22 between grid lines
_SIZE_JITTER = 0.05  # relative

PHRASINGS: dict[str, str] = {
    "plain": "a small red circle in the top left on a blue background",
    "background_first": "a blue background with a small red circle in the top left",
    "scene": "on a blue background, a small red circle in the top left",
    "terse": "small red circle, top left, blue background",
}

ATTRIBUTES = ("shape", "color", "size", "position", "background")
_OBJECT_ATTRIBUTES = ("shape", "color", "size", "position")


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape: its named attributes and where exactly it lies (fractions of the image side)."""

    shape: str
    color: str
    size: str
    position: str
    x: float = 0.5
    y: float = 0.5
    diameter: float = 0.3
    rgb: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class Scene:
    """A background colour and the shapes drawn on it, in drawing order."""

    background: str
    background_rgb: tuple[int, int, int]
    objects: tuple[ShapeSpec, ...]

    def attributes(self) -> dict[str, str]:
        """The attribute strings of the scene (several shapes' values joined by " and ")."""
        out = {key: " and ".join(getattr(o, key) for o in self.objects) for key in _OBJECT_ATTRIBUTES}
        out["background"] = self.background
        return out


# ---------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _split_objects(attributes: Mapping[str, str]) -> list[dict[str, str]]:
    parts = {key: str(attributes[key]).split(" and ") for key in _OBJECT_ATTRIBUTES}
    counts = {len(v) for v in parts.values()}
    if len(counts) != 1:
        raise ValueError(f"attributes name different numbers of shapes: {dict(attributes)}")
    return [{key: parts[key][i] for key in _OBJECT_ATTRIBUTES} for i in range(counts.pop())]


def caption_of(attributes: Mapping[str, str], phrasing: str = "plain") -> str:
    """The caption of a scene's attributes (an item's ``shape``, ``color``, ``size``, ``position``,
    ``background``) in one of the :data:`PHRASINGS`."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing '{phrasing}'; choose from {', '.join(PHRASINGS)}")
    objects = _split_objects(attributes)
    background = attributes["background"]
    if phrasing == "terse":
        parts = [f"{o['size']} {o['color']} {o['shape']}, {o['position']}" for o in objects]
        return ", ".join(parts) + f", {background} background"
    described = " and ".join(f"{_article(o['size'])} {o['size']} {o['color']} {o['shape']} "
                             f"{_POSITION_PHRASE[o['position']]}" for o in objects)
    ground = f"{_article(background)} {background} background"
    if phrasing == "plain":
        return f"{described} on {ground}"
    if phrasing == "background_first":
        return f"{ground} with {described}"
    return f"on {ground}, {described}"


_COLOR_WORDS = {**{name: name for name in PALETTE}, "grey": "gray", "violet": "purple"}
_SHAPE_WORDS = {**{name: name for name in SHAPES}, **{f"{name}s": name for name in SHAPES}}
_SIZE_WORDS = {**{name: name for name in SIZES}, "big": "large", "little": "small", "tiny": "small"}
_POSITION_WORDS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom", "left": "left",
                   "right": "right", "center": "center", "centre": "center", "middle": "center"}
_FILLER = {"a", "an", "the", "in", "at", "on", "with", "and", "of", "background", "corner", "is", "there",
           "side", "image", "picture", "shape", "colored", "coloured"}


def _position_name(words: Sequence[str]) -> str:
    vertical = next((w for w in words if w in ("top", "bottom")), None)
    horizontal = next((w for w in words if w in ("left", "right")), None)
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    return vertical or horizontal or "center"


def parse_description(text: str) -> tuple[str | None, list[dict[str, str]]]:
    """``(background or None, [per-shape attributes])`` of a caption or a partial description.

    Every word is read against the vocabulary of this module: colours (also "grey"), shape kinds (and plurals),
    sizes ("big", "little" too) and position words ("top", "upper", "left", "middle", ...). A colour right
    before "background", or after "on"/"on a" where no shape follows, is the background. A shape's size and
    colour precede its kind; position words belong to the shape they follow (or, before any shape, to the first
    shape). Attributes a description does not mention are left out. Raises ValueError on an unknown word.
    """
    words = re.findall(r"[a-z]+", text.lower())
    background = None
    objects: list[dict[str, Any]] = []
    pending: dict[str, str] = {}
    leading_position: list[str] = []
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        after_next = words[i + 2] if i + 2 < len(words) else ""
        if word in _COLOR_WORDS:
            color = _COLOR_WORDS[word]
            previous = [w for w in words[max(0, i - 2):i]]
            is_ground = following == "background" or (
                "on" in previous and previous[-1] in ("on", "a", "an") and following not in _SHAPE_WORDS
                and not (following in _SIZE_WORDS or after_next in _SHAPE_WORDS))
            if is_ground:
                background = color
            else:
                pending["color"] = color
        elif word in _SIZE_WORDS:
            pending["size"] = _SIZE_WORDS[word]
        elif word in _SHAPE_WORDS:
            objects.append({**pending, "shape": _SHAPE_WORDS[word], "_where": []})
            pending = {}
        elif word in _POSITION_WORDS:
            (objects[-1]["_where"] if objects else leading_position).append(_POSITION_WORDS[word])
        elif word not in _FILLER:
            raise ValueError(f"unknown word '{word}' in '{text}'{did_you_mean(word, _known_words())}")
    if pending and not objects:  # "red" or "large blue": a shape of any kind
        objects.append({**pending, "_where": []})
    if leading_position and objects:
        objects[0]["_where"] = leading_position + objects[0]["_where"]
    result = []
    for obj in objects:
        where = obj.pop("_where")
        if where:
            obj["position"] = _position_name(where)
        result.append(obj)
    return background, result


def _known_words() -> list[str]:
    return sorted({*_COLOR_WORDS, *_SHAPE_WORDS, *_SIZE_WORDS, *_POSITION_WORDS, *_FILLER})


def parse_caption(text: str) -> dict[str, str]:
    """The attributes (``shape``, ``color``, ``size``, ``position``, ``background``) a caption states.

    Reads every phrasing :func:`caption_of` writes, and similar free text; several shapes' values are joined
    with " and " as in the items. Attributes the caption leaves out are missing from the result (a position
    word alone such as "top" means the top middle; no position word at all leaves ``position`` out).
    """
    background, objects = parse_description(text)
    out: dict[str, str] = {}
    for key in _OBJECT_ATTRIBUTES:
        values = [o[key] for o in objects if key in o]
        if values and len(values) == len(objects):
            out[key] = " and ".join(values)
    if background is not None:
        out["background"] = background
    return out


# ---------------------------------------------------------------------- classification of pixels
def _nearest_color(rgb: np.ndarray, exclude: Sequence[str] = ()) -> str:
    names = [n for n in PALETTE if n not in exclude]
    table = np.array([PALETTE[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def classify_image(image: torch.Tensor | np.ndarray) -> dict[str, str]:
    """What a one-shape image shows, measured from its pixels (not from a caption).

    ``image``: CHW float in [0, 1] (a tensor or array). Returns ``background`` (the palette colour nearest the
    median of the 2-pixel border), ``color`` (the non-background palette colour nearest the median of the
    pixels most unlike the background), ``shape``, ``size`` (nearest diameter of :data:`SIZES`) and
    ``position`` (nearest point of the 3 x 3 grid). Each pixel's coverage is the projection of its colour onto
    the line from the background colour to the shape's, so antialiased edges count fractionally; each kind's
    outline is then fitted to the coverage's area and centroid, also under a few blurs up to 1.4 pixels, and
    the closest fit gives kind, size and position. Clean renders are read without error at 32 and 64 pixels,
    and so are nearly all blurred (Gaussian sigma 0.8 px) or noisy (std 8 levels) ones
    (``tests/test_shapes.py``), so a decoder's soft output can be scored against its caption. An image without
    a shape gets ``"none"`` for everything but the background. Several shapes in one image are read as one.
    """
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, float)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"classify_image takes a CHW RGB image, got shape {tuple(array.shape)}")
    pixels = np.clip(array, 0, 1).transpose(1, 2, 0).astype(np.float64) * 255
    height, width = pixels.shape[:2]
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    ground = np.median(border, axis=0)
    background = _nearest_color(ground)
    # Distance from the background, smoothed so that pixel noise does not make the strongest "shape" pixels.
    distance = _gaussian_blur(np.sqrt(((pixels - ground) ** 2).sum(axis=2)), 0.7)
    core = distance > 0.75 * distance.max()
    if distance.max() < 30:  # palette colours are at least 81 levels apart: nothing is drawn
        return {"background": background, "color": "none", "shape": "none", "size": "none", "position": "none"}
    fill_rgb = np.median(pixels[core], axis=0)
    color = _nearest_color(fill_rgb, exclude=[background])
    direction = fill_rgb - ground
    coverage = ((pixels - ground) @ direction) / float(direction @ direction)
    # Only near the shape: far-off background noise would add to its area. Inside, noise averages out.
    rows, cols = np.nonzero(core)
    margin = 3 + math.ceil(3 * max(_TEMPLATE_BLURS))
    window = np.zeros_like(coverage, dtype=bool)
    top, left = max(0, rows.min() - margin), max(0, cols.min() - margin)
    window[top:rows.max() + margin + 1, left:cols.max() + margin + 1] = True
    coverage = np.where(window, np.clip(coverage, -1, 2), 0.0)
    area = float(coverage.sum()) / (width * height)  # in image-side fractions squared
    if area <= 0:  # more of the window lies away from the shape's colour than towards it: no outline to fit
        return {"background": background, "color": color, "shape": "none", "size": "none", "position": "none"}
    xs = (np.arange(width) + 0.5) / width
    ys = (np.arange(height) + 0.5) / height
    mass_x = float((coverage.sum(axis=0) * xs).sum() / coverage.sum())
    mass_y = float((coverage.sum(axis=1) * ys).sum() / coverage.sum())
    best = None
    for kind in SHAPES:  # fit each kind's outline to the measured area and centroid; keep the closest
        diameter = math.sqrt(area / _AREA[kind])
        centre_y = mass_y - (diameter / 6 if kind == "triangle" else 0)  # a triangle's centroid sits low
        template = _render_mask(ShapeSpec(kind, "", "", "", mass_x, centre_y, diameter), width, height)
        for sigma in _TEMPLATE_BLURS:  # a decoder's output is often soft: compare at a few blurs too
            error = float(np.abs(_gaussian_blur(template, sigma) - coverage).sum())
            if best is None or error < best[0]:
                best = (error, kind, diameter, centre_y)
    _, shape, diameter, centre_y = best
    size = min(SIZES, key=lambda name: abs(SIZES[name] - diameter))
    vertical = min(("top", "middle", "bottom"), key=lambda name: abs(_GRID[name] - centre_y))
    horizontal = min(("left", "center", "right"), key=lambda name: abs(_GRID[name] - mass_x))
    position = {("middle", "center"): "center"}.get((vertical, horizontal)) or \
        " ".join(p for p in (vertical, horizontal) if p not in ("middle", "center"))
    return {"background": background, "color": color, "shape": shape, "size": size, "position": position}


# ---------------------------------------------------------------------- drawing
def _coverage(spec: ShapeSpec, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of the sample points (xs, ys in image-side fractions) inside the shape."""
    r = spec.diameter / 2
    dx, dy = xs - spec.x, ys - spec.y
    if spec.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if spec.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if spec.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    # triangle pointing up: apex at the top of the bounding square, base along its bottom
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A 2-D array blurred by a Gaussian of ``sigma`` pixels (edges extended); ``sigma`` 0: unchanged."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma * sigma))
    taps /= taps.sum()
    for axis in (0, 1):
        padding = [(radius, radius) if a == axis else (0, 0) for a in (0, 1)]
        padded = np.pad(image, padding, mode="edge")
        length = image.shape[axis]
        image = sum(t * np.take(padded, np.arange(i, i + length), axis=axis) for i, t in enumerate(taps))
    return image


def _render_mask(spec: ShapeSpec, width: int, height: int) -> np.ndarray:
    """The fraction of each pixel the shape covers (4 x 4 supersampled; 2 x 2 above 128 pixels)."""
    supersample = 4 if max(width, height) <= 128 else 2
    xs = ((np.arange(width * supersample) + 0.5) / (width * supersample))[None, :]
    ys = ((np.arange(height * supersample) + 0.5) / (height * supersample))[:, None]
    inside = _coverage(spec, xs, ys).astype(np.float64)
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))


def render(scene: Scene, resolution: int) -> np.ndarray:
    """The scene as an HWC float32 RGB array in [0, 1], ``resolution`` pixels square (antialiased)."""
    image = np.broadcast_to(np.array(scene.background_rgb, np.float64) / 255, (resolution, resolution, 3)).copy()
    for spec in scene.objects:
        alpha = _render_mask(spec, resolution, resolution)[..., None]
        image = image * (1 - alpha) + alpha * (np.array(spec.rgb, np.float64) / 255)
    return image.astype(np.float32)


# ---------------------------------------------------------------------- the dataset
def _check_names(values: Sequence[str], known: Sequence[str], option: str) -> list[str]:
    values = list(values)
    if not values:
        raise ConfigError(f"must name at least one of {', '.join(known)}", option)
    for i, value in enumerate(values):
        if value not in known:
            raise ConfigError(f"unknown {option.rstrip('s')} '{value}'{did_you_mean(value, known)}; "
                              f"choose from {', '.join(known)}", f"{option}[{i}]")
    return values


@dataclass(frozen=True)
class _Pattern:
    """A held-out combination: the attributes it fixes (background separately, as it is not per shape)."""

    text: str
    fixed: tuple[tuple[str, str], ...]
    background: str | None

    def matches_object(self, obj: ShapeSpec | Mapping[str, str], background: str) -> bool:
        get = obj.get if isinstance(obj, Mapping) else (lambda key: getattr(obj, key))
        return all(get(k) == v for k, v in self.fixed) and self.background in (None, background)


def _parse_holdout(entries: Sequence[str]) -> list[_Pattern]:
    patterns = []
    for i, text in enumerate(entries):
        try:
            background, objects = parse_description(text)
        except ValueError as exc:
            raise ConfigError(str(exc), f"holdout[{i}]") from exc
        if len(objects) > 1:
            raise ConfigError(f"'{text}' describes {len(objects)} shapes; a held-out combination is one shape "
                              "(list several entries instead)", f"holdout[{i}]")
        fixed = tuple(sorted(objects[0].items())) if objects else ()
        if not fixed and background is None:
            raise ConfigError(f"'{text}' names no attribute to hold out", f"holdout[{i}]")
        patterns.append(_Pattern(text, fixed, background))
    return patterns


@DATASETS.register("shapes")
class ShapesDataset(SeededDataset):
    """Procedural captioned images of coloured shapes on a coloured background (seeded, any resolution).

    Items: ``hq`` (3 x resolution x resolution, float in [0, 1]), ``caption`` (what is drawn, e.g. "a small red
    circle in the top left on a blue background"), ``path`` (a stable id such as ``shapes_train_v0_e0_000012``)
    and the attributes as strings, ``shape``, ``color``, ``size``, ``position``, ``background`` (several shapes'
    values joined by " and "); with ``lq_resolution`` also ``lq``, the same scene at that resolution.
    Every choice comes from the item's seeded generator: a scene is a pure function of (run seed, variant,
    epoch, index), identical with any number of loader workers and after a resume. Drawing a 32-pixel item
    takes about 0.3 ms.

    resolution: image side in pixels (16 or more; 32 and 64 are the usual ones).
    count: items per epoch (default 10000).
    shapes: shape kinds to draw (default all of circle, square, triangle, diamond).
    colors: shape colours, names of ``dlas.data.shapes.PALETTE`` (default all twelve).
    backgrounds: background colours (default all twelve); a shape never has its background's colour.
    sizes: sizes to draw, of small (0.22 of the side), medium (0.33), large (0.44); default [small, large].
    positions: positions to draw, of the 3 x 3 grid (top left, top, top right, left, center, right, bottom
        left, bottom, bottom right; default all nine).
    objects: shapes per image, a number or a list to draw from uniformly (default 1). Several shapes never
        overlap and never share a position; their caption lists them in drawing order.
    holdout: combinations removed from the data, each a short description: ``red circle``, ``large blue``,
        ``square in the top left``, ``triangle on a green background``. A shape matching any entry never
        appears in the ``train`` split.
    split: ``train`` (default: nothing held out appears), ``holdout`` (every image shows a held-out
        combination, for testing composition a model never saw) or ``all`` (holdout ignored).
    phrasings: caption phrasings to draw from (plain, background_first, scene, terse; default all).
    color_jitter: per-channel colour jitter in 8-bit levels (default 8; at most 23 so that every colour keeps
        its name). Positions move by up to 3% of the side and sizes by up to 5%.
    lq_resolution: also render the scene at this smaller resolution as ``lq`` (null: no ``lq``).
    new_each_epoch: draw new scenes every epoch (default true: an endless stream); false repeats epoch 0's
        ``count`` scenes (a fixed finite set). Items read by a plain index (validation) are epoch 0's.
    variant: datasets with different variants draw independent scenes; give a validation set another variant
        than the training set (with the same variant, validation item i is training item i of epoch 0).
    """

    def __init__(self, resolution: int = 32, count: int = 10000, shapes: list[str] = SHAPES,
                 colors: list[str] | None = None, backgrounds: list[str] | None = None,
                 sizes: list[str] = ("small", "large"), positions: list[str] | None = None,
                 objects: int | list[int] = 1, holdout: list[str] = (),
                 split: Literal["train", "holdout", "all"] = "train", phrasings: list[str] | None = None,
                 color_jitter: int = 8, lq_resolution: int | None = None, new_each_epoch: bool = True,
                 variant: int = 0):
        super().__init__()
        if resolution < 16:
            raise ConfigError(f"must be at least 16 pixels, got {resolution}", "resolution")
        if count < 1:
            raise ConfigError(f"must be at least 1, got {count}", "count")
        if lq_resolution is not None and not 1 <= lq_resolution <= resolution:
            raise ConfigError(f"must be between 1 and resolution ({resolution}), got {lq_resolution}",
                              "lq_resolution")
        if not 0 <= color_jitter <= 23:
            raise ConfigError(f"must be between 0 and 23 levels (more can make a colour's name untrue), got "
                              f"{color_jitter}", "color_jitter")
        if split not in ("train", "holdout", "all"):
            raise ConfigError(f"must be train, holdout or all, got {split!r}", "split")
        self.resolution, self.count, self.lq_resolution = resolution, count, lq_resolution
        self.shapes = _check_names(shapes, SHAPES, "shapes")
        self.colors = _check_names(colors if colors is not None else list(PALETTE), list(PALETTE), "colors")
        self.backgrounds = _check_names(backgrounds if backgrounds is not None else list(PALETTE), list(PALETTE),
                                        "backgrounds")
        self.sizes = _check_names(sizes, list(SIZES), "sizes")
        self.positions = _check_names(positions if positions is not None else list(POSITIONS), list(POSITIONS),
                                      "positions")
        self.phrasings = _check_names(phrasings if phrasings is not None else list(PHRASINGS), list(PHRASINGS),
                                      "phrasings")
        counts = [objects] if isinstance(objects, int) else list(objects)
        if not counts or any(not 1 <= n <= len(self.positions) for n in counts):
            raise ConfigError(f"shapes per image must be between 1 and the number of positions "
                              f"({len(self.positions)}), got {objects!r}", "objects")
        self.object_counts = counts
        self.color_jitter = color_jitter
        self.split = split
        self.new_each_epoch = new_each_epoch
        self.variant = variant
        self.holdout = _parse_holdout(holdout)
        if split == "holdout" and not self.holdout:
            raise ConfigError("split 'holdout' needs the held-out combinations in 'holdout'", "split")
        self._check_holdout_against_choices()

    # -------------------------------------------------------------- what can be drawn
    def _combinations(self) -> list[tuple[dict[str, str], str]]:
        return [({"shape": s, "color": c, "size": z, "position": p}, b)
                for s, c, z, p, b in itertools.product(self.shapes, self.colors, self.sizes, self.positions,
                                                       self.backgrounds) if c != b]

    def _check_holdout_against_choices(self) -> None:
        combos = self._combinations()
        if not combos:
            raise ConfigError("colors and backgrounds leave no combination (a shape never has its background's "
                              "colour)", "backgrounds")
        held = [any(p.matches_object(obj, bg) for p in self.holdout) for obj, bg in combos]
        for i, pattern in enumerate(self.holdout):
            if not any(pattern.matches_object(obj, bg) for obj, bg in combos):
                raise ConfigError(f"'{pattern.text}' matches nothing this dataset draws (check its shapes, colors, "
                                  "sizes, positions and backgrounds)", f"holdout[{i}]")
        if self.split == "train" and all(held):
            raise ConfigError("the held-out combinations cover everything this dataset draws; the train split "
                              "would be empty", "holdout")
        self._allowed = [c for c, h in zip(combos, held) if not h] if self.split == "train" else combos

    def is_held_out(self, attributes: Mapping[str, str]) -> bool:
        """Whether a scene (an item's attributes) shows any held-out combination."""
        background = attributes["background"]
        return any(p.matches_object(obj, background) for obj in _split_objects(attributes) for p in self.holdout)

    # -------------------------------------------------------------- drawing a scene
    def _place(self, attrs: Mapping[str, str], rng: np.random.Generator) -> ShapeSpec:
        x, y = POSITIONS[attrs["position"]]
        jitter = rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, size=2)
        diameter = SIZES[attrs["size"]] * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))
        base = np.array(PALETTE[attrs["color"]])
        rgb = np.clip(base + rng.integers(-self.color_jitter, self.color_jitter + 1, size=3), 0, 255)
        return ShapeSpec(attrs["shape"], attrs["color"], attrs["size"], attrs["position"], x + float(jitter[0]),
                         y + float(jitter[1]), diameter, tuple(int(v) for v in rgb))

    def _held_out_first(self, rng: np.random.Generator) -> tuple[dict[str, str], str]:
        """A single-shape combination matching a held-out entry chosen uniformly (the holdout split)."""
        pattern = self.holdout[int(rng.integers(len(self.holdout)))]
        matching = [(obj, bg) for obj, bg in self._allowed if pattern.matches_object(obj, bg)]
        return matching[int(rng.integers(len(matching)))]

    def scene(self, rng: np.random.Generator) -> Scene:
        """A random scene drawn from ``rng`` under this dataset's choices (split and holdout included).

        Several shapes are placed one by one, each new one redrawn until it overlaps none before it; a scene
        that gets stuck (a large shape in the centre leaves no room) is started again.
        """
        count = self.object_counts[int(rng.integers(len(self.object_counts)))]
        for _ in range(100):
            if self.split == "holdout":
                first, background = self._held_out_first(rng)
            else:
                first, background = self._allowed[int(rng.integers(len(self._allowed)))]
            placed = [self._place(first, rng)]
            for _ in range(50 * count):
                if len(placed) == count:
                    break
                candidate = self._another_shape(background, placed, rng)
                if candidate is not None:
                    placed.append(candidate)
            if len(placed) == count:
                background_rgb = np.clip(np.array(PALETTE[background]) +
                                         rng.integers(-self.color_jitter, self.color_jitter + 1, size=3), 0, 255)
                return Scene(background, tuple(int(v) for v in background_rgb), tuple(placed))
        raise ConfigError(f"cannot place {count} non-overlapping shapes with these sizes and positions; use fewer "
                          "objects or smaller sizes", "objects")

    def _another_shape(self, background: str, placed: list[ShapeSpec],
                       rng: np.random.Generator) -> ShapeSpec | None:
        """A random shape that may join ``placed`` on ``background``, or None when the draw does not fit."""
        obj = {"shape": self.shapes[int(rng.integers(len(self.shapes)))],
               "color": self.colors[int(rng.integers(len(self.colors)))],
               "size": self.sizes[int(rng.integers(len(self.sizes)))],
               "position": self.positions[int(rng.integers(len(self.positions)))]}
        if obj["color"] == background or any(obj["position"] == o.position for o in placed):
            return None
        if self.split == "train" and any(p.matches_object(obj, background) for p in self.holdout):
            return None
        candidate = self._place(obj, rng)
        return None if any(_overlap(candidate, o) for o in placed) else candidate

    # -------------------------------------------------------------- items
    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        epoch, index = split_key(key)
        if not 0 <= index < self.count:
            raise IndexError(f"shapes: index {index} is outside 0..{self.count - 1}")
        if not self.new_each_epoch:
            epoch = 0
        split_code = ("train", "holdout", "all").index(self.split)
        rng = sample_rng(self.seed, epoch, index, self.variant, split_code)
        scene = self.scene(rng)
        attributes = scene.attributes()
        phrasing = self.phrasings[int(rng.integers(len(self.phrasings)))]
        item: dict[str, Any] = {"hq": _to_tensor(render(scene, self.resolution))}
        if self.lq_resolution is not None:
            item["lq"] = _to_tensor(render(scene, self.lq_resolution))
        item["caption"] = caption_of(attributes, phrasing)
        item["path"] = f"shapes_{self.split}_v{self.variant}_e{epoch}_{index:06d}"
        item.update(attributes)
        return item


def _overlap(a: ShapeSpec, b: ShapeSpec, margin: float = 0.02) -> bool:
    """Whether two placed shapes' bounding squares come closer than ``margin`` (of the image side)."""
    reach = (a.diameter + b.diameter) / 2 + margin
    return abs(a.x - b.x) < reach and abs(a.y - b.y) < reach


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
