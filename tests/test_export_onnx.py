"""scripts/export_onnx.py: a run's image-to-image network as an ONNX model that matches PyTorch in onnxruntime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import yaml
from test_lmdb import load_script

from dlas.checkpoint import save_checkpoint
from dlas.registry import NETWORKS
from dlas.weights import load_network_weights

TINY_SR = {"type": "compact_sr", "nf": 4, "num_conv": 2, "scale": 2}  # a small graph: torch's exporter takes seconds


@NETWORKS.register("onnx_test_kth_shift")
class KthShift(torch.nn.Module):
    """A conv whose output is shifted by its 3rd smallest value: ``aten.kthvalue`` has no ONNX conversion."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y - torch.kthvalue(y.flatten(), 3).values


@NETWORKS.register("onnx_test_dict_out")
class DictOut(KthShift):
    """An autoencoder-like network whose forward returns a dict, not an image."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"recon": self.conv(x)}


def make_run(root: Path, network: dict) -> Path:
    """A run folder whose step-2 checkpoint holds random weights for ``generator`` and EMA weights 0.01 above."""
    run = root / "experiments" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yml").write_text(yaml.safe_dump({"name": "tiny", "networks": {"generator": network}}))
    torch.manual_seed(0)
    weights = NETWORKS.build(dict(network), "generator").state_dict()
    save_checkpoint(run, 2, {"generator": weights, "generator_ema": {k: v + 0.01 for k, v in weights.items()}},
                    {"step": 2})
    return run


def test_the_exported_model_matches_the_ema_network_at_any_batch_and_size(tmp_path, capsys, one_torch_thread):
    run = make_run(tmp_path, TINY_SR)
    output = tmp_path / "sr.onnx"
    assert load_script("export_onnx").main(["--run", str(run), "--output", str(output), "--check-size", "48"]) == 0
    assert "onnxruntime matches PyTorch within" in capsys.readouterr().out
    net = NETWORKS.build(dict(TINY_SR), "generator").eval()
    load_network_weights(net, run / "checkpoints" / "2" / "generator_ema.safetensors")
    lq = torch.rand(2, 3, 20, 28, generator=torch.Generator().manual_seed(1))  # neither traced nor checked at
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"input": lq.numpy()})[0]
    with torch.no_grad():
        assert np.abs(exported - net(lq).numpy()).max() < 1e-4
    metadata = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert metadata["dlas.step"] == "2" and metadata["dlas.weights"] == "generator_ema.safetensors"
    assert metadata["dlas.scale"] == "2" and metadata["dlas.network"] == "generator"


def test_a_network_with_an_operator_onnx_lacks_is_one_line_naming_it(tmp_path, capsys):
    run = make_run(tmp_path, {"type": "onnx_test_kth_shift"})
    output = tmp_path / "kth.onnx"
    assert load_script("export_onnx").main(["--run", str(run), "--output", str(output)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert error.startswith("error: network 'generator' cannot be exported to ONNX: operator aten.kthvalue")
    assert not output.exists() and list(tmp_path.glob(".kth.onnx*")) == []


def test_a_network_that_does_not_return_an_image_is_refused_before_exporting(tmp_path, capsys):
    run = make_run(tmp_path, {"type": "onnx_test_dict_out"})
    assert load_script("export_onnx").main(["--run", str(run), "--output", str(tmp_path / "d.onnx")]) == 2
    assert "is not an image-to-image network (its forward returns dict" in capsys.readouterr().err
