"""General-purpose injectors: run a network, and small tensor transforms (noise, resize, crop, sums, picks).

Every injector reads state keys named by ``in`` (or ``like``) and writes the keys named by ``out``. Random
injectors draw from torch's global RNG, which the trainer seeds and saves with each checkpoint, so a resumed
run draws the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
from typing import Any, Literal, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from dlas.context import Context
from dlas.errors import ConfigError
from dlas.injectors.base import Injector
from dlas.registry import INJECTORS

KeySpec = Union[str, list[str], dict[str, str]]


def _keys_of(spec: KeySpec, option: str) -> list[str]:
    """The state keys named by a key / list-of-keys / mapping-to-keys option (mapping: its values)."""
    keys = list(spec.values()) if isinstance(spec, dict) else [spec] if isinstance(spec, str) else list(spec)
    if not keys:
        raise ConfigError("names no state key; give a key, a list of keys or a mapping to keys", option)
    return keys


def _pair(value: Union[int, list[int]], option: str) -> tuple[int, int]:
    """``(height, width)`` from a number or a ``[height, width]`` list."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ConfigError(f"expected a number or [height, width], got {value!r}", option)
    return pair


@INJECTORS.register("generator")
class GeneratorInjector(Injector):
    """Calls a network on state keys and stores what it returns.

    Options:
      network: name of the network under ``networks:`` to call.
      in: the inputs. A key (``in: lq``) is passed as the one argument; a list (``in: [lq, noise]``) is passed
        positionally in that order; a mapping (``in: {x: lq, t: timestep}``) is passed as keyword arguments
        (argument name -> state key).
      out: where the result goes. A key (``out: gen``) stores the result as it is (a tuple stays a tuple; pick
        from it with the ``index`` injector); a list (``out: [gen, features]``) unpacks a tuple/list result of
        exactly that many items; a mapping (``out: {mean: mu, logdet: logdet}``) stores items of a dict result
        (result key -> state key).
      grad: false runs the network under ``torch.no_grad()`` (e.g. the generator inside a discriminator step):
        no graph is built, saving memory, and nothing flows back through the outputs.
      kwargs: constant keyword arguments added to every call (``kwargs: {reverse: true}``).
    """

    def __init__(self, network: str = "generator", in_: KeySpec = "lq", out: KeySpec = "gen", grad: bool = True,
                 kwargs: Optional[dict[str, Any]] = None):
        reads = _keys_of(in_, "in")
        writes = _keys_of(out, "out")
        self.kwargs = dict(kwargs or {})
        if isinstance(in_, dict):
            clash = sorted(set(in_) & set(self.kwargs))
            if clash:
                raise ConfigError(f"argument(s) {', '.join(clash)} are given by both 'in' and 'kwargs'; keep one",
                                  "kwargs")
        super().__init__(reads=reads, writes=writes, networks=[network])
        self.network = network
        self.in_ = in_
        self.out = out
        self.grad = grad

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        net = ctx.networks[self.network]
        args: list[Any] = []
        kwargs = dict(self.kwargs)
        if isinstance(self.in_, str):
            args = [state[self.in_]]
        elif isinstance(self.in_, dict):
            kwargs.update({arg: state[key] for arg, key in self.in_.items()})
        else:
            args = [state[key] for key in self.in_]
        with contextlib.nullcontext() if self.grad else torch.no_grad():
            result = net(*args, **kwargs)
        return self._unpack(result)

    def _unpack(self, result: Any) -> dict[str, Any]:
        if isinstance(self.out, str):
            return {self.out: result}
        if isinstance(self.out, dict):
            if not isinstance(result, Mapping):
                raise ValueError(f"generator injector: 'out' is a mapping, but network '{self.network}' returned "
                                 f"{type(result).__name__}, not a dict")
            missing = [k for k in self.out if k not in result]
            if missing:
                raise ValueError(f"generator injector: network '{self.network}' returned no {missing}; "
                                 f"it returned keys {sorted(result)}")
            return {key: result[name] for name, key in self.out.items()}
        if not isinstance(result, (tuple, list)) or len(result) != len(self.out):
            got = f"{len(result)} outputs" if isinstance(result, (tuple, list)) else f"one {type(result).__name__}"
            raise ValueError(f"generator injector: 'out' lists {len(self.out)} keys {self.out}, but network "
                             f"'{self.network}' returned {got}")
        return dict(zip(self.out, result))


@INJECTORS.register("noise")
class NoiseInjector(Injector):
    """Adds gaussian noise to a tensor: ``out = in + std * N(0, 1)``.

    Options:
      in / out: the state keys read and written.
      std: the noise's standard deviation in the tensor's units (0.01 on [0, 1] images is about 2.5 grey
        levels of 255). A pair ``[low, high]`` draws a std uniformly from that range for each sample (along
        the first dimension), for training on a range of noise levels.
    """

    def __init__(self, in_: str, out: str, std: Union[float, list[float]] = 0.01):
        super().__init__(reads=[in_], writes=[out])
        if isinstance(std, list):
            if len(std) != 2 or not 0 <= std[0] <= std[1]:
                raise ConfigError(f"a std range is [low, high] with 0 <= low <= high, got {std!r}", "std")
        elif std < 0:
            raise ConfigError(f"must be >= 0, got {std}", "std")
        self.in_ = in_
        self.out = out
        self.std = std

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        x = state[self.in_]
        if isinstance(self.std, list):
            low, high = self.std
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)
            std = low + (high - low) * torch.rand(shape, device=x.device, dtype=x.dtype)
        else:
            std = self.std
        return {self.out: x + std * torch.randn_like(x)}


@INJECTORS.register("interpolate")
class InterpolateInjector(Injector):
    """Resizes an image batch with ``torch.nn.functional.interpolate``.

    Options:
      in / out: the state keys read and written (NCHW tensors).
      scale_factor: resize by this factor (0.25 makes a 4x smaller image; 4 a 4x larger one).
      size: resize to this size instead, a number or ``[height, width]``. Give exactly one of the two.
      mode: nearest, nearest-exact, bilinear, bicubic or area (area averages whole pixels when shrinking).
        bilinear and bicubic use ``align_corners=False``, the convention of image libraries.
      antialias: low-pass filter before shrinking (bilinear and bicubic only); with bicubic this comes close to
        PIL's and MATLAB's ``imresize`` downsampling.
    """

    def __init__(self, in_: str, out: str, scale_factor: Optional[float] = None,
                 size: Union[int, list[int], None] = None,
                 mode: Literal["nearest", "nearest-exact", "bilinear", "bicubic", "area"] = "bilinear",
                 antialias: bool = False):
        super().__init__(reads=[in_], writes=[out])
        if (scale_factor is None) == (size is None):
            raise ConfigError("give exactly one of 'scale_factor' and 'size'", "scale_factor")
        if scale_factor is not None and scale_factor <= 0:
            raise ConfigError(f"must be > 0, got {scale_factor}", "scale_factor")
        if antialias and mode not in ("bilinear", "bicubic"):
            raise ConfigError(f"antialias works with bilinear and bicubic only, not {mode}", "antialias")
        self.in_ = in_
        self.out = out
        self.scale_factor = scale_factor
        self.size = None if size is None else _pair(size, "size")
        self.mode = mode
        self.antialias = antialias

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        align_corners = False if self.mode in ("bilinear", "bicubic") else None
        resized = F.interpolate(state[self.in_], size=self.size, scale_factor=self.scale_factor, mode=self.mode,
                                align_corners=align_corners, antialias=self.antialias)
        return {self.out: resized}


@INJECTORS.register("crop")
class CropInjector(Injector):
    """Crops the last two (height, width) dimensions of a tensor.

    Options:
      in / out: the state keys read and written.
      size: the crop, a number or ``[height, width]``.
      offset: top-left corner, a number or ``[top, left]``. Left out, each sample (first dimension of a 4-D or
        larger tensor) gets its own uniformly random position. To crop a low- and a high-resolution image at
        matching places, use the ``image_patch`` injector instead.
    """

    def __init__(self, in_: str, out: str, size: Union[int, list[int]] = 64,
                 offset: Union[int, list[int], None] = None):
        super().__init__(reads=[in_], writes=[out])
        self.in_ = in_
        self.out = out
        self.size = _pair(size, "size")
        self.offset = None if offset is None else _pair(offset, "offset")
        if min(self.size) < 1:
            raise ConfigError(f"must be >= 1, got {size!r}", "size")
        if self.offset is not None and min(self.offset) < 0:
            raise ConfigError(f"must be >= 0, got {offset!r}", "offset")

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        x = state[self.in_]
        height, width = x.shape[-2:]
        crop_h, crop_w = self.size
        top_max, left_max = height - crop_h, width - crop_w
        if self.offset is not None:
            top, left = self.offset
            if top > top_max or left > left_max:
                raise ValueError(f"crop injector: a {crop_h}x{crop_w} crop at [{top}, {left}] does not fit "
                                 f"'{self.in_}' of size {height}x{width}")
            return {self.out: x[..., top:top + crop_h, left:left + crop_w]}
        if top_max < 0 or left_max < 0:
            raise ValueError(f"crop injector: a {crop_h}x{crop_w} crop does not fit '{self.in_}' of size "
                             f"{height}x{width}")
        if x.dim() < 4:
            top, left = (int(torch.randint(m + 1, ())) for m in (top_max, left_max))
            return {self.out: x[..., top:top + crop_h, left:left + crop_w]}
        tops = torch.randint(top_max + 1, (x.shape[0],)).tolist()
        lefts = torch.randint(left_max + 1, (x.shape[0],)).tolist()
        crops = [x[i, ..., top:top + crop_h, left:left + crop_w] for i, (top, left) in enumerate(zip(tops, lefts))]
        return {self.out: torch.stack(crops)}


@INJECTORS.register("constant")
class ConstantInjector(Injector):
    """A tensor shaped like (same size, dtype, device) the state key ``like``, filled with ``value``."""

    def __init__(self, like: str, out: str, value: float = 0.0):
        super().__init__(reads=[like], writes=[out])
        self.like = like
        self.out = out
        self.value = value

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        return {self.out: torch.full_like(state[self.like], self.value)}


@INJECTORS.register("randn_like")
class RandnLikeInjector(Injector):
    """Standard normal noise (mean 0, std 1) shaped like the state key ``like``, e.g. a flow's latent ``z``."""

    def __init__(self, like: str, out: str):
        super().__init__(reads=[like], writes=[out])
        self.like = like
        self.out = out

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        return {self.out: torch.randn_like(state[self.like])}


@INJECTORS.register("detach")
class DetachInjector(Injector):
    """A copy of ``in`` cut from the autograd graph (a tensor, or each tensor of a list/tuple), stored as ``out``.

    Losses on ``out`` then train nothing upstream of ``in``.
    """

    def __init__(self, in_: str, out: str):
        super().__init__(reads=[in_], writes=[out])
        self.in_ = in_
        self.out = out

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        value = state[self.in_]
        if isinstance(value, (list, tuple)):
            return {self.out: type(value)(v.detach() if torch.is_tensor(v) else v for v in value)}
        return {self.out: value.detach()}


@INJECTORS.register("add")
class AddInjector(Injector):
    """The sum of several state tensors, optionally weighted: ``out = sum(weights[i] * in[i])``.

    Options:
      in: the keys to add (same or broadcastable shapes).
      out: the key written.
      weights: one factor per key; left out, all are 1.
    """

    def __init__(self, in_: list[str], out: str, weights: Optional[list[float]] = None):
        super().__init__(reads=_keys_of(in_, "in"), writes=[out])
        if weights is not None and len(weights) != len(in_):
            raise ConfigError(f"gives {len(weights)} weights for {len(in_)} keys in 'in'; give one per key",
                              "weights")
        self.in_ = list(in_)
        self.out = out
        self.weights = weights

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        weights = self.weights or [1.0] * len(self.in_)
        total = None
        for key, weight in zip(self.in_, weights):
            term = state[key] if weight == 1.0 else state[key] * weight
            total = term if total is None else total + term
        return {self.out: total}


@INJECTORS.register("scale")
class ScaleInjector(Injector):
    """Multiplies a state tensor by a constant: ``out = factor * in`` (e.g. 2 * x - 1 needs ``scale`` + ``add``)."""

    def __init__(self, in_: str, out: str, factor: float):
        super().__init__(reads=[in_], writes=[out])
        self.in_ = in_
        self.out = out
        self.factor = factor

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        return {self.out: state[self.in_] * self.factor}


@INJECTORS.register("index")
class IndexInjector(Injector):
    """Picks one item: ``in[index]`` of a list/tuple (e.g. one output of a multi-output network), or
    ``in.select(dim, index)`` of a tensor (the dimension is removed). Negative indices count from the end.

    Options:
      in / out: the state keys read and written.
      index: which item.
      dim: the tensor dimension to index (lists and tuples only have dimension 0).
    """

    def __init__(self, in_: str, out: str, index: int = 0, dim: int = 0):
        super().__init__(reads=[in_], writes=[out])
        self.in_ = in_
        self.out = out
        self.index = index
        self.dim = dim

    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        value = state[self.in_]
        if torch.is_tensor(value):
            return {self.out: value.select(self.dim, self.index)}
        if self.dim != 0:
            raise ValueError(f"index injector: '{self.in_}' is a {type(value).__name__}, which only has dim 0, "
                             f"not dim {self.dim}")
        if not -len(value) <= self.index < len(value):
            raise ValueError(f"index injector: index {self.index} is out of range for '{self.in_}', "
                             f"which has {len(value)} items")
        return {self.out: value[self.index]}
