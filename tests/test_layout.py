"""The evaluation callbacks share one collection per epoch, in any order; old config paths."""

import json
from pathlib import Path

import pytest
import yaml

from alexnet_lit.checkpoints import load_checkpoint
from alexnet_lit.metrics import EpochOutputs
from alexnet_lit.training.cli import cli_main
from tests.conftest import make_image_folder
from tests.helpers import DEFAULT_CONFIG, cli_error_line, fit_args

EVALUATION = (
    "alexnet_lit.evaluation.callbacks.TemperatureScaling",
    "alexnet_lit.evaluation.callbacks.EvaluationReport",
    "alexnet_lit.evaluation.callbacks.ValidationImages",
    "alexnet_lit.evaluation.callbacks.RunReport",
)


def config_with(tmp_path: Path, callbacks: list) -> Path:
    """default.yaml with its callbacks replaced by ``callbacks``."""
    config = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())
    config["trainer"]["callbacks"] = callbacks
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_evaluation_callbacks_in_reverse_order_read_one_collection_per_epoch(tmp_path, monkeypatch):
    computed = []
    real_compute = EpochOutputs.compute

    def counted(self):
        computed.append(self)
        return real_compute(self)

    # Before the module is built: torchmetrics wraps compute (and caches its result) per object.
    monkeypatch.setattr(EpochOutputs, "compute", counted)
    default = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())["trainer"]["callbacks"]
    reversed_order = [*reversed(EVALUATION), *(c for c in default if c not in EVALUATION)]
    config = config_with(tmp_path, reversed_order)
    data = make_image_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    # lr 1e-3: after 4 steps at 1e-4 the narrow test network's logits are still ~0, which
    # leaves a temperature nothing to fit (it stays 1).
    lr = "--model.optimizer.init_args.lr=0.001"
    args = fit_args(data, "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", lr)
    cli_main(["fit", "--config", str(config), *args[3:]])

    assert len(computed) == 2  # one per validation epoch (the sanity check reads nothing)
    run = tmp_path / "lightning_logs" / "version_0"
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")["hyper_parameters"]["temperature"]
    assert last != 1.0  # fitted before the checkpoint was saved, though listed after the others
    report = json.loads((run / "val_report.json").read_text())
    assert report["calibration"]["temperature"] == pytest.approx(last)
    assert "this epoch's fitted temperature" in report["calibration"]["note"]
    html = (run / "report.html").read_text()
    assert "fitted temperature" in html

    # validate, with the run page listed before the callbacks that write what it shows.
    validate = ["validate", "--config", str(config), *args[3:]]
    cli_main([*validate, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    page = (tmp_path / "lightning_logs" / "version_1" / "report.html").read_text()
    assert "with the checkpoint&#39;s temperature" in page  # the class report's calibration note
    assert "reliability diagram" in page


def test_a_config_naming_an_old_class_path_names_the_new_one(tmp_path, monkeypatch, capsys):
    default = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())["trainer"]["callbacks"]
    old = ["alexnet_lit.callbacks.EpochTimer" if "EpochTimer" in str(c) else c for c in default]
    config = config_with(tmp_path, old)
    monkeypatch.chdir(tmp_path)
    line = cli_error_line(capsys, ["fit", "--config", str(config), "--trainer.fast_dev_run=1"])
    assert line == (
        f"error: '{config}' names alexnet_lit.callbacks.EpochTimer, which is now "
        "alexnet_lit.training.callbacks.EpochTimer; replace it there."
    )
