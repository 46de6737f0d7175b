"""Every load path refuses a checkpoint that would run code when unpickled."""

import pytest
import torch

from alexnet_lit import ImageFolderDataModule, LitAlexNet
from alexnet_lit.errors import CheckpointError
from alexnet_lit.inference.export import export_main
from alexnet_lit.inference.predict import load_model, predict_main
from alexnet_lit.inference.tutorial_weights import import_main
from tests.conftest import make_image_folder
from tests.helpers import cli_args, cli_error_line, tiny_fit


def test_the_crafted_file_really_runs_code_without_weights_only(crafted_checkpoint):
    path, marker = crafted_checkpoint
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()


REFUSAL = (
    "was refused: it holds Python objects that could run code when loaded (only tensors and "
    "plain data load, weights_only=True); use a checkpoint written by this project, or re-save "
    "its state_dict from a source you trust."
)


@pytest.mark.parametrize("load", [LitAlexNet.load_from_checkpoint, load_model])
def test_python_loaders_refuse_it_in_one_sentence(load, crafted_checkpoint):
    path, marker = crafted_checkpoint
    with pytest.raises(CheckpointError) as error:
        load(path)
    assert str(error.value) == f"checkpoint '{path}' {REFUSAL}"
    assert not marker.exists()


@pytest.mark.parametrize("script", ["predict", "export", "import"])
def test_scripts_refuse_it(script, crafted_checkpoint, tmp_path, capsys):
    path, marker = crafted_checkpoint
    if script == "predict":
        images = make_image_folder(tmp_path / "img", splits={"x": 1})
        code = predict_main(["--ckpt", str(path), str(images), "--out", str(tmp_path / "p.csv")])
    elif script == "export":
        code = export_main(["--ckpt", str(path), "--format", "onnx", "--out", str(tmp_path / "m")])
    else:
        code = import_main([str(path), "--classes", "a", "b", "--out", str(tmp_path / "m.ckpt")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint '{path}' {REFUSAL}"
    assert not marker.exists()


def test_cli_ckpt_path_refuses_it(crafted_checkpoint, tmp_path, monkeypatch, capsys):
    path, marker = crafted_checkpoint
    data = make_image_folder(tmp_path / "data", classes=["a", "b"], splits={"train": 1, "val": 1})
    monkeypatch.chdir(tmp_path)
    line = cli_error_line(capsys, cli_args("validate", data, f"--ckpt_path={path}"))
    assert line == f"error: checkpoint '{path}' {REFUSAL}"
    assert not marker.exists()


def test_a_datamodule_given_paths_still_writes_data_only_checkpoints(tmp_path):
    data = make_image_folder(tmp_path / "data", splits={"train": 1, "val": 1})
    dm = ImageFolderDataModule(data, predict_dir=data / "val", num_workers=0, image_size=67)
    trainer = tiny_fit(dm, max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.save_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    loaded = torch.load(tmp_path / "model.ckpt", weights_only=True)  # no Path objects in it
    assert loaded["datamodule_hyper_parameters"]["data_dir"] == str(data)
