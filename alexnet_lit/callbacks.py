"""Lightning callbacks that make a run readable in TensorBoard and leave evaluation reports.

None of them adds a host-device sync to a training step: throughput counts images from the batch
shape and times with ``time.perf_counter``; the confusion matrix and the misclassified images are
gathered on the device and copied to the host once per validation epoch.
"""

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.tensorboard.summary import hparams as hparams_summary

from alexnet_lit import calibration
from alexnet_lit.explain import grad_cam, overlay
from alexnet_lit.reports import image_grid, render_confusion_matrix, short_name, write_report
from alexnet_lit.runs import run_dir


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def _in_fit(trainer: L.Trainer) -> bool:
    return trainer.state.fn == "fit" and not trainer.sanity_checking


def _evaluates(trainer: L.Trainer) -> bool:
    """Whether a validation epoch is one EvaluationReport writes: not the sanity check, and not
    a ``fast_dev_run``, which has no run folder."""
    return not trainer.sanity_checking and not trainer.fast_dev_run


def _step(trainer: L.Trainer) -> int:
    """The step Lightning logs scalars at, so that pictures line up with them. Lightning has no
    public name for it: this is what its own LearningRateMonitor and logger connector read.
    ``trainer.global_step`` is not it: the epoch-end validation logs before this counter moves,
    one step behind ``global_step``, and a resume adjusts it on its own."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def _sync(module: L.LightningModule) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it (once per epoch)."""
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


class EpochTimer(L.Callback):
    """Log ``train/images_per_s``, ``train/epoch_time_s`` and ``val/epoch_time_s`` each epoch.

    Training time runs from the epoch's start to its last training batch: it excludes the
    validation run(s) inside the epoch and what follows them until training resumes (checkpoint
    writes, which are timed by Lightning's profiler). Images are counted from the batch shape on
    every process (``world_size`` times the local count), so nothing waits on the device during a
    step.
    """

    def __init__(self) -> None:
        self._images = 0
        self._train_s = 0.0
        self._val_s = 0.0
        self._resumed: float | None = None
        self._val_started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._images, self._train_s, self._val_s = 0, 0.0, 0.0
        _sync(pl_module)
        self._resumed = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._resumed is None:  # the first batch after a validation inside the epoch
            self._resumed = time.perf_counter()
        self._images += int(batch[0].shape[0])

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not _in_fit(trainer) or self._resumed is None:
            return
        _sync(pl_module)
        now = time.perf_counter()
        self._train_s += now - self._resumed
        self._resumed = None
        self._val_started = now

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _in_fit(trainer) and self._resumed is None:
            self._val_s += time.perf_counter() - self._val_started

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed is not None:
            _sync(pl_module)
            self._train_s += time.perf_counter() - self._resumed
            self._resumed = None
        if self._train_s <= 0:
            return
        images = self._images * trainer.world_size
        pl_module.log("train/images_per_s", images / self._train_s, on_epoch=True)
        pl_module.log("train/epoch_time_s", self._train_s, on_epoch=True)
        if self._val_s > 0:
            pl_module.log("val/epoch_time_s", self._val_s, on_epoch=True)


class HyperparametersToTensorBoard(L.Callback):
    """Fill TensorBoard's HPARAMS tab with the run's real settings and ``hp_metric``.

    At the start of training it records the model, optimizer, scheduler, data and trainer
    settings actually in use (read from the live objects, not from defaults); after every
    validation epoch it logs ``hp_metric`` as the best ``val/acc`` so far (``val/acc_best``).
    Use it with ``TensorBoardLogger(default_hp_metric=False)``, or the logger adds its -1.
    """

    def __init__(self, metric: str = "val/acc_best") -> None:
        self.metric = metric

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _tensorboard(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        params = run_hyperparameters(trainer, pl_module)
        # Written here rather than with logger.log_hyperparams, which would also log hp_metric
        # at step 0 and add these flat keys to hparams.yaml beside the model's.
        experiment, start, end = hparams_summary(params, {"hp_metric": 0.0})
        writer = logger.experiment.file_writer  # torch's SummaryWriter opens it on creation
        for summary in (experiment, start, end):
            writer.add_summary(summary)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _tensorboard(trainer)
        best = trainer.callback_metrics.get(self.metric)
        if logger is None or best is None or not _in_fit(trainer):
            return
        logger.log_metrics({"hp_metric": float(best)}, step=_step(trainer))


# Optimizer options that choose an implementation, not the optimization: left out of HPARAMS.
_IMPLEMENTATION_FLAGS = {"foreach", "fused", "capturable", "differentiable", "maximize"}


def run_hyperparameters(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """The settings of a started run as flat ``group/name`` scalars and strings."""
    hp = pl_module.hparams
    params: dict[str, Any] = {"model/class": type(pl_module).__name__}
    for key in ("num_classes", "in_channels", "dropout"):
        if key in hp:
            params[f"model/{key}"] = hp[key]
    if "preprocessing" in hp:
        params["model/image_size"] = hp["preprocessing"]["image_size"]
    if trainer.optimizers:
        optimizer = trainer.optimizers[0]
        params["optimizer/class"] = type(optimizer).__name__
        for key, value in optimizer.defaults.items():
            if key not in _IMPLEMENTATION_FLAGS and value is not None:
                params[f"optimizer/{key}"] = value
    schedulers = trainer.lr_scheduler_configs
    params["lr_scheduler/class"] = type(schedulers[0].scheduler).__name__ if schedulers else "none"
    datamodule = trainer.datamodule
    if datamodule is not None:
        for key, value in datamodule.hparams.items():
            if key == "data_dir" and value is None:
                value = "demo"
            if not key.startswith("_") and value is not None:
                params[f"data/{key}"] = value
        for key in ("image_size", "crop_scale", "hflip", "num_workers"):
            if hasattr(datamodule, key):  # the resolved value where the hparam was None
                params[f"data/{key}"] = getattr(datamodule, key)
    params["trainer/precision"] = str(trainer.precision)
    params["trainer/max_epochs"] = trainer.max_epochs
    params["trainer/accumulate_grad_batches"] = trainer.accumulate_grad_batches
    params["trainer/accelerator"] = type(trainer.accelerator).__name__.replace("Accelerator", "")
    params["trainer/world_size"] = trainer.world_size
    params["seed"] = os.environ.get("PL_GLOBAL_SEED", "none")
    return {key: _hparam_value(value) for key, value in params.items()}


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return str(tuple(value))
    return str(value)


def to_pixels(images: torch.Tensor, preprocessing: Mapping[str, Any], tile: int) -> torch.Tensor:
    """Normalized ``[N, C, H, W]`` network inputs as ``[N, tile, tile, 3]`` uint8 pictures, on
    the images' device (``preprocessing``: the checkpoint's record, with ``mean`` and ``std``)."""
    mean = images.new_tensor(preprocessing["mean"]).view(1, -1, 1, 1)
    std = images.new_tensor(preprocessing["std"]).view(1, -1, 1, 1)
    images = F.interpolate(images.float(), size=(tile, tile), mode="bilinear", antialias=True)
    pixels = ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1)
    return pixels.expand(-1, -1, -1, 3) if pixels.shape[-1] == 1 else pixels


class _ConfusionCounter:
    """A confusion matrix summed on the device from each batch's logits (no host sync)."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None

    def reset(self, num_classes: int, device: torch.device) -> None:
        self.counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        num_classes = logits.shape[1]
        index = targets * num_classes + logits.argmax(dim=1)
        self.counts.index_add_(0, index, torch.ones_like(index))

    def compute(self, trainer: L.Trainer) -> np.ndarray:
        """Sum over processes (a collective: call it on every rank) and copy to the host."""
        counts = trainer.strategy.reduce(self.counts, reduce_op="sum")
        size = round(counts.numel() ** 0.5)
        return counts.view(size, size).cpu().numpy()


class ValidationImages(L.Callback):
    """Log pictures to TensorBoard: training inputs once, and each validation epoch the confusion
    matrix (``val/confusion_matrix``) and the most confident mistakes (``val/misclassified``),
    each row of mistakes followed by a row of their Grad-CAM heatmaps (what the network looked
    at for the class it predicted).

    Args:
        max_images: Images per grid, at most.
        tile: Side in pixels of each image in a grid.
    """

    def __init__(self, max_images: int = 16, tile: int = 112) -> None:
        self.max_images = max_images
        self.tile = tile
        self._inputs_logged = False
        self._confusion = _ConfusionCounter()
        self._mistakes: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._inputs_logged:
            return
        self._inputs_logged = True
        logger = _tensorboard(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        images, targets = batch[0][: self.max_images], batch[1][: self.max_images]
        preprocessing = pl_module.hparams.preprocessing
        pixels = to_pixels(images, preprocessing, self.tile).cpu().numpy()
        names = pl_module.hparams.class_names
        captions = [short_name(names[int(t)]) for t in targets.cpu()]
        grid = image_grid(pixels, captions, tile=self.tile)
        logger.experiment.add_image(
            "train/inputs", np.asarray(grid), _step(trainer), dataformats="HWC"
        )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._confusion.reset(pl_module.hparams.num_classes, pl_module.device)
        self._mistakes = None

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        images, targets = batch
        if trainer.sanity_checking or len(targets) == 0:  # empty: every image was unreadable
            return
        logits = outputs["logits"]
        self._confusion.update(logits, targets)
        if trainer.is_global_zero:
            self._keep_worst(pl_module, images, targets, logits)

    def _keep_worst(self, pl_module, images, targets, logits) -> None:
        """Keep the ``max_images`` most confident mistakes so far, with fixed-size device ops."""
        confidence, predicted = logits.float().softmax(dim=1).max(dim=1)
        # Mistakes score in [1, 2], correct predictions 0: top-k picks confident mistakes first.
        score = (predicted != targets).float() * (1 + confidence)
        top = score.topk(min(self.max_images, len(score))).indices
        batch = {
            "score": score[top],
            "target": targets[top],
            "predicted": predicted[top],
            "confidence": confidence[top],
            "pixels": to_pixels(images[top], pl_module.hparams.preprocessing, self.tile),
            "inputs": images[top],  # the network's input, for Grad-CAM at the epoch's end
        }
        if self._mistakes is not None:
            batch = {key: torch.cat([self._mistakes[key], batch[key]]) for key in batch}
            keep = batch["score"].topk(min(self.max_images, len(batch["score"]))).indices
            batch = {key: value[keep] for key, value in batch.items()}
        self._mistakes = batch

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        confusion = self._confusion.compute(trainer)  # on every rank: it is a collective
        folder = run_dir(trainer)  # a collective too
        logger = _tensorboard(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        names = pl_module.hparams.class_names
        step = _step(trainer)
        picture = render_confusion_matrix(confusion, names)
        logger.experiment.add_image(
            "val/confusion_matrix", np.asarray(picture), step, dataformats="HWC"
        )
        wrong = None if self._mistakes is None else self._mistakes["score"] > 0
        if wrong is None or not wrong.any():
            # No mistake this epoch: the report must not show an earlier epoch's.
            (folder / "val_misclassified.png").unlink(missing_ok=True)
            return
        network = getattr(pl_module, "model", None)
        heat = None
        if hasattr(network, "features"):  # Grad-CAM of the predicted class, on the device
            heat = grad_cam(
                network, self._mistakes["inputs"][wrong], self._mistakes["predicted"][wrong]
            )
            heat = F.interpolate(heat[:, None], size=(self.tile, self.tile), mode="bilinear")
            heat = heat[:, 0].cpu().numpy()
        mistakes = {key: value[wrong].cpu() for key, value in self._mistakes.items()}
        captions = [
            f"true: {short_name(names[int(t)])}\npred: {short_name(names[int(p)])} ({float(c):.2f})"
            for t, p, c in zip(
                mistakes["target"], mistakes["predicted"], mistakes["confidence"], strict=True
            )
        ]
        pixels = mistakes["pixels"].numpy()
        columns = min(8, len(pixels))
        tiles, labels = [], []
        for start in range(0, len(pixels), columns):  # a row of mistakes, then their CAM row
            tiles += list(pixels[start : start + columns])
            labels += captions[start : start + columns]
            if heat is not None:
                chunk = range(start, min(start + columns, len(pixels)))
                tiles += [overlay(pixels[i], heat[i]) for i in chunk]
                labels += ["Grad-CAM\n(predicted class)"] * len(chunk)
        grid = image_grid(np.stack(tiles), labels, columns=columns, tile=self.tile)
        logger.experiment.add_image("val/misclassified", np.asarray(grid), step, dataformats="HWC")
        grid.save(folder / "val_misclassified.png")  # the latest epoch's, for the run's report


class EvaluationReport(L.Callback):
    """On ``validate``, ``test`` and after each validation epoch of a fit (the latest one
    stays), write a per-class report, the confusion matrix and the
    reliability diagram into the run directory: ``{stage}_report.csv``,
    ``{stage}_confused_pairs.csv``, ``{stage}_report.md`` (with the expected calibration error
    before and after the checkpoint's temperature), ``{stage}_confusion_matrix.png`` and
    ``{stage}_reliability.png`` (``stage`` is ``val`` or ``test``).

    Args:
        top_pairs: How many most-confused class pairs to list.
    """

    def __init__(self, top_pairs: int = 10) -> None:
        self.top_pairs = top_pairs
        self._confusion = _ConfusionCounter()
        self._logits = calibration.EpochLogits()
        self.paths: dict[str, Path] = {}
        self.ece: dict[str, float] = {}

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._confusion.reset(pl_module.hparams.num_classes, pl_module.device)
        self._logits.reset()

    def _update(self, outputs: Any, batch: Any) -> None:
        if len(batch[1]):  # empty when every image of the batch was unreadable
            self._confusion.update(outputs["logits"], batch[1])
            self._logits.update(outputs["logits"], batch[1])

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        confusion = self._confusion.compute(trainer)
        out_dir = run_dir(trainer)  # a collective too, like compute
        logits, targets = self._logits.gather(trainer, pl_module)  # and this
        if not trainer.is_global_zero:
            return
        temperature = float(getattr(pl_module, "temperature", 1.0))
        raw = calibration.expected_calibration_error(logits, targets)
        scaled = calibration.expected_calibration_error(logits, targets, temperature)
        bins = f"Expected calibration error ({calibration.BINS} bins)"
        if temperature != 1.0:
            note = f"{bins}: {raw:.4f} raw, {scaled:.4f} with the checkpoint's temperature "
            note += f"{temperature:.3f}."
        elif trainer.state.fn == "fit":
            note = f"{bins}: {raw:.4f} (raw; this epoch's checkpoints carry a fitted temperature)."
        else:
            note = f"{bins}: {raw:.4f} (raw; the checkpoint has no fitted temperature)."
        title = f"{stage} report ({trainer.state.fn.value}, {int(confusion.sum())} images)"
        self.paths = write_report(
            confusion, pl_module.hparams.class_names, out_dir, stage, title, self.top_pairs,
            notes=[note],
        )  # fmt: skip
        self.paths["reliability"] = calibration.render_reliability(
            logits,
            targets,
            out_dir / f"{stage}_reliability.png",
            temperature,
            f"{stage} reliability",
        )
        self.ece = {"raw": raw, "calibrated": scaled, "temperature": temperature}
        if trainer.state.fn != "fit":
            rank_zero_info(f"{stage} report: {self.paths['markdown']}")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _evaluates(trainer):  # validate, and each of a fit's validation epochs
            self._start(trainer, pl_module)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if _evaluates(trainer):
            self._update(outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _evaluates(trainer):  # a fit's report is its latest epoch's
            self._write(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._update(outputs, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test")
