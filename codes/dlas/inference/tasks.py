"""Inference tasks: what a trained run does at test time, for any model family.

A task turns a :class:`Request` (an image, a caption, a seed, a count) into images with a run's networks.
``dlas-test`` and the evaluators both work through tasks, so a family adds inference by adding a task:

* ``upscale`` (:class:`UpscaleTask`): an image-to-image network on an image, tiled if asked; with
  temperatures, a stochastic one's ``sample(lq, temperature=T)`` (SRFlow). Outputs are scored against
  reference images.
* ``reconstruct`` (:class:`ReconstructTask`): an autoencoder's reconstruction of an image.
* ``sample`` (:class:`SampleTask`): a generative network's ``generate(count, generator, ...)``, unconditional,
  from a caption or from an image, with a seed.

A task is registered in :data:`dlas.registry.TASKS`; its constructor takes the framework's ``networks`` (name ->
module, loaded on first use), ``config`` (the run's resolved config), ``device`` and ``autocast``, then its own
options, which are checked against its signature like any component's. A network names its default task with a
class attribute ``inference_task = "sample"`` (default ``upscale``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager, Mapping, Optional

import torch

from dlas.build import count_nonfinite, default_network_name
from dlas.errors import ConfigError
from dlas.inference.tiling import check_tiling, infer_scale, run_network
from dlas.registry import NETWORKS, TASKS

SCALE_PROBE_SIZE = 64  # LQ pixels: the corner crop an upscaler's factor is measured on before tiling


@dataclass
class Request:
    """One thing to produce: ``count`` images for one input, named ``name`` (a file stem)."""

    name: str
    image: Optional[torch.Tensor] = None  # CHW float in [0, 1]: the image to upscale or to condition on
    caption: Optional[str] = None
    seed: int = 0
    count: int = 1


class Task:
    """Base class of inference tasks: ``task(request) -> NCHW float32 images on the CPU`` (in [0, 1] but
    unclamped, so that a NaN stays visible).

    ``needs``: the request fields the task cannot do without (``image``, ``caption``); ``accepts``: those it can
    use. ``scored``: outputs correspond to input images and can be scored against reference images of the same
    stem (dlas-test ``--metrics --reference``).
    """

    needs: frozenset[str] = frozenset()
    accepts: frozenset[str] = frozenset()
    scored: ClassVar[bool] = False
    usage: ClassVar[str] = "--output OUT/"  # dlas-test's arguments for it, as the end of a run suggests them

    def __init__(self, networks: Mapping[str, torch.nn.Module], config: Mapping[str, Any], device: torch.device,
                 autocast: Callable[[], ContextManager]):
        self.networks = networks
        self.config = config
        self.device = device
        self.autocast = autocast

    def network(self, name: Optional[str]) -> torch.nn.Module:
        """The run's network ``name`` (default: the one its evaluator scores, else ``generator``), in eval mode."""
        name = name or default_network_name(self.config)
        if name not in self.networks:
            raise ConfigError(f"no network '{name}' in the run; it has: {', '.join(self.networks) or '(none)'}",
                              "network")
        return self.networks[name]

    def check(self, request: Request) -> None:
        """A ConfigError when ``request`` lacks what the task needs or carries what it cannot use."""
        given = {field for field in ("image", "caption") if getattr(request, field) is not None}
        missing = sorted(self.needs - given)
        if missing:
            raise ConfigError(f"the {self.name()} task needs a{'n' if missing[0][0] in 'aeiou' else ''} "
                              f"{missing[0]} for each output", missing[0])
        unused = sorted(given - self.accepts - self.needs)
        if unused:
            raise ConfigError(f"the {self.name()} task takes no {unused[0]}", unused[0])
        if request.count < 1:
            raise ConfigError(f"count must be at least 1, got {request.count}", "count")

    @classmethod
    def name(cls) -> str:
        return next((n for n in TASKS.names() if TASKS.get(n) is cls), cls.__name__)

    def __call__(self, request: Request) -> torch.Tensor:
        raise NotImplementedError


def default_task(config: Mapping[str, Any], network: Optional[str] = None) -> str:
    """The task a run's network does by default: its class's ``inference_task``, else ``upscale``."""
    name = network or default_network_name(config)
    entry = (config.get("networks") or {}).get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) or entry["type"] not in NETWORKS:
        return "upscale"
    return getattr(NETWORKS.get(entry["type"]), "inference_task", "upscale")


def recipe_task_options(config: Mapping[str, Any], task: str, network: Optional[str] = None) -> tuple[str, dict]:
    """How the run's own recipe runs ``task`` on ``network``: ``(eval.NAME, options)`` of its first evaluator
    that does, with an ``options:`` mapping (``("", {})`` when none does).

    ``dlas-test --run`` and ``scripts/triforce_sample.py`` start from these, so that a run samples the way its
    validation did (a dalle recipe's guidance and temperature) unless a flag says otherwise.
    """
    network = network or default_network_name(config)
    for name, entry in (config.get("eval") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("options"), dict) or entry.get("network") != network:
            continue
        if (entry.get("task") or default_task(config, network)) == task:
            return f"eval.{name}", {k: v for k, v in entry["options"].items() if k != "network"}
    return "", {}


@TASKS.register("upscale")
class UpscaleTask(Task):
    """Upscale or restore an image with an image-to-image network (an SR generator), as ``dlas-test`` does.

    network: the network to run (default: the one the run's evaluator scores, else ``generator``).
    tile: run on tiles of this many input pixels (bounds memory on large images); null: the whole image.
    tile_overlap: input pixels shared by neighbouring tiles (at most tile / 2); exact when the network's
        receptive-field radius is at most tile_overlap / 4.
    temperatures: for a stochastic network with ``sample(lq, temperature=T)`` (SRFlow): one output per
        temperature; null: the network's plain forward.
    """

    needs = frozenset({"image"})
    scored = True
    usage = "--input IMAGES/ --output OUT/"

    def __init__(self, networks: Mapping[str, torch.nn.Module], config: Mapping[str, Any], device: torch.device,
                 autocast: Callable[[], ContextManager], network: Optional[str] = None, tile: Optional[int] = None,
                 tile_overlap: int = 16, temperatures: Optional[list[float]] = None):
        super().__init__(networks, config, device, autocast)
        check_tiling(tile, tile_overlap)
        self.network_name = network or default_network_name(config)
        self.tile, self.tile_overlap = tile, tile_overlap
        self.temperatures = temperatures
        self.net = self.network(self.network_name)
        if temperatures is not None and not hasattr(self.net, "sample"):
            raise ConfigError(f"{type(self.net).__name__} has no sample(lq, temperature) method; leave out the "
                              "temperatures", "temperatures")
        self._scale: Optional[int] = None

    def forwards(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        if self.temperatures is None:
            return [self.net]
        return [lambda lq, t=t: self.net.sample(lq, temperature=t) for t in self.temperatures]

    def scale(self, lq: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """The network's upscaling factor, measured once on a corner crop of the first image (for tiling)."""
        if self._scale is None:
            try:
                self._scale = infer_scale(forward, lq[:1], self.tile or SCALE_PROBE_SIZE)
            except ValueError as exc:
                raise self._not_an_upscaler(str(exc)) from exc
        return self._scale

    @property
    def scale_factor(self) -> Optional[int]:
        """The network's upscaling factor once an image has been run (or measured for tiling)."""
        return self._scale

    def _not_an_upscaler(self, why: str) -> ConfigError:
        return ConfigError(f"network '{self.network_name}' does not upscale images: {why}; pick the generator",
                           "network")

    def _check_output(self, output: Any, lq: torch.Tensor) -> int:
        """The output's scale; a ConfigError when it is not an image an integer multiple of the input's size
        (a discriminator or a classifier picked by mistake)."""
        if not isinstance(output, torch.Tensor) or output.dim() != 4 or output.shape[0] != lq.shape[0]:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise self._not_an_upscaler(f"it returned {shape} for an input batch of shape {tuple(lq.shape)}")
        scale = output.shape[-1] // lq.shape[-1]
        if scale < 1 or tuple(output.shape[-2:]) != (lq.shape[-2] * scale, lq.shape[-1] * scale):
            raise self._not_an_upscaler(f"its output {tuple(output.shape[-2:])} is not an integer multiple of its "
                                        f"input {tuple(lq.shape[-2:])}")
        self._scale = scale
        return scale

    @torch.no_grad()
    def upscale(self, lq: torch.Tensor) -> torch.Tensor:
        """An NCHW batch (on any device) -> its outputs, one per temperature for each image, float32 on the CPU."""
        lq = lq.to(self.device)
        outputs = []
        with self.autocast():
            for forward in self.forwards():
                scale = self.scale(lq, forward) if self.tile else 1
                output = run_network(forward, lq, scale, self.tile, self.tile_overlap)
                self._check_output(output, lq)
                outputs.append(output.float().cpu())
        # image-major: image 0 at each temperature, then image 1, ...
        return torch.stack(outputs, dim=1).flatten(0, 1)

    def __call__(self, request: Request) -> torch.Tensor:
        self.check(request)
        images = self.upscale(request.image[None])
        count_nonfinite(images, request.name, "the network overflowed or diverged (try fp32)")
        return images


@TASKS.register("reconstruct")
class ReconstructTask(Task):
    """Encode and decode an image with an autoencoder (a VAE, a discrete VAE): its reconstruction.

    Calls the network's ``reconstruct(images)`` where it has one, else its forward, which must then return an
    image batch. An input whose sides are not a multiple of the network's ``size_multiple`` (its total
    downsampling, when it declares one) is padded by reflection and the reconstruction cropped back, so the
    output always has the input's size.

    network: the autoencoder (default: the one the run's evaluator scores, else ``generator``).
    """

    needs = frozenset({"image"})
    scored = True
    scale_factor = 1
    usage = "--input IMAGES/ --output OUT/"

    def __init__(self, networks: Mapping[str, torch.nn.Module], config: Mapping[str, Any], device: torch.device,
                 autocast: Callable[[], ContextManager], network: Optional[str] = None):
        super().__init__(networks, config, device, autocast)
        self.network_name = network or default_network_name(config)
        self.net = self.network(self.network_name)
        inner = getattr(self.net, "module", self.net)
        self.forward = getattr(inner, "reconstruct", self.net)
        self.multiple = int(getattr(inner, "size_multiple", 1))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """An NCHW batch -> its reconstructions (float32, on the CPU, the input's size)."""
        import torch.nn.functional as F

        images = images.to(self.device)
        height, width = images.shape[-2:]
        pad_h, pad_w = (-height) % self.multiple, (-width) % self.multiple
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            images = F.pad(images, (0, pad_w, 0, pad_h), mode=mode)
        with self.autocast():
            output = self.forward(images)
        if not isinstance(output, torch.Tensor) or output.shape != images.shape:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ConfigError(f"network '{self.network_name}' does not reconstruct images: it returned {shape} for "
                              f"{tuple(images.shape)} (give it a reconstruct(images) method)", "network")
        return output[..., :height, :width].float().cpu()

    def __call__(self, request: Request) -> torch.Tensor:
        self.check(request)
        images = self.reconstruct(request.image[None])
        count_nonfinite(images, request.name)
        return images


@TASKS.register("sample")
class SampleTask(Task):
    """Draw images from a generative network's ``generate(count, generator, ...)``, reproducibly per seed.

    The network's ``generate`` takes ``count`` and a ``torch.Generator`` (seeded by the request's seed) and,
    where it can use them, ``image`` (a 1xCxHxW batch to condition on), ``caption`` (a string) and
    ``temperature``; it returns ``count`` NCHW images in [0, 1]. An argument without a default is required.

    network: the network to sample from (default: the one the run's evaluator scores, else ``generator``).
    temperature: passed on when set (null: the network's default).
    """

    usage = "--n 8 --seed 0 --output OUT/ (--caption TEXT / --input IMAGES/ where the network takes them)"

    def __init__(self, networks: Mapping[str, torch.nn.Module], config: Mapping[str, Any], device: torch.device,
                 autocast: Callable[[], ContextManager], network: Optional[str] = None,
                 temperature: Optional[float] = None):
        super().__init__(networks, config, device, autocast)
        self.network_name = network or default_network_name(config)
        self.net = self.network(self.network_name)
        generate = getattr(getattr(self.net, "module", self.net), "generate", None)
        if generate is None:
            raise ConfigError(f"network '{self.network_name}' ({type(self.net).__name__}) has no "
                              "generate(count, generator, ...) method to sample with", "network")
        params = inspect.signature(generate).parameters
        self.accepts = frozenset(f for f in ("image", "caption") if f in params)
        self.needs = frozenset(f for f in self.accepts if params[f].default is inspect.Parameter.empty)
        if temperature is not None and "temperature" not in params:
            raise ConfigError(f"{type(self.net).__name__}.generate takes no temperature", "temperature")
        self.options = {} if temperature is None else {"temperature": temperature}

    @torch.no_grad()
    def __call__(self, request: Request) -> torch.Tensor:
        self.check(request)
        inputs: dict[str, Any] = {}
        if request.image is not None:
            inputs["image"] = request.image[None].to(self.device)
        if request.caption is not None:
            inputs["caption"] = request.caption
        generator = torch.Generator(self.device).manual_seed(request.seed % 2**63)
        with self.autocast():
            images = self.net.generate(request.count, generator=generator, **inputs, **self.options)
        images = images.float().cpu()
        if images.dim() != 4 or images.shape[0] != request.count:
            raise ValueError(f"{type(self.net).__name__}.generate({request.count}, ...) returned shape "
                             f"{tuple(images.shape)}, expected {request.count} NCHW images")
        count_nonfinite(images, request.name)
        return images


def build_task(name: str, networks: Mapping[str, torch.nn.Module], config: Mapping[str, Any], device: torch.device,
               autocast: Callable[[], ContextManager], options: Optional[Mapping[str, Any]] = None,
               path: str = "task") -> Task:
    """Task ``name`` with ``options`` checked against its signature (errors name ``path.OPTION``)."""
    return TASKS.build({"type": name, **(options or {})}, path, networks=networks, config=config, device=device,
                       autocast=autocast)
