"""The ``diffusion`` task: sample a diffusion model (an upsampler of an image, or unconditionally) with a seed."""
from __future__ import annotations

import math
from typing import Any, Callable, ContextManager, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from dlas.build import count_nonfinite, default_network_name
from dlas.config.schema import GATE_KEYS
from dlas.errors import ConfigError
from dlas.inference.tasks import Request, Task
from dlas.injectors.diffusion import GaussianDiffusionInjector
from dlas.models.diffusion.process import Sampler, standard_normal
from dlas.registry import INJECTORS, TASKS

INJECTOR = "gaussian_diffusion"


def trained_diffusion(config: Mapping[str, Any], network: str) -> GaussianDiffusionInjector:
    """The run's ``gaussian_diffusion`` injector that trains ``network``, rebuilt from its config entry (its process
    and sampling defaults); a ConfigError when the run has none."""
    for step_name, step in (config.get("steps") or {}).items():
        for name, entry in ((step or {}).get("injectors") or {}).items():
            if isinstance(entry, dict) and entry.get("type") == INJECTOR \
                    and entry.get("network", "generator") == network:
                return INJECTORS.build(dict(entry), f"steps.{step_name}.injectors.{name}", reserved=GATE_KEYS)
    raise ConfigError(f"the run has no {INJECTOR} injector for network '{network}': the diffusion task takes the "
                      "schedule from it", "network")


@TASKS.register("diffusion")
class DiffusionTask(Task):
    """Sample a diffusion model trained by the ``gaussian_diffusion`` injector: an upsampler (a ``diffusion_unet``
    with ``lq_channels``) turns each input image into ``count`` images ``scale`` times larger; an unconditional
    model draws ``count`` images of ``size``.

    The process (schedule, T, prediction, variance) is the one the run trained with, read from its config; the
    number of steps, the sampler and eta default to the injector's ``sampling_steps``, ``sampler`` and ``eta``.
    Every sample starts from noise drawn by a generator seeded with the request's seed, so a seed gives the same
    pictures; with ``ddim`` and eta 0 the whole chain is deterministic. An input whose upscaled size is not a
    multiple of the UNet's ``size_multiple`` is padded by reflection and the output cropped back. Upsampler outputs
    can be scored against reference images (``dlas-test --metrics --reference``).

    Options:
      network: the denoiser (default: the one the run's evaluator uses, else ``generator``).
      steps: sampling steps: a count (evenly spaced), ``ddimN`` (DDIM's stride) or ``a,b,c`` (steps per section);
        null: the injector's ``sampling_steps``. Fewer steps are faster and, with a fixed variance, blurrier.
      sampler: ``ddim`` or ``ddpm`` (null: the injector's).
      eta: DDIM's noise (0: deterministic; null: the injector's).
      clip_denoised: clamp each step's predicted x_0 to the image range (improved DDPM's default).
      size: the output side of an unconditional model (null: ``datasets.train.target_size`` of the run).
      batch: samples drawn together (bounds memory). Each sample has its own generator, seeded by the request's
        seed and its index, so sample k is the same whatever ``count`` and ``batch`` are.
    """

    def __init__(self, networks: Mapping[str, torch.nn.Module], config: Mapping[str, Any], device: torch.device,
                 autocast: Callable[[], ContextManager], network: Optional[str] = None,
                 steps: Union[int, str, None] = None, sampler: Optional[Sampler] = None, eta: Optional[float] = None,
                 clip_denoised: bool = True, size: Optional[int] = None, batch: int = 8):
        super().__init__(networks, config, device, autocast)
        self.network_name = network or default_network_name(config)
        trained = trained_diffusion(config, self.network_name)
        self.net = self.network(self.network_name)
        inner = getattr(self.net, "module", self.net)
        self.lq_channels = int(getattr(inner, "lq_channels", 0))
        self._scale = int(getattr(inner, "scale", 1))
        self.multiple = int(getattr(inner, "size_multiple", 1))
        if eta is not None and eta < 0:
            raise ConfigError(f"must be >= 0, got {eta}", "eta")
        if batch < 1:
            raise ConfigError(f"must be >= 1, got {batch}", "batch")
        try:
            self.diffusion = trained.diffusion.respaced(steps if steps is not None else trained.sampling_steps)
        except ValueError as exc:
            raise ConfigError(str(exc), "steps") from None
        self.sampler = sampler or trained.sampler
        self.eta = eta if eta is not None else trained.eta
        self.clip = clip_denoised
        self.batch = batch
        self.size = size
        if self.lq_channels:
            self.needs, self.scored = frozenset({"image"}), True
        else:
            self.needs, self.scored = frozenset(), False
            train = (config.get("datasets") or {}).get("train") or {}
            self.size = size or train.get("target_size")
            if not self.size:
                raise ConfigError("an unconditional model needs the output size; give size", "size")

    @property
    def scale_factor(self) -> int:
        """Output size / input size of an upsampler."""
        return self._scale

    def _padded(self, lq: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``lq`` padded so that ``scale`` times its size is a multiple of the UNet's; and the output size."""
        height, width = lq.shape[-2] * self._scale, lq.shape[-1] * self._scale
        step = self.multiple // math.gcd(self.multiple, self._scale)
        pad_h, pad_w = (-lq.shape[-2]) % step, (-lq.shape[-1]) % step
        if pad_h or pad_w:
            mode = "reflect" if pad_h < lq.shape[-2] and pad_w < lq.shape[-1] else "replicate"
            lq = F.pad(lq, (0, pad_w, 0, pad_h), mode=mode)
        return lq, height, width

    @torch.no_grad()
    def __call__(self, request: Request) -> torch.Tensor:
        self.check(request)
        channels = int(getattr(getattr(self.net, "module", self.net), "channels", 3))
        kwargs: dict[str, torch.Tensor] = {}
        if self.lq_channels:
            lq, height, width = self._padded(request.image[None].to(self.device) * 2 - 1)
            shape = (channels, lq.shape[-2] * self._scale, lq.shape[-1] * self._scale)
        else:
            height = width = self.size
            side = -(-self.size // self.multiple) * self.multiple
            shape = (channels, side, side)
        outputs = []
        for start in range(0, request.count, self.batch):
            count = min(self.batch, request.count - start)
            generators = [sample_generator(request.seed, k, self.device) for k in range(start, start + count)]
            noise = standard_normal((count, *shape), generators, self.device)
            if self.lq_channels:
                kwargs["lq"] = lq.expand(count, -1, -1, -1)

            def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                with self.autocast():
                    return self.net(x, t, **kwargs)

            x0 = self.diffusion.sample(model, noise, generators, self.sampler, self.eta, self.clip)
            outputs.append(((x0[..., :height, :width] + 1) / 2).float().cpu())
        images = torch.cat(outputs)
        count_nonfinite(images, request.name, "the diffusion model diverged or overflowed (try fp32 or bf16)")
        return images


def sample_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of sample ``index`` of a request with ``seed``: sample k is the same whatever the count."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + index) % 2**63)
