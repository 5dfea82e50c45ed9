"""The perceptual (VGG feature) loss of SRGAN/ESRGAN."""
from __future__ import annotations

import warnings
from typing import Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlas.context import Context
from dlas.errors import ConfigError, DataError, did_you_mean
from dlas.losses.base import Loss
from dlas.registry import LOSSES
from dlas.weights import extract_state_dict, pretrained_weights_file, read_weights_file

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Convs per VGG19 stage; torchvision's ``features`` is conv, relu (, conv, relu ...), maxpool per stage.
VGG19_STAGES = (2, 2, 4, 4, 4)


def vgg19_layer_indices() -> dict[str, int]:
    """``conv3_4 -> 16``, ``relu5_4 -> 35``, ``pool2 -> 9``: names of torchvision's ``vgg19().features`` indices."""
    names, index = {}, 0
    for stage, convs in enumerate(VGG19_STAGES, start=1):
        for conv in range(1, convs + 1):
            names[f"conv{stage}_{conv}"] = index
            names[f"relu{stage}_{conv}"] = index + 1
            index += 2
        names[f"pool{stage}"] = index
        index += 1
    return names


@LOSSES.register("perceptual")
class PerceptualLoss(Loss):
    """Distance between VGG19 features of ``fake`` and ``real`` (SRGAN's content loss; ESRGAN's conv5_4 variant).

    Inputs are RGB in [0, 1]; they are normalised with the ImageNet mean/std before the frozen VGG19 (eval mode,
    no gradients to its weights; gradients flow to ``fake``). Only the layers up to the deepest requested one are
    built, so ``conv5_4`` costs 35 of 37 feature layers (19.5 GMAC per 224x224 image) while ``conv2_2`` takes 8
    (4.7 GMAC, ~4x cheaper).

    Options:
        layers: ``{layer: weight}``, e.g. ``{conv5_4: 1.0}`` or ``{conv3_4: 0.5, conv5_4: 1.0}``. Layer names are
            ``convS_C`` (S = stage 1-5, C = conv 1-4 in it; stages 1-2 have 2 convs), ``reluS_C`` or ``poolS``.
        layer: a single layer with weight 1 (shorthand; give ``layer`` or ``layers``, default ``conv5_4``).
        before_activation: ``convS_C`` features are taken before their ReLU (True, ESRGAN: richer, non-sparse
            features that give sharper texture and better brightness) or after it (False, SRGAN).
        criterion: ``l1`` (ESRGAN, BasicSR) or ``l2`` (mean squared error, SRGAN).
        real, fake: state keys of the target and the generated image.
        weights_path: a local ``vgg19-dcbb9e9d.pth`` (torchvision's ImageNet VGG19 state dict). Default: torch
            hub's cache ``$TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth``. Nothing is ever downloaded.
            ``random`` uses a randomly initialised VGG19 (tests and offline smoke runs only: the loss is then
            not perceptual).
    """

    def __init__(self, layers: Optional[dict[str, float]] = None, layer: Optional[str] = None,
                 before_activation: bool = True, criterion: Literal["l1", "l2"] = "l1", real: str = "hq",
                 fake: str = "gen", weights_path: Optional[str] = None):
        super().__init__(reads=[fake, real])
        self.real, self.fake = real, fake
        self.criterion = criterion
        if layers is not None and layer is not None:
            raise ConfigError("give either `layer` or `layers`, not both", "layer")
        single = layers is None  # given as `layer:` (or defaulted): errors name that key
        if layers is None:
            layers = {layer or "conv5_4": 1.0}
        if not layers:
            raise ConfigError("`layers` is empty; name at least one VGG19 layer, e.g. {conv5_4: 1.0}", "layers")
        indices = vgg19_layer_indices()
        self.layer_weights: dict[int, float] = {}
        for name, weight in layers.items():
            if name not in indices:
                raise ConfigError(f"unknown VGG19 layer '{name}'{did_you_mean(name, indices)}; layers are convS_C, "
                                  "reluS_C or poolS, e.g. conv5_4", "layer" if single else f"layers.{name}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"layer weight must be a number, got {weight!r}", f"layers.{name}")
            index = indices[name]
            if name.startswith("conv") and not before_activation:
                index += 1  # the ReLU right after the conv
            self.layer_weights[index] = self.layer_weights.get(index, 0.0) + float(weight)
        self.vgg = _frozen_vgg19_features(max(self.layer_weights) + 1, weights_path)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.vgg.eval()  # the feature extractor is fixed; never let a trainer-wide .train() reach it
        return self

    def features(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """VGG19 features of RGB images in [0, 1], at the requested layer indices."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"perceptual loss expects RGB NCHW images, got shape {tuple(images.shape)}")
        if self.mean.device != images.device:  # built on the CPU; follow the training device on first use
            self.to(images.device)
        fea = (images - self.mean) / self.std
        out = {}
        for index, layer in enumerate(self.vgg):
            fea = layer(fea)
            if index in self.layer_weights:
                out[index] = fea
        return out

    def forward(self, state: Mapping[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        fake = self.features(state[self.fake])
        with torch.no_grad():
            real = self.features(state[self.real])
        distance = F.l1_loss if self.criterion == "l1" else F.mse_loss
        return sum(w * distance(fake[i], real[i]) for i, w in self.layer_weights.items())


def _vgg19_features(depth: int) -> nn.Sequential:
    """The first ``depth`` layers of torchvision's ``vgg19().features`` (same indices, so its keys load), with
    torchvision's random init. Built here to skip the 120M-parameter classifier the loss never uses."""
    layers: list[nn.Module] = []
    channels = 3
    for stage, convs in enumerate(VGG19_STAGES):
        width = min(64 * 2**stage, 512)
        for _ in range(convs):
            conv = nn.Conv2d(channels, width, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=False)]
            channels = width
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers[:depth])


def _frozen_vgg19_features(depth: int, weights_path: Optional[str]) -> nn.Sequential:
    """The first ``depth`` VGG19 feature layers with ImageNet weights (or random ones when asked), frozen."""
    features = _vgg19_features(depth)
    if weights_path == "random":
        warnings.warn("perceptual loss uses a randomly initialised VGG19 (weights_path: random): fine for tests "
                      "and smoke runs, meaningless for training", stacklevel=3)
    else:
        _load_vgg19_weights(features, weights_path)
    for parameter in features.parameters():
        parameter.requires_grad_(False)
    return features.eval()


def _load_vgg19_weights(features: nn.Sequential, weights_path: Optional[str]) -> None:
    path = pretrained_weights_file(VGG19_FILE, VGG19_URL, "the perceptual loss (VGG19 ImageNet weights)",
                                   weights_path, ConfigError, "weights_path")
    state = extract_state_dict(read_weights_file(path), str(path))
    wanted = features.state_dict()
    found = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    bad = [k for k in wanted if k not in found or found[k].shape != wanted[k].shape]
    if bad:
        raise DataError(f"not a torchvision VGG19 state dict: {len(bad)} of the needed feature tensors are missing "
                        f"or misshapen (first: features.{bad[0]}); use {VGG19_FILE} from {VGG19_URL}", str(path))
    features.load_state_dict({k: found[k] for k in wanted})
