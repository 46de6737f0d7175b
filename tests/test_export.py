"""scripts/export.py: ONNX and TorchScript files that match PyTorch and run on their own."""

import json
import re

import numpy as np
import pytest
import torch

from alexnet_lit.inference.export import METADATA_KEY, export_main
from alexnet_lit.inference.predict import load_model
from tests.conftest import CLASSES


def exported_difference(capsys) -> float:
    line = capsys.readouterr().out
    return float(re.search(r"max abs difference from PyTorch .*: (\S+) \(limit", line).group(1))


@pytest.mark.slow
def test_onnx_has_a_dynamic_batch_and_matches_pytorch(tiny_ckpt, tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    assert export_main(["--ckpt", str(tiny_ckpt), "--format", "onnx", "--out", str(out)]) == 0
    assert exported_difference(capsys) <= 1e-4

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    metadata = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert metadata["class_names"] == CLASSES
    assert metadata["preprocessing"]["image_size"] == 96
    assert metadata["temperature"] > 0 and "softmax(logits / temperature)" in metadata["output"]
    (images,) = session.get_inputs()
    assert images.name == "images" and not isinstance(images.shape[0], int)  # symbolic batch

    model = load_model(tiny_ckpt)
    x = torch.randn(5, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    (logits,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert logits.shape == (5, 3)
    assert np.abs(logits - expected).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "torch_export"])
def test_pytorch_formats_match_and_carry_metadata(fmt, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / ("model.pt" if fmt == "torchscript" else "model.pt2")
    assert export_main(["--ckpt", str(tiny_ckpt), "--format", fmt, "--out", str(out)]) == 0
    assert exported_difference(capsys) <= 1e-4
    extra = {f"{METADATA_KEY}.json": ""}
    if fmt == "torchscript":
        loaded = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    else:
        loaded = torch.export.load(out, extra_files=extra).module()
    assert json.loads(extra[f"{METADATA_KEY}.json"])["class_names"] == CLASSES
    x = torch.randn(4, 3, 96, 96)  # a batch size the export never saw
    with torch.no_grad():
        assert torch.allclose(loaded(x), load_model(tiny_ckpt)(x), atol=1e-4)


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    code = export_main(["--ckpt", str(tmp_path / "no.ckpt"), "--format", "onnx", "--out", "x"])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint '{tmp_path / 'no.ckpt'}'")


def test_an_out_path_that_cannot_be_written_is_one_line(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file where a folder should be")
    out = tmp_path / "taken" / "model.pt2"
    assert (
        export_main(["--ckpt", str(tiny_ckpt), "--format", "torch_export", "--out", str(out)]) == 2
    )
    assert capsys.readouterr().err.startswith(f"error: --out '{out}' cannot be written (")
    assert not list(tmp_path.glob("**/*.pt2"))
