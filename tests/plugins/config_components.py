"""Tiny stand-in components for the config and CLI tests (no torch: only their signatures are checked).

They let the malformed-config corpus name a network, dataset, injector, loss, optimizer, scheduler and
evaluator without depending on the real built-ins having landed.
"""
from __future__ import annotations

from typing import Literal, Optional

from dlas.registry import DATASETS, EVALUATORS, INJECTORS, LOSSES, NETWORKS, OPTIMIZERS, SCHEDULERS


@NETWORKS.register("tiny_net")
class TinyNet:
    """A stand-in upsampling network: ``nf`` features, upscaling by ``scale``."""

    def __init__(self, nf: int = 4, scale: int = 2, act: Literal["relu", "lrelu"] = "relu"):
        self.nf, self.scale, self.act = nf, scale, act


@DATASETS.register("tiny_images")
class TinyImages:
    """A stand-in dataset of ``length`` items of ``size``x``size`` pixels read from ``paths``."""

    def __init__(self, paths: list[str], size: int = 8, length: int = 4):
        self.paths, self.size, self.length = paths, size, length


@INJECTORS.register("tiny_generator")
class TinyGenerator:
    """Writes ``out`` = network(``in``)."""

    def __init__(self, network: str, in_: str = "lq", out: str = "gen", grad: bool = True):
        self.network, self.input, self.out, self.grad = network, in_, out, grad


@LOSSES.register("tiny_pix")
class TinyPix:
    """A pixel loss between ``fake`` and ``real`` with ``criterion`` l1 or l2."""

    def __init__(self, fake: str = "gen", real: str = "hq", criterion: Literal["l1", "l2"] = "l1"):
        self.fake, self.real, self.criterion = fake, real, criterion


@OPTIMIZERS.register("tiny_adam")
class TinyAdam:
    """Adam stand-in; ``params`` is provided by the framework."""

    def __init__(self, params: list, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0):
        self.params, self.lr, self.betas, self.weight_decay = params, lr, betas, weight_decay


@SCHEDULERS.register("tiny_multistep")
class TinyMultiStep:
    """Multiplies the learning rate by ``gamma`` at each of ``milestones``; ``optimizer`` is provided."""

    def __init__(self, optimizer: object, milestones: list[int], gamma: float = 0.5):
        self.optimizer, self.milestones, self.gamma = optimizer, milestones, gamma


@EVALUATORS.register("tiny_psnr")
class TinyPsnr:
    """Mean PSNR of ``fake`` against ``real`` over the ``dataset``; ``crop_border`` pixels ignored."""

    def __init__(self, dataset: str = "val", fake: str = "gen", real: str = "hq", crop_border: int = 0,
                 limit: Optional[int] = None):
        self.dataset, self.fake, self.real, self.crop_border, self.limit = dataset, fake, real, crop_border, limit


@INJECTORS.register("tiny_shared")
class TinySharedInjector:
    """An injector whose name a loss also uses (``--describe`` shows both)."""

    def __init__(self, out: str = "shared"):
        self.out = out


@LOSSES.register("tiny_shared")
class TinySharedLoss:
    """A loss whose name an injector also uses (``--describe`` shows both)."""

    def __init__(self, real: str = "hq"):
        self.real = real
