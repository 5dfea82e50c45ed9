"""RRDBNet, the ESRGAN generator, with BasicSR / Real-ESRGAN key names and loaders for the older layouts."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dlas.errors import ConfigError
from dlas.models.ops.norm import (
    NormKind,
    check_fixup,
    check_norm_channels,
    fixup_init,
    norm_layer,
)
from dlas.registry import NETWORKS

# BasicSR initialises the dense-block convs with kaiming-normal scaled down so that each residual branch starts
# close to zero and the 69 stacked blocks begin as an identity (stable early training of a deep trunk).
RESIDUAL_INIT_SCALE = 0.1


def scaled_kaiming_init(modules: list[nn.Module], scale: float, negative_slope: float = 0.0) -> None:
    """Kaiming-normal (fan-in) init of every conv/linear in ``modules``, weights multiplied by ``scale``, biases zero.

    ``negative_slope`` is the slope of the (leaky) ReLU or PReLU after the layers: 0 for ReLU, 0.2 for LeakyReLU(0.2),
    0.25 for a PReLU at its initial slope.
    """
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(layer.weight, a=negative_slope)
                layer.weight.data.mul_(scale)
                if layer.bias is not None:
                    layer.bias.data.zero_()


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs (each sees all earlier outputs); the result is scaled by 0.2 and added.

    ``norm`` puts a normalization layer after each conv (whose bias it makes redundant, so the convs lose theirs).
    ``fixup_branches`` (the network's count of dense blocks) Fixup-initialises the block instead of BasicSR's
    init: conv5 starts at zero, so the block starts as the identity, and a learned multiplier scales the branch.
    """

    def __init__(self, nf: int = 64, gc: int = 32, norm: NormKind = "none", fixup_branches: int | None = None):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1, bias=bias)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1, bias=bias)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1, bias=bias)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1, bias=bias)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1, bias=bias)
        # Identity layers for norm: none add no parameters or state-dict keys, so published weights still load.
        self.norm1, self.norm2, self.norm3, self.norm4 = (norm_layer(norm, gc) for _ in range(4))
        self.norm5 = norm_layer(norm, nf)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        self.branch_scale = None
        if fixup_branches is None:
            scaled_kaiming_init([self], RESIDUAL_INIT_SCALE)
        else:
            fixup_init([self.conv1, self.conv2, self.conv3, self.conv4, self.conv5], fixup_branches)
            self.branch_scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.norm1(self.conv1(x)))
        x2 = self.lrelu(self.norm2(self.conv2(torch.cat((x, x1), 1))))
        x3 = self.lrelu(self.norm3(self.conv3(torch.cat((x, x1, x2), 1))))
        x4 = self.lrelu(self.norm4(self.conv4(torch.cat((x, x1, x2, x3), 1))))
        x5 = self.norm5(self.conv5(torch.cat((x, x1, x2, x3, x4), 1)))
        if self.branch_scale is not None:
            x5 = x5 * self.branch_scale
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks in sequence, scaled by 0.2 and added to the input.

    With ``fixup_branches`` its dense blocks are Fixup-initialised identities, so ``0.2 * rdb3(rdb2(rdb1(x)))``
    would start at ``0.2 * x`` and 23 blocks would multiply the trunk by 1.2**23 = 66; a learned multiplier on
    that branch, starting at zero, makes the block the identity (as ReZero does).
    """

    def __init__(self, nf: int = 64, gc: int = 32, norm: NormKind = "none", fixup_branches: int | None = None):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc, norm, fixup_branches)
        self.rdb2 = ResidualDenseBlock(nf, gc, norm, fixup_branches)
        self.rdb3 = ResidualDenseBlock(nf, gc, norm, fixup_branches)
        self.branch_scale = None if fixup_branches is None else nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rdb3(self.rdb2(self.rdb1(x)))
        if self.branch_scale is not None:
            out = out * self.branch_scale
        return out * 0.2 + x


@NETWORKS.register("rrdbnet")
class RRDBNet(nn.Module):
    """ESRGAN's generator (Wang et al. 2018): a trunk of RRDB blocks at LR resolution, then nearest x2 upsamplings.

    Key names follow BasicSR / Real-ESRGAN (``conv_first``, ``body.N.rdbK.convJ``, ``conv_body``, ``conv_up1``,
    ``conv_up2``, ``conv_hr``, ``conv_last``), so their ``.pth`` files load directly; the original ESRGAN release
    (``RRDB_trunk…``) and the older ``model.N`` layout are converted on load (``convert_state_dict``).

    Options:
        in_nc: input channels (3 for RGB).
        out_nc: output channels.
        nf: trunk features (64 in ESRGAN; 32 with nb=6 gives a ~6x cheaper model: 2.5M parameters).
        nb: number of RRDB blocks (23 in ESRGAN: 16.7M parameters; each block costs ~0.72M at nf=64, gc=32).
        gc: growth channels of the dense blocks (32).
        scale: 1, 2, 4 or 8. For 1 and 2 the input is pixel-unshuffled (x4 / x2) first, as in Real-ESRGAN, so the
            trunk always runs at 1/4 of the output size and ``conv_first`` takes in_nc*16 or in_nc*4 channels;
            8 adds a third upsampling conv ``conv_up3``.
        norm: ``none`` (ESRGAN: its authors removed BatchNorm for its artifacts), ``batch``, ``group`` (8 groups;
            nf and gc multiples of 8) or ``instance``: a normalization layer after each dense-block conv, whose
            bias it replaces. Other than ``none``, published weights do not load.
        init: ``default`` (BasicSR: kaiming-normal x0.1 in the dense blocks) or ``fixup`` (Fixup, Zhang et al.
            2019, for training without normalization: every dense block's last conv starts at zero and its other
            convs at kaiming x (3*nb)^(-1/8); each dense block and each RRDB learns a branch multiplier, the RRDB's
            starting at zero, so the whole trunk starts as the identity). Needs norm: none. Adds 4 parameters
            per RRDB (``body.N.branch_scale``, ``body.N.rdbK.branch_scale``).

    The output is not clamped. Supports activation checkpointing per RRDB block (``checkpointing: true``).
    """

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32, scale: int = 4,
                 norm: NormKind = "none", init: Literal["default", "fixup"] = "default"):
        super().__init__()
        if scale not in (1, 2, 4, 8):
            raise ConfigError(f"rrdbnet supports scale 1, 2, 4 or 8, got {scale}", "scale")
        for name, value in (("in_nc", in_nc), ("out_nc", out_nc), ("nf", nf), ("nb", nb), ("gc", gc)):
            if value < 1:
                raise ConfigError(f"rrdbnet {name} must be a positive integer, got {value}", name)
        check_norm_channels(norm, {"nf": nf, "gc": gc})
        check_fixup(init, norm)
        self.scale = scale
        # Scales below 4 fold pixels into channels so the same x4 upsampling tail serves every scale.
        self.unshuffle = {1: 4, 2: 2}.get(scale, 1)
        self.conv_first = nn.Conv2d(in_nc * self.unshuffle**2, nf, 3, 1, 1)
        fixup_branches = 3 * nb if init == "fixup" else None
        self.body = nn.Sequential(*[RRDB(nf, gc, norm, fixup_branches) for _ in range(nb)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
        if scale == 8:
            self.conv_up3 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    @property
    def up_convs(self) -> list[nn.Conv2d]:
        """The upsampling convs in order (two, or three at scale 8)."""
        return [self.conv_up1, self.conv_up2] + ([self.conv_up3] if self.scale == 8 else [])

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] * self.unshuffle**2 != self.conv_first.in_channels:
            raise ValueError(
                f"rrdbnet expects NCHW input with {self.conv_first.in_channels // self.unshuffle**2} channels, "
                f"got shape {tuple(x.shape)}"
            )
        if self.unshuffle > 1 and (x.shape[2] % self.unshuffle or x.shape[3] % self.unshuffle):
            raise ValueError(
                f"rrdbnet at scale {self.scale} needs input height and width divisible by {self.unshuffle}, "
                f"got {tuple(x.shape[2:])}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        fea = self.conv_first(x)
        fea = fea + self.conv_body(self.body(fea))
        for conv in self.up_convs:
            fea = self.lrelu(conv(F.interpolate(fea, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(fea)))

    def forward_features(self, x: torch.Tensor, block_ids: list[int]) -> dict[str, torch.Tensor]:
        """The intermediate features SRFlow conditions on, plus the output.

        Returns ``block_{i}`` (the output of ``body[i]``, 0-based, for each i in ``block_ids``), ``last_lr_fea``
        (trunk output after ``conv_body`` and the skip; also as ``fea_up1``), ``fea_up2``, ``fea_up4`` (and
        ``fea_up8`` at scale 8): the upsampling convs' outputs *before* their LeakyReLU, and ``out``.
        """
        self._check_input(x)
        wanted = set(block_ids)
        bad = [i for i in wanted if not 0 <= i < len(self.body)]
        if bad:
            raise ValueError(f"block ids {sorted(bad)} out of range for an rrdbnet with {len(self.body)} blocks")
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        fea = self.conv_first(x)
        results: dict[str, torch.Tensor] = {}
        trunk = fea
        for i, block in enumerate(self.body):
            trunk = block(trunk)
            if i in wanted:
                results[f"block_{i}"] = trunk
        fea = fea + self.conv_body(trunk)
        results["last_lr_fea"] = results["fea_up1"] = fea
        for level, conv in zip((2, 4, 8), self.up_convs):
            pre_activation = conv(F.interpolate(fea, scale_factor=2, mode="nearest"))
            results[f"fea_up{level}"] = pre_activation
            # Not in place: the pre-activation tensor is handed out.
            fea = F.leaky_relu(pre_activation, 0.2)
        results["out"] = self.conv_last(self.lrelu(self.conv_hr(fea)))
        return results

    def checkpoint_modules(self) -> list[nn.Module]:
        """The RRDB blocks: the trainer runs each under activation checkpointing when asked to."""
        return list(self.body)

    def convert_state_dict(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the keys of the original ESRGAN release or the older ``model.N`` layout to ours.

        BasicSR / Real-ESRGAN / DLAS keys are returned unchanged.
        """
        if any(k.startswith("model.1.sub.") for k in sd):
            return _convert_old_layout(sd)
        if any(k.startswith(("RRDB_trunk.", "trunk_conv.")) for k in sd):
            return {_convert_esrgan_key(k): v for k, v in sd.items()}
        return dict(sd)


def _convert_esrgan_key(key: str) -> str:
    key = key.replace("RRDB_trunk.", "body.").replace("trunk_conv.", "conv_body.")
    key = re.sub(r"\.RDB(\d)\.", r".rdb\1.", key)
    key = re.sub(r"^upconv(\d)\.", r"conv_up\1.", key)
    return key.replace("HRconv.", "conv_hr.")


def _convert_old_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first ESRGAN release: one flat ``model`` Sequential with every upsampling stage as (upsample, conv, act).

    ``model.0`` conv_first; ``model.1.sub.{i}.RDB{k}.conv{j}.0`` the RRDB convs; ``model.1.sub.{nb}`` the trunk
    conv; then convs at ``model.3``, ``model.6`` (and ``model.9`` at x8), followed by the HR conv and the last conv.
    """
    sub_ids = {int(m.group(1)) for k in sd if (m := re.match(r"model\.1\.sub\.(\d+)\.", k))}
    trunk_conv_id = max(sub_ids)
    top_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"model\.(\d+)\.", k))} - {0, 1})
    # Whatever follows the trunk: n upsampling convs (3 apart), then conv_hr and conv_last (2 apart).
    names = {i: f"conv_up{n + 1}" for n, i in enumerate(top_ids[:-2])}
    if len(top_ids) >= 2:
        names[top_ids[-2]] = "conv_hr"
        names[top_ids[-1]] = "conv_last"
    out = {}
    for key, value in sd.items():
        if m := re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$", key):
            block, rdb, conv, kind = m.groups()
            out[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif m := re.match(rf"model\.1\.sub\.{trunk_conv_id}\.(weight|bias)$", key):
            out[f"conv_body.{m.group(1)}"] = value
        elif m := re.match(r"model\.0\.(weight|bias)$", key):
            out[f"conv_first.{m.group(1)}"] = value
        elif (m := re.match(r"model\.(\d+)\.(weight|bias)$", key)) and int(m.group(1)) in names:
            out[f"{names[int(m.group(1))]}.{m.group(2)}"] = value
        else:
            out[key] = value  # left for the loader to report as unexpected
    return out
