"""Every load path refuses a checkpoint that would run code when unpickled."""

import pickle
from pathlib import Path

import pytest
import torch

from alexnet_lit import LitAlexNet
from alexnet_lit.cli import cli_main
from alexnet_lit.inference import InferenceError, load_model
from scripts.export import main as export_main
from scripts.import_seed_checkpoint import main as import_main
from scripts.predict import main as predict_main
from tests.conftest import make_image_folder


class CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code an attacker picks."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint-shaped file with a payload, and the marker file the payload would create."""
    marker = tmp_path / "pwned"
    model = LitAlexNet(num_classes=2)
    checkpoint = {
        "state_dict": {"model.classifier.6.bias": torch.zeros(2)},
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": "2.6.0",
        "payload": CreatesFile(marker),
    }
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    assert not marker.exists()
    return path, marker


def test_the_crafted_file_really_runs_code_without_weights_only(crafted):
    path, marker = crafted
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()


def test_load_from_checkpoint_refuses_it(crafted):
    path, marker = crafted
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        LitAlexNet.load_from_checkpoint(path)
    assert not marker.exists()


def test_load_model_refuses_it_in_one_sentence(crafted):
    path, marker = crafted
    with pytest.raises(InferenceError, match=r"was refused: it holds Python objects"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("script", ["predict", "export", "import"])
def test_scripts_refuse_it(script, crafted, tmp_path, capsys):
    path, marker = crafted
    if script == "predict":
        images = make_image_folder(tmp_path / "img", splits={"x": 1})
        code = predict_main(["--ckpt", str(path), str(images), "--out", str(tmp_path / "p.csv")])
    elif script == "export":
        code = export_main(["--ckpt", str(path), "--format", "onnx", "--out", str(tmp_path / "m")])
    else:
        code = import_main([str(path), "--classes", "a", "b", "--out", str(tmp_path / "m.ckpt")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: '{path}' was refused: it holds Python objects that could run code when loaded "
        "(only tensors and plain data load, weights_only=True); re-save it as a state_dict from "
        "a source you trust."
    )
    assert not marker.exists()


def test_cli_ckpt_path_refuses_it(crafted, tmp_path, monkeypatch, capsys):
    path, marker = crafted
    data = make_image_folder(tmp_path / "data", classes=["a", "b"], splits={"train": 1, "val": 1})
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["validate", "--config", config, f"--data.data_dir={data}",
                  "--data.num_workers=0", f"--ckpt_path={path}"])  # fmt: skip
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: checkpoint '{path}' holds objects other than tensors")
    assert not marker.exists()
