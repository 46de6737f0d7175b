"""scripts/import_tutorial_weights.py: the tutorial's alexnet.pt becomes a checkpoint we can use."""

from pathlib import Path

import pytest
import torch
from torch import nn

from alexnet_lit import LitAlexNet
from alexnet_lit.inference.predict import predict_main
from alexnet_lit.inference.tutorial_weights import import_main
from alexnet_lit.training.cli import cli_main
from scripts.bench.tutorial_loop import tutorial_alexnet
from tests.conftest import CLASSES, make_image_folder
from tests.helpers import read_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory) -> tuple[nn.Sequential, Path]:
    """A randomly initialised tutorial model with 3 classes and its saved ``alexnet.pt``."""
    torch.manual_seed(0)
    model = tutorial_alexnet(3, len(CLASSES)).eval()
    path = tmp_path_factory.mktemp("tutorial") / "alexnet.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def imported(tutorial, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "model.ckpt"
    assert import_main([str(tutorial[1]), "--classes", *CLASSES, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_imported_checkpoint_gives_the_tutorials_outputs(tutorial, imported):
    model = LitAlexNet.load_from_checkpoint(imported, map_location="cpu").eval()
    assert model.hparams.class_names == CLASSES
    assert model.hparams.preprocessing == {
        "image_size": 224, "resize_size": 256, "in_channels": 3,
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    }  # fmt: skip
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(x), tutorial[0](x))


@pytest.mark.slow
def test_imported_checkpoint_predicts_and_validates(imported, tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", splits={"train": 1, "val": 2})
    out = tmp_path / "predictions.csv"
    assert predict_main(["--ckpt", str(imported), str(data / "val"), "--out", str(out)]) == 0
    rows = read_csv(out)
    assert len(rows) == 6 and all(row["predicted"] in CLASSES for row in rows)

    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        ["validate", "--config", str(ROOT / "configs" / "default.yaml"), f"--data.data_dir={data}",
         "--data.batch_size=3", "--data.num_workers=0", f"--ckpt_path={imported}"]
    )  # fmt: skip
    accuracy = float(cli.trainer.callback_metrics["val/acc"])
    expected = sum(row["predicted"] == Path(row["path"]).parent.name for row in rows) / 6
    assert accuracy == pytest.approx(expected)


def test_a_narrower_tutorial_network_imports_at_its_own_width(tmp_path):
    # The tutorial's script with its two hidden layers 64 wide: the width comes from the file.
    torch.manual_seed(0)
    narrow = tutorial_alexnet(3, len(CLASSES))
    narrow[15], narrow[18], narrow[21] = nn.Linear(6400, 64), nn.Linear(64, 64), nn.Linear(64, 3)
    weights, out = tmp_path / "alexnet.pt", tmp_path / "model.ckpt"
    torch.save(narrow.state_dict(), weights)
    assert import_main([str(weights), "--classes", *CLASSES, "--out", str(out)]) == 0
    model = LitAlexNet.load_from_checkpoint(out, map_location="cpu").eval()
    assert model.hparams.hidden_features == 64
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(x), narrow.eval()(x))


def test_a_file_of_another_shape_or_an_out_that_cannot_be_written_is_one_line(tmp_path, capsys):
    wider = tutorial_alexnet(3, len(CLASSES))
    wider[15] = nn.Linear(9216, 4096)  # the classifier of a 224 px input read at 256 px
    weights = tmp_path / "alexnet.pt"
    torch.save(wider.state_dict(), weights)
    assert import_main([str(weights), "--classes", *CLASSES, "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.startswith(f"error: '{weights}': Tensor classifier.0.weight")
    (tmp_path / "taken").write_text("a file where --out wants a folder")
    out = str(tmp_path / "taken" / "m.ckpt")
    assert import_main([str(weights), "--classes", *CLASSES, "--out", out]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_class_count_mismatch_is_one_clear_line(tutorial, tmp_path, capsys):
    code = import_main(
        [str(tutorial[1]), "--classes", "husky", "shiba", "--out", str(tmp_path / "x")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: '{tutorial[1]}' has 3 outputs but 2 class names were given")
    assert not (tmp_path / "x").exists()


def test_other_files_are_refused_with_the_reason(tmp_path, capsys):
    not_tutorial = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, not_tutorial)
    code = import_main([str(not_tutorial), "--classes", "a", "--out", str(tmp_path / "x.ckpt")])
    assert code == 2
    err = capsys.readouterr().err
    assert "not a state_dict saved by the tutorial's AlexNet" in err and "conv.weight" in err
