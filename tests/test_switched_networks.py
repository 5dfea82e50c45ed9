"""The switched networks (switched_vae, switched_rrdbnet): outputs, conversion from their plain twins, logging,
resume mid-anneal, and the usage record under DDP."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlas.config import resolve_config
from dlas.errors import ConfigError
from dlas.models.switched import switched_layers
from dlas.registry import NETWORKS
from dlas.weights import load_network_weights, save_network_weights

TINY_VAE = {"type": "switched_vae", "nf": 4, "channel_mult": [1, 2], "latent_channels": 2}


def build(options: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return NETWORKS.build(options)


def parameter_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def test_switched_vae_returns_reconstruction_kl_balance_and_mean():
    net = build({**TINY_VAE, "num_experts": 3}).train()
    images = torch.rand(2, 3, 8, 12)
    out = net(images)
    assert out["recon"].shape == images.shape
    assert out["mean"].shape == (2, 2, 4, 6)
    assert out["kl"].dim() == 0 and out["kl"] >= 0
    assert 1 <= float(out["balance"].detach()) <= 3 and out["balance"].requires_grad
    net.eval()
    assert float(net(images)["balance"]) == 0  # no balance term outside training
    torch.testing.assert_close(net(images)["recon"], net.reconstruct(images))  # evaluation decodes the mean


def test_plain_autoencoder_has_no_kl_and_a_deterministic_latent():
    net = build({**TINY_VAE, "num_experts": 1, "variational": False}).train()
    images = torch.rand(1, 3, 8, 8)
    out = net(images)
    assert float(out["kl"]) == 0 and float(out["balance"]) == 0
    torch.testing.assert_close(out["recon"], net(images)["recon"])


def test_switched_vae_multiplies_only_the_switched_layers_parameters_by_the_expert_count():
    plain = build({**TINY_VAE, "num_experts": 1})
    switched = build({**TINY_VAE, "num_experts": 5})
    layers = switched_layers(switched)
    assert len(layers) == 10  # 2 per residual block (4 blocks), one downsampling, one upsampling conv
    expert_weights = sum(layer.weight.numel() + layer.bias.numel() for layer in layers.values())
    selectors = sum(parameter_count(layer.selector) for layer in layers.values())
    assert parameter_count(switched) - parameter_count(plain) == expert_weights * 4 // 5 + selectors


def test_switched_vae_rejects_images_of_a_size_it_cannot_downsample():
    net = build({**TINY_VAE, "channel_mult": [1, 2, 2]})
    assert net.size_multiple == 4
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 3, 10, 8))


def test_a_trained_plain_vae_loads_into_the_switched_vae_and_reconstructs_the_same(tmp_path):
    plain = build({**TINY_VAE, "num_experts": 1}, seed=1)
    file = tmp_path / "plain.safetensors"
    save_network_weights(plain, file)
    switched = build({**TINY_VAE, "num_experts": 4}, seed=2)
    report = load_network_weights(switched, file, strict=True)
    assert report.complete
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(switched.reconstruct(images), plain.reconstruct(images), rtol=1e-5, atol=1e-5)
    # the switched network's own checkpoint loads back unchanged
    save_network_weights(switched, tmp_path / "switched.safetensors")
    again = build({**TINY_VAE, "num_experts": 4}, seed=3)
    assert load_network_weights(again, tmp_path / "switched.safetensors").complete
    torch.testing.assert_close(again.reconstruct(images), switched.reconstruct(images))


def test_switched_rrdbnet_converts_a_trained_rrdbnet_and_starts_with_its_output(tmp_path):
    sizes = {"nf": 8, "nb": 1, "gc": 4, "scale": 2}
    plain = build({"type": "rrdbnet", **sizes}, seed=1)
    save_network_weights(plain, tmp_path / "rrdb.safetensors")
    switched = build({"type": "switched_rrdbnet", **sizes, "num_experts": 3}, seed=2)
    layers = switched_layers(switched)
    assert len(layers) == 15 and all(name.startswith("body.") for name in layers)
    first = layers["body.0.rdb1.conv1"].weight
    assert not torch.equal(first[0], first[1])  # fresh experts differ from one another
    assert load_network_weights(switched, tmp_path / "rrdb.safetensors").complete
    lq = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(switched.eval()(lq), plain.eval()(lq), rtol=1e-5, atol=1e-5)


def test_switched_rrdbnet_pattern_that_matches_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match="matches no convolution") as info:
        build({"type": "switched_rrdbnet", "nf": 8, "nb": 1, "gc": 4, "switched_layers": ["trunk.*"]})
    assert info.value.problems[0].path.endswith("switched_layers")


def test_set_step_anneals_every_layers_temperature_as_a_function_of_the_iteration():
    net = build({**TINY_VAE, "num_experts": 2, "temperature_start": 9.0, "temperature_end": 1.0,
                 "temperature_steps": 8})
    for iteration, expected in ((1, 8.0), (5, 4.0), (8, 1.0), (3, 6.0), (100, 1.0)):
        net.set_step(iteration)
        assert {float(layer.temperature) for layer in switched_layers(net).values()} == {expected}


def test_debug_info_reports_usage_histograms_entropies_temperature_and_expert_maps():
    net = build({**TINY_VAE, "num_experts": 3}).train()
    net.set_step(1)
    net(torch.rand(2, 3, 8, 8))
    info = net.debug_info()
    usage = info["switch/encoder.0.conv1/usage"]
    assert usage.shape == (3,) and abs(float(usage.sum()) - 1) < 1e-6
    assert 0 <= float(info["switch/encoder.0.conv1/entropy"]) <= 1
    assert 0 <= float(info["switch/usage_entropy"]) <= 1
    assert float(info["switch/temperature"]) == 1.0
    maps = info["switch/expert_maps"]
    assert maps.dim() == 4 and maps.shape[:3] == (1, 3, 8) and maps.shape[3] == 8 * 10
    assert 0 <= float(maps.min()) and float(maps.max()) <= 1
    repeat = net.debug_info()  # nothing routed since the last look
    assert float(repeat["switch/encoder.0.conv1/usage"].sum()) == 0


# ---------------------------------------------------------------------- training: resume, DDP
def tiny_run_config(root: Path, name: str, niter: int) -> dict:
    return resolve_config({
        "name": name, "seed": 1, "device": "cpu",
        "datasets": {"train": {"type": "image_folder", "paths": ["skimage:astronaut"], "target_size": 16, "scale": 1,
                               "batch_size": 2, "num_workers": 0}},
        "networks": {"generator": {**TINY_VAE, "num_experts": 3, "temperature_start": 4.0, "temperature_end": 1.0,
                                   "temperature_steps": 6, "usage_history": 3, "dropout": 0.3}},
        "steps": {"generator": {
            "training": ["generator"], "optimizer": {"type": "adam", "lr": 1e-2},
            "injectors": {"vae": {"type": "generator", "network": "generator", "in": "hq",
                                  "out": {"recon": "gen", "kl": "kl", "balance": "balance"}}},
            "losses": {"pix": {"type": "pix", "real": "hq", "fake": "gen"},
                       "kl": {"type": "direct", "key": "kl", "weight": 1e-3},
                       "balance": {"type": "direct", "key": "balance", "weight": 0.1}}}},
        "train": {"niter": niter},
        "logger": {"print_freq": 1, "save_checkpoint_freq": 2, "tensorboard": False},
        "path": {"root": str(root)},
    })


def train_tiny(root: Path, name: str, niter: int) -> Path:
    from dlas.trainer.run import train

    cfg = tiny_run_config(root, name, niter)
    run_dir = root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    train(cfg, run_dir)
    return run_dir


def test_a_run_resumed_mid_anneal_is_exactly_the_uninterrupted_run(tmp_path):
    straight = train_tiny(tmp_path, "straight", 4)
    train_tiny(tmp_path, "resumed", 2)
    resumed = train_tiny(tmp_path, "resumed", 4)  # picks up checkpoint 2: temperature 3.0, half-filled record
    a = load_file(str(straight / "checkpoints" / "4" / "generator.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "4" / "generator.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert float(a["encoder.0.conv1.temperature"]) == 2.0  # iteration 4 of a 4 -> 1 anneal over 6 iterations
    assert int(a["encoder.0.conv1.usage_slot"]) == 0  # the record of 3 wrapped around after 3 iterations


DDP_RANK = """
import os, sys, torch
from dlas.models.switched import SwitchedConv, advance_switches, keep_pending_per_rank
rank = int(os.environ["RANK"])
torch.distributed.init_process_group("gloo")
torch.manual_seed(0)
net = torch.nn.Sequential(SwitchedConv(3, 4, 3, 4, usage_history=2))
keep_pending_per_rank(net)
ddp = torch.nn.parallel.DistributedDataParallel(net)
torch.manual_seed(10 + rank)  # each rank sees its own data
usage = torch.zeros(4)
for _ in range(2):  # two forwards per iteration (mega batching): DDP broadcasts rank 0's buffers before each
    x = torch.randn(2, 3, 6, 6)
    ddp(x).sum().backward()
    with torch.no_grad():
        probs = torch.softmax(net[0].selector(x), dim=1).mean(dim=(0, 2, 3))
    usage += probs / probs.mean()
advance_switches(net)
torch.save((net[0].usage_record[0].clone(), usage / 2), sys.argv[1] + f"/rank{rank}.pt")
torch.distributed.destroy_process_group()
"""


def test_under_ddp_every_rank_records_the_usage_of_all_ranks_forwards(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        ranks.append(subprocess.Popen([sys.executable, "-c", DDP_RANK, str(tmp_path)], env=env))
    assert [p.wait(timeout=300) for p in ranks] == [0, 0]
    (record0, own0), (record1, own1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(record0, record1)
    torch.testing.assert_close(record0, (own0 + own1) / 2)
    assert not torch.allclose(own0, own1)
