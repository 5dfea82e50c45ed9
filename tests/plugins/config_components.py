"""Tiny stand-in components for the config and CLI tests.

They let the malformed-config corpus name a network, dataset, injector, loss, optimizer, scheduler and
evaluator without depending on the built-ins. Each is a registered *function* that imports torch only when it
is called, so loading a config that imports this module (``--print-config``) stays torch-free, while
``--validate`` builds real (tiny) components and runs the trainer's state-graph check on them.
"""
from __future__ import annotations

from typing import Literal, Optional

from dlas.registry import DATASETS, EVALUATORS, INJECTORS, LOSSES, NETWORKS, OPTIMIZERS, SCHEDULERS


@NETWORKS.register("tiny_net")
def tiny_net(nf: int = 4, scale: int = 2, act: Literal["relu", "lrelu"] = "relu"):
    """A stand-in upsampling network: ``nf`` features, upscaling by ``scale``."""
    import torch

    activation = torch.nn.ReLU() if act == "relu" else torch.nn.LeakyReLU(0.2)
    return torch.nn.Sequential(torch.nn.Conv2d(3, nf, 3, padding=1), activation,
                               torch.nn.Conv2d(nf, 3 * scale * scale, 3, padding=1), torch.nn.PixelShuffle(scale))


@DATASETS.register("tiny_images")
def tiny_images(paths: list[str], size: int = 8, length: int = 4):
    """A stand-in dataset of ``length`` random items of ``size``x``size`` pixels (``paths`` are not read)."""
    import torch

    class TinyImages(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return length

        def __getitem__(self, key):
            g = torch.Generator().manual_seed(key[1] if isinstance(key, tuple) else key)
            hq = torch.rand(3, size, size, generator=g)
            return {"lq": hq[:, ::2, ::2], "hq": hq}

    return TinyImages()


@INJECTORS.register("tiny_generator")
def tiny_generator(network: str, in_: str = "lq", out: str = "gen", grad: bool = True):
    """Writes ``out`` = network(``in``)."""
    from dlas.injectors.base import Injector

    class TinyGenerator(Injector):
        def __call__(self, state, ctx):
            return {out: ctx.networks[network](state[in_])}

    return TinyGenerator(reads=[in_], writes=[out], networks=[network])


@LOSSES.register("tiny_pix")
def tiny_pix(fake: str = "gen", real: str = "hq", criterion: Literal["l1", "l2"] = "l1"):
    """A pixel loss between ``fake`` and ``real`` with ``criterion`` l1 or l2."""
    import torch.nn.functional as F

    from dlas.losses.base import Loss

    class TinyPix(Loss):
        def forward(self, state, ctx):
            loss = F.l1_loss if criterion == "l1" else F.mse_loss
            return loss(state[fake], state[real])

    return TinyPix(reads=[fake, real])


@OPTIMIZERS.register("tiny_adam")
def tiny_adam(params: list, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0):
    """Adam stand-in; ``params`` is provided by the framework."""
    import torch

    return torch.optim.Adam([p for _, p in params], lr=lr, betas=betas, weight_decay=weight_decay)


@SCHEDULERS.register("tiny_multistep")
def tiny_multistep(optimizer: object, milestones: list[int], gamma: float = 0.5):
    """Multiplies the learning rate by ``gamma`` at each of ``milestones``; ``optimizer`` is provided."""
    import torch

    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma)


@EVALUATORS.register("tiny_psnr")
def tiny_psnr(dataset: str = "val", fake: str = "gen", real: str = "hq", crop_border: int = 0,
              limit: Optional[int] = None):
    """Mean PSNR of ``fake`` against ``real`` over the ``dataset``; ``crop_border`` pixels ignored."""
    return lambda ctx: {"psnr": 0.0}


@INJECTORS.register("tiny_shared")
def tiny_shared_injector(out: str = "shared"):
    """An injector whose name a loss also uses (``--describe`` shows both)."""
    from dlas.injectors.base import Injector

    return Injector(writes=[out])


@LOSSES.register("tiny_shared")
def tiny_shared_loss(real: str = "hq"):
    """A loss whose name an injector also uses (``--describe`` shows both)."""
    from dlas.losses.base import Loss

    return Loss(reads=[real])
