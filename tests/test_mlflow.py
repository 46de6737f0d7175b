"""MLflow beside TensorBoard (configs/mlflow.yaml), against a real ``mlflow server`` on
127.0.0.1 with a SQLite store in tmp_path: what a fit leaves there, a fit with TensorBoard alone
unchanged, an unreachable or lost server, fits started together, and a sweep's trials."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from alexnet_lit.runs import read_scalars
from alexnet_lit.training.cli import cli_main
from alexnet_lit.training.sweep import tune_main
from tests.helpers import ROOT, cli_error_line, fit_args, free_port, start_script

OVERLAY = str(ROOT / "configs" / "mlflow.yaml")
TWO_EPOCHS = ("--trainer.max_epochs=2",)


def start_server(folder: Path) -> tuple[str, subprocess.Popen]:
    """``mlflow server`` on a free 127.0.0.1 port, its store and artifacts in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
    ]  # fmt: skip
    log = open(folder / "server.log", "w")  # noqa: SIM115 (the server keeps it)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited: {(folder / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return url, server
        except OSError:
            time.sleep(0.3)
    stop_server(server)
    pytest.fail("mlflow server did not answer /health within 120 s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn workers
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> Iterator[str]:
    url, server = start_server(tmp_path_factory.mktemp("mlflow"))
    yield url
    stop_server(server)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, tracking) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    return tmp_path


def client_of(url: str) -> Any:
    from mlflow import MlflowClient  # here, not at collection: mlflow takes a second to import

    return MlflowClient(url)


def experiment_runs(url: str, name: str) -> list:
    client = client_of(url)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name}"
    return client.search_runs([experiment.experiment_id])


def run_files(folder: Path) -> set[str]:
    """The names a run folder holds, the event file's host-and-time name made generic."""
    names = set()
    for path in folder.rglob("*"):
        name = str(path.relative_to(folder))
        names.add("events" if "tfevents" in name else name)
    return names


def tensorboard_tags(folder: Path) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return set(events.Tags()["scalars"]), set(events.Tags()["images"])


@pytest.mark.slow
def test_a_fit_is_an_mlflow_run_and_tensorboard_alone_is_unchanged(image_folder, in_tmp, tracking):
    alone, both = in_tmp / "lightning_logs" / "version_0", in_tmp / "lightning_logs" / "version_1"
    os.environ.pop("MLFLOW_TRACKING_URI")  # TensorBoard alone must not need it
    cli_main(fit_args(image_folder, *TWO_EPOCHS))
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    cli_main(fit_args(image_folder, *TWO_EPOCHS, "--config", OVERLAY))

    # The run folder and TensorBoard get the same files and tags with MLflow as without it.
    assert run_files(both) == run_files(alone)
    assert tensorboard_tags(both) == tensorboard_tags(alone)
    assert {"train/inputs", "val/confusion_matrix", "val/reliability"} <= tensorboard_tags(alone)[1]
    assert not (in_tmp / "mlflow.db").exists() and not (in_tmp / "mlruns").exists()

    (run,) = experiment_runs(tracking, "alexnet-lit")
    client, run_id = client_of(tracking), run.info.run_id
    assert run.info.run_name == "version_1" and run.info.status == "FINISHED"
    assert run.data.tags["run_folder"] == str(both.resolve())
    assert run.data.tags["dataset"] == str(image_folder.resolve())
    assert run.data.tags["classes"] == "3"
    # Every scalar, per epoch, at the steps TensorBoard has.
    history = client.get_metric_history(run_id, "val/acc")
    assert [m.step for m in history] == [s for s, _ in read_scalars(both)["val/acc"]]
    assert len(history) == 2 and run.data.metrics["val/acc_best"] == max(m.value for m in history)
    assert run.data.params["optimizer/lr"] == "0.0001"
    assert run.data.params["data/batch_size"] == "2"
    # Pictures, and the run folder's files with the best checkpoint as artifacts.
    pictures = [a.path for a in client.list_artifacts(run_id, "images")]
    for tag in ("train~inputs", "val~confusion_matrix", "val~reliability"):
        assert any(tag in path for path in pictures), (tag, pictures)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "hparams.yaml", "report.html", "val_report.md"} <= artifacts
    (best,) = (both / "checkpoints").glob("best*.ckpt")
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == [
        f"checkpoints/{best.name}"
    ]
    from mlflow.artifacts import download_artifacts

    config = download_artifacts(run_id=run_id, artifact_path="config.yaml", tracking_uri=tracking)
    assert Path(config).read_bytes() == (both / "config.yaml").read_bytes()


def test_an_unreachable_server_is_one_line_before_anything_runs(
    image_folder, in_tmp, monkeypatch, capsys
):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    line = cli_error_line(capsys, fit_args(image_folder, "--config", OVERLAY))
    assert uri in line and "cannot be reached" in line
    assert list((in_tmp / "lightning_logs").glob("*")) == []  # no run folder left half-made


def test_tensorboard_must_stay_in_the_list(image_folder, in_tmp, capsys):
    args = fit_args(image_folder, "--trainer.logger=alexnet_lit.loggers.MLflowLogger")
    line = cli_error_line(capsys, args)
    assert "without TensorBoardLogger" in line and "configs/mlflow.yaml" in line
    assert list((in_tmp / "lightning_logs").glob("*")) == []


def test_without_mlflow_the_overlay_is_one_line(image_folder, in_tmp, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now fails
    line = cli_error_line(capsys, fit_args(image_folder, "--config", OVERLAY))
    assert "pip install -e '.[mlflow]'" in line


class StopServerAfterFirstEpoch(L.Callback):
    def __init__(self, server: subprocess.Popen) -> None:
        self.server = server

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            stop_server(self.server)


@pytest.mark.slow
def test_a_server_lost_mid_run_costs_warnings_not_the_fit(image_folder, tmp_path, monkeypatch):
    url, server = start_server(tmp_path / "server")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast (docs/dashboards.md)
    try:
        cli = cli_main(fit_args(image_folder, "--config", OVERLAY, *TWO_EPOCHS)[1:], run=False)
        cli.trainer.callbacks.append(StopServerAfterFirstEpoch(server))
        with pytest.warns(UserWarning, match=f"{url}: .* not logged") as warned:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        stop_server(server)
    assert cli.trainer.current_epoch == 2  # both epochs ran
    lost = [w for w in warned if "not logged" in str(w.message)]
    assert any("metrics" in str(w.message) for w in lost)
    assert any("config.yaml" in str(w.message) for w in lost)  # the uploads at the end
    folder = tmp_path / "lightning_logs" / "version_0"
    assert (folder / "report.html").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    assert list((folder / "checkpoints").glob("best*.ckpt"))


@pytest.mark.slow
def test_fits_started_together_get_their_own_folders_and_runs(image_folder, in_tmp, tracking):
    overlay = in_tmp / "mlflow.yaml"
    overlay.write_text(Path(OVERLAY).read_text().replace("alexnet-lit", "together"))
    args = [*fit_args(image_folder, "--config", str(overlay)), "--trainer.max_epochs=1"]
    processes = [start_script("train.py", args, in_tmp) for _ in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    folders = sorted((in_tmp / "lightning_logs").glob("version_*"))
    assert [f.name for f in folders] == ["version_0", "version_1"]
    runs = experiment_runs(tracking, "together")
    assert sorted(run.info.run_name for run in runs) == ["version_0", "version_1"]
    for run in runs:
        folder = in_tmp / "lightning_logs" / run.info.run_name
        assert run.data.tags["run_folder"] == str(folder.resolve())
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # one writer per folder
        assert len(list(folder.glob("checkpoints/best*.ckpt"))) == 1


@pytest.mark.slow
def test_each_sweep_trial_is_a_run_of_the_studys_experiment(image_folder, in_tmp, tracking):
    search = in_tmp / "search.yaml"
    search.write_text("model.dropout: {float: [0.2, 0.7]}\n")
    args = fit_args(image_folder, "--config", OVERLAY, "--trainer.max_epochs=1")[1:]
    assert tune_main([*args, "--search", str(search), "--trials", "2", "--study", "dogs"]) == 0
    runs = experiment_runs(tracking, "dogs")
    assert sorted(run.info.run_name for run in runs) == ["trial_0", "trial_1"]
    for run in runs:
        assert run.data.tags["run_folder"].endswith(f"sweeps/dogs/{run.info.run_name}")
    dropouts = {float(run.data.params["model/dropout"]) for run in runs}  # each its trial's
    assert len(dropouts) == 2 and all(0.2 <= p <= 0.7 for p in dropouts)
