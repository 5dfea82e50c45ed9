"""Tiny components for trainer tests: a conv net, a two-output net, and an in-memory random dataset."""
from __future__ import annotations

import numpy as np
import torch

from dlas.registry import DATASETS, EVALUATORS, NETWORKS, OPTIMIZERS


@NETWORKS.register("test_conv")
class TestConv(torch.nn.Module):
    """Two 3x3 convolutions with a ReLU between them (trainer tests)."""

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 4):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(in_nc, nf, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(nf, out_nc, 3, padding=1))
        self.steps_seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def set_step(self, step: int) -> None:
        self.steps_seen.append(step)


@NETWORKS.register("test_critic")
class TestCritic(torch.nn.Module):
    """A conv + mean-pool critic returning one logit per image (trainer tests)."""

    def __init__(self, in_nc: int = 3, nf: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_nc, nf, 3, padding=1)
        self.head = torch.nn.Linear(nf, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@NETWORKS.register("test_flattening")
class Flattening(torch.nn.Module):
    """A conv whose features are flattened with ``view``, as much user code does: it cannot run channels_last
    (view needs contiguous memory), so it tests that such a combination is left out, not fatal."""

    def __init__(self, nf: int = 4, size: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, nf, 3, padding=1)
        self.head = torch.nn.Linear(nf * size * size, 3 * size * size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x))
        return self.head(features.view(len(x), -1)).view(x.shape)


@NETWORKS.register("test_nan_under_autocast")
class NanUnderAutocast(TestConv):
    """A TestConv whose output is NaN under autocast (a network that bf16 breaks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out * float("nan") if torch.is_autocast_enabled(x.device.type) else out


@DATASETS.register("test_random_pairs")
class RandomPairs(torch.utils.data.Dataset):
    """``length`` fixed random (lq, hq) pairs of ``size``x``size``; hq is a smooth function of lq."""

    def __init__(self, length: int = 16, size: int = 8):
        rng = np.random.default_rng(1234)
        self.lq = torch.from_numpy(rng.random((length, 3, size, size), dtype=np.float32))
        self.hq = (self.lq * 0.5 + 0.25).flip(1)
        self.seed = 0

    def __len__(self) -> int:
        return len(self.lq)

    def __getitem__(self, key):
        index = key[1] if isinstance(key, tuple) else key
        return {"lq": self.lq[index], "hq": self.hq[index], "index": index}


@NETWORKS.register("test_fails_on_rank")
class FailsOnRank(TestConv):
    """A TestConv that raises at ``fail_step`` on rank ``fail_rank`` (distributed failure tests)."""

    def __init__(self, fail_rank: int = 1, fail_step: int = 2):
        super().__init__()
        self.fail_rank, self.fail_step = fail_rank, fail_step

    def set_step(self, step: int) -> None:
        import os

        if step == self.fail_step and int(os.environ.get("RANK", "0")) == self.fail_rank:
            raise RuntimeError(f"deliberate failure on rank {self.fail_rank} at step {step}")


@EVALUATORS.register("test_scripted_metric")
class ScriptedMetric:
    """Reports ``values[step]`` as ``psnr`` (higher is better): for checkpoint-retention tests."""

    def __init__(self, values: dict):
        self.values = values

    def __call__(self, ctx) -> dict:
        return {"psnr": float(self.values[ctx.step])}

    def is_higher_better(self, metric: str) -> bool:
        return True


@OPTIMIZERS.register("test_fused_adam")
def fused_adam(params, lr: float = 1e-2):
    """torch's fused Adam, even on the CPU: the implementation DLAS picks on CUDA (trainer tests)."""
    return torch.optim.Adam([p for _, p in params], lr=lr, fused=True)
