"""Weight loading: published RRDBNet layouts give the original network's output; safety; strict and lenient loads."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlas
from dlas.errors import DataError
from dlas.registry import NETWORKS
from dlas.weights import load_network_weights, save_network_weights

REPO = Path(__file__).resolve().parents[1]
NB, NF, GC = 2, 16, 8


# --- A re-implementation of xinntao/ESRGAN's RRDBNet_arch.py with its key names (the released .pth layout). ---
class ReferenceRDB(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class ReferenceRRDB(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.RDB1, self.RDB2, self.RDB3 = ReferenceRDB(nf, gc), ReferenceRDB(nf, gc), ReferenceRDB(nf, gc)

    def forward(self, x):
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class ReferenceESRGAN(nn.Module):
    def __init__(self, nf=NF, nb=NB, gc=GC):
        super().__init__()
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*[ReferenceRRDB(nf, gc) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.RRDB_trunk(fea))
        fea = self.lrelu(self.upconv1(F.interpolate(fea, scale_factor=2, mode="nearest")))
        fea = self.lrelu(self.upconv2(F.interpolate(fea, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.HRconv(fea)))


def old_layout(esrgan_sd: dict) -> dict:
    """The first ESRGAN release's ``model.N`` keys (xinntao/ESRGAN transer_RRDB_models.py, read backwards)."""
    tops = {"conv_first": "model.0", "trunk_conv": f"model.1.sub.{NB}", "upconv1": "model.3", "upconv2": "model.6",
            "HRconv": "model.8", "conv_last": "model.10"}
    out = {}
    for key, value in esrgan_sd.items():
        module, kind = key.rsplit(".", 1)
        if module.startswith("RRDB_trunk."):
            _, block, rdb, conv = module.split(".")
            out[f"model.1.sub.{block}.{rdb}.{conv}.0.{kind}"] = value
        else:
            out[f"{tops[module]}.{kind}"] = value
    return out


def reference_and_ours():
    torch.manual_seed(1)
    reference = ReferenceESRGAN().eval()
    torch.manual_seed(2)  # different init, so a load that did nothing cannot pass
    ours = NETWORKS.build({"type": "rrdbnet", "nf": NF, "nb": NB, "gc": GC, "scale": 4}).eval()
    return reference, ours


def small_rrdbnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return NETWORKS.build({"type": "rrdbnet", "nf": 8, "nb": 1, "gc": 4})


def same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_esrgan_release_layout_loads_to_the_same_outputs(tmp_path):
    reference, ours = reference_and_ours()
    torch.save(reference.state_dict(), tmp_path / "RRDB_ESRGAN_x4.pth")
    report = dlas.load_network_weights(ours, str(tmp_path / "RRDB_ESRGAN_x4.pth"))
    assert report.complete and report.loaded == len(ours.state_dict())
    assert same_outputs(reference, ours)


def test_old_model_n_layout_loads_to_the_same_outputs(tmp_path):
    reference, ours = reference_and_ours()
    torch.save(old_layout(reference.state_dict()), tmp_path / "old.pth")
    load_network_weights(ours, tmp_path / "old.pth")
    assert same_outputs(reference, ours)


def test_basicsr_checkpoint_prefers_params_ema(tmp_path):
    ema, plain, target = small_rrdbnet(1), small_rrdbnet(2), small_rrdbnet(3)
    torch.save({"params": plain.state_dict(), "params_ema": ema.state_dict()}, tmp_path / "net_g.pth")
    load_network_weights(target, tmp_path / "net_g.pth")
    assert same_outputs(target, ema) and not same_outputs(target, plain)


def test_basicsr_params_wrapper_and_ddp_prefix_are_removed(tmp_path):
    source, target = small_rrdbnet(1), small_rrdbnet(2)
    wrapped = {"params": {f"module.{k}": v for k, v in source.state_dict().items()}, "iter": 5}
    torch.save(wrapped, tmp_path / "net_g.pth")
    load_network_weights(target, tmp_path / "net_g.pth")
    assert same_outputs(target, source)


def test_strict_load_lists_missing_unexpected_and_misshapen_keys_and_changes_nothing(tmp_path):
    source, target = small_rrdbnet(1), small_rrdbnet(2)
    sd = source.state_dict()
    sd.pop("conv_hr.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["conv_first.weight"] = torch.zeros(8, 12, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(DataError) as error:
        load_network_weights(target, tmp_path / "bad.pth", strict=True)
    message = str(error.value)
    assert "bad.pth" in message and "1 missing (conv_hr.weight)" in message
    assert "1 unexpected (extra.weight)" in message
    assert "conv_first.weight: file [8, 12, 3, 3] vs network [8, 3, 3, 3]" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_lenient_load_takes_what_fits_and_reports_the_rest(tmp_path):
    source, target = small_rrdbnet(1), small_rrdbnet(2)
    sd = source.state_dict()
    sd.pop("conv_hr.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["conv_first.weight"] = torch.zeros(8, 12, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    old_first = target.conv_first.weight.clone()
    report = load_network_weights(target, tmp_path / "bad.pth", strict=False)
    assert report.missing == ["conv_hr.weight"]
    assert report.unexpected == ["extra.weight"]
    assert report.mismatched == [("conv_first.weight", (8, 12, 3, 3), (8, 3, 3, 3))]
    assert report.loaded == len(sd) - 2
    assert torch.equal(target.conv_body.weight, source.conv_body.weight)
    assert torch.equal(target.conv_first.weight, old_first)
    assert "1 missing" in report.summary() and "1 with another shape" in report.summary()


def test_batchnorm_files_from_before_num_batches_tracked_load_strictly(tmp_path):
    # PyTorch < 0.4.1 (the first ESRGAN-era files) saved BatchNorm without num_batches_tracked; torch's own
    # strict load_state_dict accepts such files and so must we.
    torch.manual_seed(0)
    source = NETWORKS.build({"type": "vgg_discriminator", "nf": 8, "norm": "batch"})
    with torch.no_grad():
        source.bn1_0.running_mean.uniform_()
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"params": old}, tmp_path / "netD.pth")
    target = NETWORKS.build({"type": "vgg_discriminator", "nf": 8, "norm": "batch"})
    report = load_network_weights(target, tmp_path / "netD.pth")
    assert report.complete and report.loaded == len(old)
    assert torch.equal(target.bn1_0.running_mean, source.bn1_0.running_mean)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"params": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(DataError, match="evil.pth.*refusing to load"):
        load_network_weights(small_rrdbnet(), tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_missing_file_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="not found.*nothing_here.pth"):
        load_network_weights(small_rrdbnet(), tmp_path / "nothing_here.pth")


def test_a_corrupt_file_is_a_data_error(tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="broken.pth.*not a readable"):
        load_network_weights(small_rrdbnet(), tmp_path / "broken.pth")


def test_safetensors_round_trip_keeps_tied_and_non_contiguous_tensors(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 6, bias=False)
            self.decoder = nn.Linear(6, 4, bias=False)
            self.decoder.weight = nn.Parameter(self.encoder.weight.t())  # a transposed (non-contiguous) view
            self.head = nn.Linear(4, 6, bias=False)
            self.head.weight = self.encoder.weight  # shares storage

    torch.manual_seed(0)
    source = Tied()
    save_network_weights(source, tmp_path / "tied.safetensors")
    torch.manual_seed(1)
    target = Tied()
    assert load_network_weights(target, tmp_path / "tied.safetensors").complete
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_safetensors_file_is_recognised_without_its_extension(tmp_path):
    source, target = small_rrdbnet(1), small_rrdbnet(2)
    save_network_weights(source, tmp_path / "weights.bin")
    load_network_weights(target, tmp_path / "weights.bin")
    assert same_outputs(source, target)


def test_convert_weights_script_writes_our_safetensors(tmp_path):
    reference, ours = reference_and_ours()
    torch.save({"model": old_layout(reference.state_dict())}, tmp_path / "old.pth")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_weights.py"), str(tmp_path / "old.pth"),
         str(tmp_path / "ours.safetensors"), "--network", "rrdbnet", "--nf", str(NF), "--nb", str(NB),
         "--gc", str(GC)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    ours.load_state_dict(load_file(str(tmp_path / "ours.safetensors")), strict=True)
    assert same_outputs(reference, ours)


def test_convert_weights_script_exits_2_on_a_mismatch(tmp_path):
    reference, _ = reference_and_ours()
    torch.save(reference.state_dict(), tmp_path / "esrgan.pth")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_weights.py"), str(tmp_path / "esrgan.pth"),
         str(tmp_path / "out.safetensors"), "--network", "rrdbnet", "--nf", str(NF), "--nb", "3", "--gc", str(GC)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "missing" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("options", [["--nb"], ["nb", "2"], ["--nb", "[1"]], ids=["no_value", "no_dashes", "bad_yaml"])
def test_convert_weights_script_exits_2_on_malformed_network_options(tmp_path, options):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_weights.py"), str(tmp_path / "in.pth"),
         str(tmp_path / "out.safetensors"), "--network", "rrdbnet", *options],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "--name value" in result.stderr


def test_x2_models_unshuffle_pixels_in_real_esrgan_channel_order():
    def basicsr_pixel_unshuffle(x, scale):  # Real-ESRGAN's formula, which its x2 weights were trained with
        b, c, h, w = x.shape
        x = x.view(b, c, h // scale, scale, w // scale, scale)
        return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c * scale * scale, h // scale, w // scale)

    torch.manual_seed(0)
    x2 = NETWORKS.build({"type": "rrdbnet", "nf": 8, "nb": 1, "gc": 4, "scale": 2}).eval()
    plain = NETWORKS.build({"type": "rrdbnet", "in_nc": 12, "nf": 8, "nb": 1, "gc": 4, "scale": 4}).eval()
    plain.load_state_dict(x2.state_dict())
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(x2(x), plain(basicsr_pixel_unshuffle(x, 2)))


def test_old_layout_at_x8_maps_the_third_upsampling_conv():
    torch.manual_seed(0)
    net = NETWORKS.build({"type": "rrdbnet", "nf": 8, "nb": 1, "gc": 4, "scale": 8})
    ours = net.state_dict()
    old = {"model.0.weight": ours["conv_first.weight"], "model.1.sub.1.weight": ours["conv_body.weight"],
           "model.3.weight": ours["conv_up1.weight"], "model.6.weight": ours["conv_up2.weight"],
           "model.9.weight": ours["conv_up3.weight"], "model.11.weight": ours["conv_hr.weight"],
           "model.13.weight": ours["conv_last.weight"],
           "model.1.sub.0.RDB2.conv4.0.bias": ours["body.0.rdb2.conv4.bias"]}
    converted = net.convert_state_dict(old)
    assert set(converted) == {"conv_first.weight", "conv_body.weight", "conv_up1.weight", "conv_up2.weight",
                              "conv_up3.weight", "conv_hr.weight", "conv_last.weight", "body.0.rdb2.conv4.bias"}
    assert all(converted[k] is ours[k] for k in converted)
