"""The LightningCLI end to end: fit, the saved run, checkpoint reload, and the other subcommands."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from alexnet_lit import LitAlexNet
from alexnet_lit.cli import cli_main
from alexnet_lit.transforms import eval_transform
from tests.conftest import CLASSES, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "default.yaml")


def fit_args(data_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        DEFAULT_CONFIG,
        f"--data.data_dir={data_dir}",
        "--data.batch_size=4",
        *extra,
    ]


def test_fast_dev_run_links_classes_from_the_data(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(fit_args(image_folder, "--trainer.fast_dev_run=1"))
    assert cli.model.hparams.num_classes == 3
    assert cli.model.hparams.class_names == CLASSES
    assert cli.model.model.classifier[-1].out_features == 3
    assert cli.model.hparams.preprocessing["image_size"] == 224
    assert isinstance(cli.trainer.optimizers[0], torch.optim.Adam)
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One short real fit (2 epochs of 2 steps); returns its lightning_logs/version_0 directory."""
    tmp = tmp_path_factory.mktemp("run")
    data = make_image_folder(tmp / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        cli_main(
            fit_args(
                data,
                "--trainer.max_epochs=2",
                "--trainer.limit_train_batches=2",  # "1" would parse as 1.0, the whole epoch
                "--trainer.enable_progress_bar=false",
            )
        )
    return tmp / "lightning_logs" / "version_0"


@pytest.mark.slow
def test_fit_writes_config_best_and_last_checkpoints(trained_run):
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 2
    assert config["model"]["optimizer"]["class_path"] == "torch.optim.Adam"
    hparams = yaml.safe_load((trained_run / "hparams.yaml").read_text())
    assert hparams["num_classes"] == 3 and hparams["class_names"] == CLASSES
    names = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    assert any(name.startswith("best-epoch=") for name in names), names
    # last.ckpt is the last epoch even where val/acc did not improve in it.
    last = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 4)
    assert list(trained_run.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_checkpoint_reloads_without_config_or_data(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config, no dataset here
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    model = LitAlexNet.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert model.hparams.class_names == CLASSES
    assert model.hparams.preprocessing["mean"] == [0.5, 0.5, 0.5]
    image = Image.new("RGB", (50, 40), "red")
    x = eval_transform(**model.hparams.preprocessing)(image).unsqueeze(0)
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()

    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["class_names"] == CLASSES
    reloaded = LitAlexNet(num_classes=3)
    reloaded.load_state_dict(raw["state_dict"])
    assert torch.equal(reloaded.model.classifier[-1].weight, model.model.classifier[-1].weight)


@pytest.mark.slow
@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_other_subcommands_run_on_the_checkpoint(subcommand, trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = trained_run.parents[1] / "data"
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cli = cli_main(
        [subcommand, "--config", DEFAULT_CONFIG, f"--data.data_dir={data}", f"--ckpt_path={ckpt}"]
    )
    if subcommand == "predict":
        assert cli.trainer.predict_loop.predictions  # one entry per batch
    else:
        stage = "val" if subcommand == "validate" else "test"
        assert 0.0 <= float(cli.trainer.callback_metrics[f"{stage}/acc"]) <= 1.0


def run_cli(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def test_missing_data_dir_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = run_cli(capsys, fit_args(tmp_path / "nowhere"))
    assert line.startswith("error: data.data_dir: folder") and "nowhere" in line


def test_missing_train_split_names_it(tmp_path, monkeypatch, capsys):
    # A missing val/ is not an error: train/ is split (tests/test_data_dirty.py).
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", splits={"val": 1})
    line = run_cli(capsys, fit_args(data, "--trainer.fast_dev_run=1"))
    assert f"'{data / 'train'}' does not exist" in line and line.startswith("error:")


def test_split_without_images_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", splits={"train": 1})
    for name in CLASSES:
        (data / "val" / name).mkdir(parents=True)
    line = run_cli(capsys, fit_args(data, "--trainer.fast_dev_run=1"))
    assert f"'{data / 'val'}' has no images" in line


def test_unknown_config_key_names_it(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("model:\n  learning_rate: 0.1\n")
    line = run_cli(capsys, fit_args(image_folder, "--config", str(overlay)))
    assert "model.learning_rate" in line and "--help" in line


def test_script_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "--config", DEFAULT_CONFIG,
         f"--data.data_dir={tmp_path / 'missing'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.data_dir")


def test_bad_value_names_the_key_and_the_reason(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = run_cli(capsys, fit_args(image_folder, "--data.batch_size=many"))
    assert 'Parser key "data.batch_size"' in line and "Got value: many" in line
