"""The ``dalle`` task: captions -> images, written as dVAE tokens by a DALL-E transformer and decoded by the dVAE."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, ContextManager, Optional

import torch

from dlas.build import count_nonfinite, default_network_name
from dlas.errors import ConfigError
from dlas.inference.tasks import Request, Task
from dlas.models.transformer.sampling import check_sampling_options
from dlas.registry import TASKS


def _network_of_type(config: Mapping[str, Any], kind: str, preferred: Optional[str] = None) -> Optional[str]:
    """``preferred`` if the config's network of that name is a ``kind``, else the first ``kind`` network."""
    networks = config.get("networks") or {}
    is_kind = lambda name: isinstance(networks.get(name), dict) and networks[name].get("type") == kind
    if preferred is not None and is_kind(preferred):
        return preferred
    return next((name for name in networks if is_kind(name)), None)


@TASKS.register("dalle")
class DalleTask(Task):
    """Images for a caption: a ``dalle`` network samples image tokens, the run's ``dvae`` decodes them.

    ``dlas-test --run experiments/NAME --caption "a small red circle" --n 8 --seed 0 --output out/`` writes 8
    samples (and a grid); ``--captions FILE`` takes one caption per line; with no caption it samples the
    unconditional model (the empty caption). The same seed gives the same images. The ``samples`` evaluator
    runs this task on fixed captions at every validation.

    Options (``--task-option KEY=VALUE`` on the command line; ``options:`` of the samples evaluator):
      network: the dalle network (default: the one the run's evaluator samples, else the first dalle).
      dvae: the network decoding the tokens (default: the run's first ``dvae``); anything with
        ``decode(tokens [B, rows, columns]) -> images``.
      temperature: divides the logits (1: the model's distribution; lower: safer, less varied).
      temperatures: several temperatures (``dlas-test --temperature 0.7 1.0``): the samples at each, in order.
      top_k: sample among the k most likely tokens only (null: all).
      top_p: sample among the smallest set of tokens whose probability reaches p (null: all).
      guidance_scale: classifier-free guidance, ``cond + (s - 1) * (cond - uncond)``: 1 is the conditional
        model, larger follows the caption more closely at the cost of variety (about 2-4 is usual; needs a
        model trained with caption_drop > 0); null: no guidance, half the compute of any scale.
      use_cache: false recomputes the whole sequence for every token (only for checking the cache).
    """

    accepts = frozenset({"caption"})

    def __init__(self, networks: Mapping[str, torch.nn.Module], config: Mapping[str, Any], device: torch.device,
                 autocast: Callable[[], ContextManager], network: Optional[str] = None, dvae: Optional[str] = None,
                 temperature: float = 1.0, temperatures: Optional[list[float]] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, guidance_scale: Optional[float] = None, use_cache: bool = True):
        super().__init__(networks, config, device, autocast)
        self.network_name = network or _network_of_type(config, "dalle", default_network_name(config)) or "dalle"
        self.net = self.network(self.network_name)
        if not hasattr(getattr(self.net, "module", self.net), "generate_tokens"):
            raise ConfigError(f"network '{self.network_name}' ({type(self.net).__name__}) does not write image tokens "
                              "(it has no generate_tokens); pick the dalle network", "network")
        self.dvae_name = dvae or _network_of_type(config, "dvae")
        if self.dvae_name is None:
            raise ConfigError("the run has no dvae network to decode the tokens; name it with dvae: NAME", "dvae")
        self.dvae = self.network(self.dvae_name)
        if not hasattr(getattr(self.dvae, "module", self.dvae), "decode"):
            raise ConfigError(f"network '{self.dvae_name}' has no decode(tokens) method", "dvae")
        self.temperatures = list(temperatures) if temperatures else [temperature]
        for value in self.temperatures:
            check_sampling_options(value, top_k, top_p, guidance_scale)
        self.sampling = {"top_k": top_k, "top_p": top_p, "guidance_scale": guidance_scale, "use_cache": use_cache}

    @torch.no_grad()
    def __call__(self, request: Request) -> torch.Tensor:
        self.check(request)
        captions = [request.caption or ""] * request.count
        generator = torch.Generator(self.device).manual_seed(request.seed % 2**63)
        images = []
        with self.autocast():
            for temperature in self.temperatures:
                tokens = self.net.generate_tokens(captions, generator, temperature=temperature, **self.sampling)
                images.append(self.dvae.decode(tokens).float().cpu())
        images = torch.cat(images)
        count_nonfinite(images, request.name)
        return images
