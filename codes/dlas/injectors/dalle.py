"""Injectors of the DALL-E transformer's training: images -> dVAE tokens on the fly."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dlas.context import Context
from dlas.errors import ConfigError
from dlas.injectors.base import Injector
from dlas.registry import INJECTORS


@INJECTORS.register("dvae_encode")
class DvaeEncodeInjector(Injector):
    """Encodes images into a dVAE's tokens (``encode(images) -> [B, rows, columns]`` int64) for the transformer.

    For small data, in place of tokens extracted once with ``scripts/extract_tokens.py``: name a ``dvae``
    network in ``networks:`` (no step trains it), load a trained dVAE run's weights into it with
    ``path.pretrain_model_dvae: experiments/DVAE_RUN/checkpoints/STEP/dvae_ema.safetensors``, and put this
    injector before the one running the transformer. The dVAE runs in eval mode without gradients, so its
    tokens are the ones ``extract_tokens.py`` would write; it costs one encoder pass per batch.

    Options:
      network: the dVAE network under ``networks:``.
      in: the images (``hq`` of an image dataset).
      out: where the tokens go (the transformer's ``image_tokens`` input).
    """

    def __init__(self, network: str = "dvae", in_: str = "hq", out: str = "image_tokens"):
        super().__init__(reads=[in_], writes=[out], networks=[network])
        self.network, self.in_, self.out = network, in_, out

    @torch.no_grad()
    def __call__(self, state: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        dvae = ctx.networks[self.network]
        inner = getattr(dvae, "module", dvae)
        if not hasattr(inner, "encode"):
            raise ConfigError(f"network '{self.network}' ({type(inner).__name__}) has no encode(images) method; "
                              "name the dvae network", "network")
        # The trainer puts every network in training mode each iteration; the tokens must not depend on it.
        was_training = inner.training
        inner.eval()
        try:
            tokens = inner.encode(state[self.in_])
        finally:
            inner.train(was_training)
        return {self.out: tokens}
