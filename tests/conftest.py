"""Shared fixtures: tiny ImageFolder datasets generated in tmp_path, never downloaded; the runs
that several test files read; a checkpoint that would run code when unpickled."""

import contextlib
import io
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ["ant", "bee", "cat"]


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist runs the tests in one process per core: split the cores between the workers
    # instead of letting each worker's torch use all of them.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        torch.set_num_threads(threads)
        # and in the processes the tests start (scripts, DDP ranks, sweep workers), whose OpenMP
        # threads would otherwise spin against the other workers' for the same cores.
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    report = yield
    # pytest-xdist sends each report to the main process as UTF-8; a captured line naming a file
    # whose name is not UTF-8 (the surrogates of os.fsdecode) would end the whole run there.
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
        for title, text in report.sections
    ]
    return report


def make_image_folder(
    root: Path,
    classes: list[str] = CLASSES,
    splits: dict[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """Write ``root/<split>/<class>/img_N.jpg``: small JPEGs of varied sizes, tinted per class."""
    splits = splits or {"train": 4, "val": 2}
    rng = np.random.default_rng(seed)
    for split, per_class in splits.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                height, width = rng.integers(24, 72, size=2)
                pixels = rng.integers(0, 90, size=(height, width, 3))
                pixels[..., label % 3] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{i}.jpg")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A 3-class dataset with train/ (4 per class) and val/ (2 per class)."""
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny CLI fit (96 px, 1 epoch, 1 step) on 3 classes; returns the directory it ran in.

    It holds ``data/`` and ``lightning_logs/version_0/`` with ``config.yaml`` and one weights-only
    ``checkpoints/best-*.ckpt`` (17 MB: a classifier 64 wide, and no Adam state).
    """
    from alexnet_lit.training.cli import cli_main
    from tests.helpers import TINY_WIDTH

    root = tmp_path_factory.mktemp("tiny_run")
    data = make_image_folder(root / "data")
    overlay = root / "weights_only.yaml"
    overlay.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {monitor: val/acc, mode: max, save_weights_only: true,\n"
        "                  filename: 'best-{epoch:02d}', auto_insert_metric_name: false}\n"
    )
    config = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        cli_main(
            ["fit", "--config", str(config), "--config", str(overlay), f"--data.data_dir={data}",
             "--data.image_size=96", "--data.batch_size=4", "--data.num_workers=0",
             f"--model.hidden_features={TINY_WIDTH}", "--trainer.max_epochs=1",
             "--trainer.limit_train_batches=1",
             "--trainer.enable_progress_bar=false"]
        )  # fmt: skip
    return root


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_run: Path) -> Path:
    """The tiny run's best checkpoint."""
    (ckpt,) = (tiny_run / "lightning_logs" / "version_0" / "checkpoints").glob("best-*.ckpt")
    return ckpt


# --- one fit, then validate and test on its last checkpoint -----------------------------------

# A class folder's name (no "/" can be in one): the report must never turn it into markup.
HOSTILE = "<script>alert(1)<img src=x onerror=alert(1)>"
# Seven classes, so that top-5 accuracy is logged; sorted, as the folders are read.
RUN_CLASSES = sorted([HOSTILE, *(f"class_{i}" for i in range(1, 7))])
RUN_EPOCHS, RUN_TRAIN_BATCHES, RUN_BATCH = 3, 2, 4
RUN_LR = [3e-4, 3e-4, 0.0]  # per epoch: StepLR drops the rate to 0 for the last epoch


@dataclass(frozen=True)
class EvaluatedRun:
    root: Path  # the folder the commands ran in
    data: Path
    fit: Path  # lightning_logs/version_0
    validate: Path  # version_1: validate on the fit's last.ckpt
    test: Path  # version_2: test on the fit's last.ckpt
    leak: tuple[Path, Path]  # a train image and its byte-identical copy in val/
    truncated: Path  # a train JPEG cut short: left out by the scan
    metrics: dict[str, dict[str, float]]  # callback_metrics of "fit", "validate" and "test"
    best_model_path: str
    best_model_score: float
    fit_output: str  # what the fit printed
    log: list[str]  # lightning.pytorch's log messages of all three commands


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory) -> EvaluatedRun:
    """One CLI fit with configs/default.yaml (67 px, batches of 4, 3 epochs of 2 steps, logging
    every step), then ``validate`` and ``test`` on its ``last.ckpt``, all in one folder.

    The data has 7 classes (4 train and 2 val images each), one named :data:`HOSTILE`, a val
    image copied from train and a truncated train JPEG. The learning rate is 3e-4 (at the
    default 1e-4, two steps leave 7-class logits so nearly uniform that the fitted temperature
    stays exactly 1), then 0 in the last epoch: that epoch keeps the previous epoch's weights,
    so it cannot improve ``val/acc``, and ``last.ckpt`` is never the best checkpoint.
    """
    from alexnet_lit.training.cli import cli_main
    from tests.helpers import cli_args, fit_args

    root = tmp_path_factory.mktemp("evaluated_run")
    data = make_image_folder(root / "data", RUN_CLASSES, {"train": 4, "val": 2})
    leak = (data / "train" / "class_1" / "img_0.jpg", data / "val" / "class_1" / "leak.jpg")
    shutil.copy(*leak)
    whole = (data / "train" / "class_2" / "img_0.jpg").read_bytes()
    truncated = data / "train" / "class_2" / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) * 2 // 3])
    fit = fit_args(
        data, f"--data.batch_size={RUN_BATCH}", f"--trainer.max_epochs={RUN_EPOCHS}",
        f"--trainer.limit_train_batches={RUN_TRAIN_BATCHES}", "--trainer.log_every_n_steps=1",
        f"--model.optimizer.init_args.lr={RUN_LR[0]}",
        "--model.lr_scheduler.class_path=torch.optim.lr_scheduler.StepLR",
        f"--model.lr_scheduler.init_args.step_size={RUN_EPOCHS - 1}",
        "--model.lr_scheduler.init_args.gamma=0",
    )  # fmt: skip
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    evaluate = (f"--data.batch_size={RUN_BATCH}", f"--ckpt_path={last}")
    records, out = _Records(), io.StringIO()
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(records)
    metrics = {}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            with contextlib.redirect_stdout(out):
                trainer = cli_main(fit).trainer
            best = trainer.checkpoint_callback
            best_model_path, best_model_score = best.best_model_path, float(best.best_model_score)
            metrics["fit"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
            for subcommand in ("validate", "test"):
                trainer = cli_main(cli_args(subcommand, data, *evaluate)).trainer
                metrics[subcommand] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    finally:
        lightning_logger.removeHandler(records)
    logs = root / "lightning_logs"
    return EvaluatedRun(
        root=root, data=data, fit=logs / "version_0", validate=logs / "version_1",
        test=logs / "version_2", leak=leak, truncated=truncated, metrics=metrics,
        best_model_path=best_model_path, best_model_score=best_model_score,
        fit_output=out.getvalue(), log=records.messages,
    )  # fmt: skip


# --- a checkpoint that would run code --------------------------------------------------------


class CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code an attacker picks."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (os.fspath(self.marker), "w")


class Crafted(NamedTuple):
    path: Path  # the checkpoint
    marker: Path  # the file its payload would create


@pytest.fixture
def crafted_checkpoint(tmp_path: Path) -> Crafted:
    """A checkpoint-shaped file (an AlexNet's hyperparameters, a state_dict entry) with a
    payload, and the marker file the payload would create if the file were ever unpickled."""
    from alexnet_lit import LitAlexNet

    marker = tmp_path / "pwned"
    checkpoint = {
        "state_dict": {"model.classifier.6.bias": torch.zeros(2)},
        "hyper_parameters": dict(LitAlexNet(num_classes=2).hparams),
        "pytorch-lightning_version": "2.6.0",
        "payload": CreatesFile(marker),
    }
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    assert not marker.exists()
    return Crafted(path, marker)
