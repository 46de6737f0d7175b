"""What a run shows in TensorBoard and the reports validate/test write, read with the real clients:
TensorBoard's EventAccumulator, the tensorboard server's HTTP API, and the files on disk."""

import contextlib
import io
import json
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torchmetrics.classification import MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from alexnet_lit.evaluation.class_report import most_confused, per_class_metrics, summary
from alexnet_lit.evaluation.pictures import png_bytes, render_confusion_matrix
from alexnet_lit.loggers import log_image
from alexnet_lit.training.cli import cli_main
from tests.conftest import (
    RUN_BATCH,
    RUN_CLASSES,
    RUN_EPOCHS,
    RUN_LR,
    RUN_TRAIN_BATCHES,
    EvaluatedRun,
)
from tests.helpers import TINY_WIDTH, fit_args, read_csv, tiny_trainer

CLASSES = RUN_CLASSES  # more than 5 classes, so top-5 accuracy is logged
EPOCHS, TRAIN_BATCHES, BATCH = RUN_EPOCHS, RUN_TRAIN_BATCHES, RUN_BATCH


@pytest.fixture(scope="module")
def runs(evaluated_run: EvaluatedRun) -> EvaluatedRun:
    """The shared fit (tests/conftest.py), then validate and test on its last checkpoint."""
    return evaluated_run


@pytest.fixture(scope="module")
def events(runs) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(runs.fit), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def values(events: EventAccumulator, tag: str) -> list[float]:
    return [event.value for event in events.Scalars(tag)]


@pytest.mark.slow
def test_scalars_are_logged_with_sane_values(events):
    expected = {
        "train/loss_step", "train/loss_epoch", "train/acc", "train/acc_top5", "val/loss",
        "val/acc", "val/acc_top5", "val/acc_best", "val/precision_macro", "val/recall_macro",
        "val/f1_macro", "val/ece", "lr-Adam", "train/images_per_s", "train/epoch_time_s",
        "val/epoch_time_s", "hp_metric",
    }  # fmt: skip
    assert expected <= set(events.Tags()["scalars"])
    assert len(values(events, "train/loss_step")) == EPOCHS * TRAIN_BATCHES
    assert all(math.isfinite(v) for v in values(events, "train/loss_step"))
    for tag in expected - {"train/loss_step", "lr-Adam", "hp_metric"}:
        assert len(values(events, tag)) == EPOCHS, tag  # once per epoch, no sanity-check entry
    for tag in ("val/acc", "val/acc_top5", "val/precision_macro", "val/recall_macro", "val/ece"):
        assert all(0 <= v <= 1 for v in values(events, tag)), tag
    acc = values(events, "val/acc")
    assert all(top5 >= a for top5, a in zip(values(events, "val/acc_top5"), acc, strict=True))
    assert values(events, "val/acc_best") == pytest.approx(np.maximum.accumulate(acc).tolist())
    assert values(events, "lr-Adam") == pytest.approx(RUN_LR)  # the schedule, epoch by epoch
    # Throughput is the epoch's training images over its training time.
    for rate, seconds in zip(
        values(events, "train/images_per_s"), values(events, "train/epoch_time_s"), strict=True
    ):
        assert rate > 0 and seconds > 0
        assert rate * seconds == pytest.approx(TRAIN_BATCHES * BATCH, rel=1e-4)


@pytest.mark.slow
def test_hparams_tab_holds_the_real_settings_and_best_val_acc(events, runs):
    hp_metric = values(events, "hp_metric")
    assert -1 not in hp_metric
    assert hp_metric[-1] == pytest.approx(max(values(events, "val/acc")))
    assert hp_metric[-1] == pytest.approx(runs.metrics["fit"]["val/acc_best"])
    val_steps = [event.step for event in events.Scalars("val/acc")]
    assert [event.step for event in events.Scalars("hp_metric")] == val_steps

    plugin_data = {
        tag: plugin_data_pb2.HParamsPluginData.FromString(content)
        for tag, content in events.PluginTagToContent("hparams").items()
    }
    experiment = plugin_data["_hparams_/experiment"].experiment
    assert [info.name.tag for info in experiment.metric_infos] == ["hp_metric"]
    hparams = plugin_data["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["model/num_classes"].number_value == len(CLASSES)
    assert hparams["model/hidden_features"].number_value == TINY_WIDTH
    assert hparams["optimizer/class"].string_value == "Adam"
    assert hparams["optimizer/lr"].number_value == pytest.approx(RUN_LR[0])
    assert hparams["data/batch_size"].number_value == BATCH
    assert hparams["data/image_size"].number_value == 67
    assert hparams["trainer/precision"].string_value == "32-true"
    assert hparams["trainer/max_epochs"].number_value == EPOCHS
    assert hparams["lr_scheduler/class"].string_value == "StepLR"


def test_hparams_of_a_run_without_a_scheduler_name_none():
    # The shared run has a StepLR; without one the HPARAMS tab says "none".
    from lightning.pytorch.demos.boring_classes import BoringModel

    from alexnet_lit.training.callbacks import run_hyperparameters

    assert run_hyperparameters(tiny_trainer(), BoringModel())["lr_scheduler/class"] == "none"


def decode(event) -> Image.Image:
    return Image.open(io.BytesIO(event.encoded_image_string))


@pytest.mark.slow
def test_images_are_logged_once_per_validation_epoch(events):
    tags = events.Tags()["images"]
    assert {"train/inputs", "val/confusion_matrix", "val/misclassified"} <= set(tags)
    (inputs,) = events.Images("train/inputs")  # once, at the start
    picture = np.asarray(decode(inputs))
    assert picture.std() > 5  # de-normalized pictures, not a flat -1..1 image clipped to black
    matrices = events.Images("val/confusion_matrix")
    # Drawn in the epochs that improve val/acc, and in the last one (which cannot: lr 0).
    acc = [(e.step, e.value) for e in events.Scalars("val/acc")]
    news = [step for i, (step, value) in enumerate(acc) if all(value > v for _, v in acc[:i])]
    assert [m.step for m in matrices] == [*news, acc[-1][0]]
    assert all(200 < m.width < 1000 and 200 < m.height < 1000 for m in matrices)
    mistakes = events.Images("val/misclassified")
    assert 1 <= len(mistakes) <= EPOCHS
    # At most 16 mistakes in rows of 8, each row followed by a row of their Grad-CAM maps.
    assert all(m.width <= 8 * 120 + 8 and m.height <= 4 * 160 for m in mistakes)
    grid = np.asarray(decode(mistakes[-1]).convert("RGB"))
    tile_rows = [grid[:140], grid[150:290]]  # a row of mistakes, then their CAM row below
    assert tile_rows[1].shape[0] > 100 and (tile_rows[0] != tile_rows[1][: len(tile_rows[0])]).any()


@pytest.mark.slow
def test_each_picture_is_encoded_once_for_its_file_and_tensorboard(runs, events):
    # The last epoch's pictures: TensorBoard holds the very PNG the run folder's file holds.
    for tag, name in [
        ("val/misclassified", "val_misclassified.png"),
        ("val/reliability", "val_reliability.png"),
    ]:
        logged = events.Images(tag)[-1]
        assert logged.encoded_image_string == (runs.fit / name).read_bytes(), tag
        with Image.open(runs.fit / name) as picture:
            assert (logged.width, logged.height) == picture.size, tag


def test_a_picture_logged_after_the_fit_closed_tensorboard_is_still_written(tmp_path):
    # A notebook's trainer.validate after trainer.fit: Lightning closed the writer at the fit's end.
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = tiny_trainer(logger=logger)
    logger.experiment.add_scalar("x", 1.0, 0)
    logger.finalize("success")
    picture = Image.new("RGB", (20, 10), "red")
    log_image(trainer, "val/confusion_matrix", picture, png_bytes(picture), 3)
    logger.experiment.flush()
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    accumulator.Reload()
    (logged,) = accumulator.Images("val/confusion_matrix")
    assert (logged.step, logged.width, logged.height) == (3, 20, 10)


@pytest.mark.slow
@pytest.mark.parametrize("subcommand, stage", [("validate", "val"), ("test", "test")])
def test_validate_and_test_write_reports(runs, subcommand, stage):
    run = getattr(runs, subcommand)
    images = len(list((runs.data / "val").rglob("*.jpg")))  # test/ is missing: val/ is tested
    rows = read_csv(run / f"{stage}_report.csv")
    assert [row["class"] for row in rows] == CLASSES
    assert sum(int(row["support"]) for row in rows) == images
    # The report agrees with the torchmetrics values the run logged.
    metrics = runs.metrics[subcommand]
    recall = np.mean([float(row["recall"]) for row in rows])
    assert recall == pytest.approx(metrics[f"{stage}/recall_macro"], abs=1e-4)
    precision = np.mean([float(row["precision"]) for row in rows])
    assert precision == pytest.approx(metrics[f"{stage}/precision_macro"], abs=1e-4)
    pairs = read_csv(run / f"{stage}_confused_pairs.csv")
    assert all(pair["true"] != pair["predicted"] for pair in pairs)
    wrong = round((1 - metrics[f"{stage}/acc"]) * images)
    listed = sum(int(pair["count"]) for pair in pairs)
    assert listed == wrong if len(pairs) < 10 else listed <= wrong  # the top 10 pairs are listed
    markdown = (run / f"{stage}_report.md").read_text()
    assert "| class_6 |" in markdown and "## Most confused pairs" in markdown
    with Image.open(run / f"{stage}_confusion_matrix.png") as image:
        assert image.width > 200 and image.height > 200
    with Image.open(run / f"{stage}_reliability.png") as image:
        assert image.width > 300 and np.asarray(image.convert("L")).std() > 5
    assert "Expected calibration error (15 bins): " in markdown
    # The temperature fitted after the fit is in the checkpoint the report evaluated.
    assert "with the checkpoint's temperature" in markdown


@pytest.mark.slow
def test_test_says_which_split_it_evaluates(runs):
    val_dir = runs.data / "val"
    assert f"test: evaluating {val_dir} (there is no test/ folder)" in runs.log


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_server_serves_val_acc(runs, events):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", f"--logdir={runs.fit.parent}",
         "--host=127.0.0.1", f"--port={port}", "--load_fast=false", "--reload_interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=version_0&tag=val%2Facc"
    points = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(points) < EPOCHS:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            # Not listening yet, or the run not loaded yet (HTTP 400): ask again.
            with contextlib.suppress(urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                points = get_json(url)
            time.sleep(0.5)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
    # Each point is [wall_time, step, value], as the dashboard reads it.
    assert [value for _, _, value in points] == pytest.approx(values(events, "val/acc"))


def test_per_class_metrics_match_scikit_learn():
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 6, size=200)  # class 6 never occurs
    predicted = np.where(rng.random(200) < 0.6, targets, rng.integers(0, 5, size=200))
    labels = list(range(7))  # class 5 is never predicted either
    confusion = confusion_matrix(targets, predicted, labels=labels)
    rows = per_class_metrics(confusion, [str(i) for i in labels])
    expected = precision_recall_fscore_support(targets, predicted, labels=labels, zero_division=0)
    for key, reference in zip(("precision", "recall", "f1", "support"), expected, strict=True):
        assert [row[key] for row in rows] == pytest.approx(list(reference)), key


def test_the_reports_macro_averages_are_the_logged_metrics():
    # Class 2 has no image in the split and nothing is predicted as it: torchmetrics' macro
    # averages leave it out, and the written reports must say the same numbers.
    targets = torch.tensor([0, 0, 1, 1, 1, 3, 3])
    predicted = torch.tensor([0, 0, 1, 1, 0, 3, 1])
    confusion = np.zeros((4, 4), dtype=np.int64)
    np.add.at(confusion, (targets.numpy(), predicted.numpy()), 1)
    reported = summary(confusion, per_class_metrics(confusion, list("abcd")))
    for key, metric in (
        ("macro_precision", MulticlassPrecision),
        ("macro_recall", MulticlassRecall),
        ("macro_f1", MulticlassF1Score),
    ):
        logged = metric(4, average="macro")(predicted, targets)
        assert reported[key] == pytest.approx(float(logged)), key


def test_most_confused_lists_off_diagonal_cells_by_count():
    confusion = np.array([[5, 3, 0], [1, 4, 6], [0, 3, 2]])
    pairs = most_confused(confusion, ["a", "b", "c"], top=3)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("b", "c", 6), ("c", "b", 3), ("a", "b", 3)  # a tie in count goes to the larger share
    ]  # fmt: skip
    assert pairs[0]["share"] == pytest.approx(6 / 11)
    assert most_confused(np.eye(3, dtype=int), ["a", "b", "c"]) == []


@pytest.mark.parametrize("num_classes", [3, 40, 1000])
def test_confusion_matrix_picture_stays_bounded(num_classes):
    confusion = np.random.default_rng(0).integers(0, 9, size=(num_classes, num_classes))
    names = [f"a_rather_long_class_name_{i}" for i in range(num_classes)]
    picture = render_confusion_matrix(confusion, names)
    assert picture.width < 1300 and picture.height < 1300


def test_grayscale_inputs_become_rgb_pictures():
    from alexnet_lit.evaluation.pictures import image_grid, to_pixels
    from alexnet_lit.preprocessing import preprocessing_record

    images = torch.linspace(-1, 1, 2 * 40 * 40).reshape(2, 1, 40, 40)
    preprocessing = preprocessing_record(in_channels=1)  # mean 0.5, std 0.5
    pixels = to_pixels(images, preprocessing, tile=64).numpy()
    assert pixels.shape == (2, 64, 64, 3) and pixels.dtype == np.uint8
    assert pixels.min() <= 2 and pixels.max() >= 250  # -1..1 mapped back onto 0..255
    assert (pixels[..., 0] == pixels[..., 2]).all()
    grid = image_grid(pixels, ["a", "b"], tile=64)
    assert grid.size[0] == 2 * (64 + 4) + 4


def test_epoch_time_counts_training_batches_not_what_follows_validation(monkeypatch):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from alexnet_lit.training import callbacks

    clock = [0.0]

    def perf_counter() -> float:  # a clock that moves 1 ms per reading, or when told to
        clock[0] += 0.001
        return clock[0]

    class SlowAfterValidation(L.Callback):  # stands for a checkpoint write after validation
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                clock[0] += 100.0

    monkeypatch.setattr(callbacks.time, "perf_counter", perf_counter)
    trainer = tiny_trainer(
        limit_train_batches=4, limit_val_batches=1,
        callbacks=[callbacks.EpochTimer(), SlowAfterValidation()],
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert trainer.callback_metrics["train/epoch_time_s"] < 1.0  # not the 100 s after validation
    assert trainer.callback_metrics["val/epoch_time_s"] < 1.0


@pytest.mark.slow
def test_without_a_logger_the_default_callbacks_fit_and_no_dashboard_is_named(
    image_folder, tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.chdir(tmp_path)
    cli_main(fit_args(image_folder, "--trainer.max_epochs=1", "--trainer.logger=false"))
    assert "trainer.logger: false: the learning rates are not logged." in caplog.text
    assert "dashboards:" not in capsys.readouterr().out
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert list(tmp_path.glob("checkpoints/best-*.ckpt")) and (tmp_path / "report.html").is_file()
