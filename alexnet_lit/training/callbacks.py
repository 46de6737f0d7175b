"""The training dashboards (throughput and epoch times, the HPARAMS tab of TensorBoard) and the
fine-tuning schedule.

Neither dashboard adds a host-device sync to a training step: throughput counts images from the
batch shape and times with ``time.perf_counter``. The evaluation pictures and reports are
:mod:`alexnet_lit.evaluation.callbacks`.
"""

import os
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch import callbacks
from torch.utils.tensorboard.summary import hparams as hparams_summary

from alexnet_lit.errors import UserError
from alexnet_lit.loggers import log_params, tensorboard_logger
from alexnet_lit.runs import logged_step


def _in_fit(trainer: L.Trainer) -> bool:
    return trainer.state.fn == "fit" and not trainer.sanity_checking


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
    """Fill TensorBoard's HPARAMS tab with the run's real settings and ``hp_metric``, and give
    the same settings to the other loggers (MLflow's parameters).

    At the start of training it records the model, optimizer, scheduler, data and trainer
    settings actually in use (read from the live objects, not from defaults); after every
    validation epoch it logs ``hp_metric`` as the best ``val/acc`` so far (``val/acc_best``).
    Use it with ``TensorBoardLogger(default_hp_metric=False)``, or the logger adds its -1.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.loggers or not trainer.is_global_zero:
            return
        params = run_hyperparameters(trainer, pl_module)
        log_params(trainer, params)  # the same settings as parameters of an MLflow run
        logger = tensorboard_logger(trainer)
        if logger is None:
            return
        # Written here rather than with logger.log_hyperparams, which would also log hp_metric
        # at step 0 and add these flat keys to hparams.yaml beside the model's.
        experiment, start, end = hparams_summary(params, {"hp_metric": 0.0})
        writer = logger.experiment.file_writer  # torch's SummaryWriter opens it on creation
        for summary in (experiment, start, end):
            writer.add_summary(summary)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = tensorboard_logger(trainer)
        best = trainer.callback_metrics.get("val/acc_best")
        if logger is None or best is None or not _in_fit(trainer):
            return
        logger.log_metrics({"hp_metric": float(best)}, step=logged_step(trainer))


# Optimizer options that choose an implementation, not the optimization: left out of HPARAMS.
_IMPLEMENTATION_FLAGS = {"foreach", "fused", "capturable", "differentiable", "maximize"}


def run_hyperparameters(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """The settings of a started run as flat ``group/name`` scalars and strings."""
    hp = pl_module.hparams
    params: dict[str, Any] = {"model/class": type(pl_module).__name__}
    for key in ("arch", "weights", "num_classes", "in_channels", "dropout", "hidden_features"):
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


class BackboneFinetuning(callbacks.BackboneFinetuning):
    """Lightning's ``BackboneFinetuning`` (the backbone, ``pl_module.backbone``, frozen until
    ``unfreeze_backbone_at_epoch``, then trained in its own optimizer group at a fraction of the
    head's learning rate that grows each epoch up to it), plus two things it lacks:

    - A fit resumed after the thaw trains the backbone. Lightning's restores the backbone's
      optimizer group but leaves the freeze of its ``setup`` in place, so the resumed fit would
      silently keep the convolutions fixed.
    - The two groups are logged as the hyperparameter ``param_groups`` (``hparams.yaml``).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The backbone's optimizer group appears at the thaw; what is built before then (a
        # learning-rate scheduler, the module's no-decay split of biases) does not know it, and
        # OneCycleLR or ReduceLROnPlateau would fail there, epochs into the fit.
        if stage == "fit" and getattr(pl_module, "lr_scheduler", None) is not None:
            raise UserError(
                "BackboneFinetuning sets the backbone's learning rate itself, from the epoch it "
                "adds the backbone's optimizer group, which model.lr_scheduler would not know; "
                "leave out the scheduler overlay or configs/finetune.yaml."
            )
        if stage == "fit" and pl_module.hparams.get("no_decay_bias"):
            raise UserError(
                "BackboneFinetuning adds the backbone's optimizer group with weight decay on "
                "every tensor, which model.no_decay_bias would not reach; pass "
                "--model.no_decay_bias false with configs/finetune.yaml."
            )
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.previous_backbone_lr is not None:  # restored from a checkpoint after the thaw
            self.make_trainable(pl_module.backbone)
        if trainer.logger is not None and trainer.optimizers:
            trainer.logger.log_hyperparams({"param_groups": self.param_groups(trainer)})

    def param_groups(self, trainer: L.Trainer) -> dict[str, dict[str, Any]]:
        """The head's and the backbone's learning rates and the epoch each starts training."""
        head_lr = trainer.optimizers[0].defaults.get("lr")
        start = self.unfreeze_backbone_at_epoch
        backbone_lr = self.backbone_initial_lr
        if backbone_lr is None and head_lr is not None:
            backbone_lr = head_lr * self.backbone_initial_ratio_lr
        growth = self.lambda_func(start + 1)
        capped = " up to the head's" if self.should_align else ""
        return {
            "head": {"trains_from_epoch": 0, "lr": head_lr},
            "backbone": {
                "trains_from_epoch": start,
                "lr": backbone_lr,
                "lr_each_later_epoch": f"x {growth:g}{capped}",
            },
        }
