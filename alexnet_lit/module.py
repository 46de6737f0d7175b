"""The LightningModule: AlexNet plus its loss, metrics and optimizer."""

import contextlib
import inspect
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning, StochasticWeightAveraging
from lightning.pytorch.cli import LRSchedulerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchvision.transforms import v2

from alexnet_lit.checkpoints import unsafe_checkpoint_message
from alexnet_lit.errors import CheckpointError, DataConfigError, UserError, first_line
from alexnet_lit.metrics import EpochOutputs, expected_calibration_error
from alexnet_lit.model import ALEXNET_WIDTH, Arch, build_alexnet
from alexnet_lit.preprocessing import preprocessing_record
from alexnet_lit.weights import load_weights

OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]
# Schedules whose convention is one step per optimizer step, not per epoch (and any scheduler
# that says so with an ``interval = "step"`` attribute, as WarmupCosineLR does).
PER_STEP_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


def tutorial_adam(params: Iterable) -> torch.optim.Optimizer:
    """The tutorial's optimizer, Adam with learning rate 1e-4, as one fused kernel per step."""
    return torch.optim.Adam(params, lr=1e-4, fused=True)


# Optimizer settings that choose an implementation, not the algorithm (see
# _check_resumed_training).
_OPTIMIZER_FLAGS = (
    "foreach", "fused", "capturable", "differentiable", "maximize", "decoupled_weight_decay"
)  # fmt: skip


class LitAlexNet(L.LightningModule):
    """AlexNet trained with cross-entropy; a checkpoint records its classes and preprocessing.

    Args:
        num_classes: Number of classes; the CLI links it from the DataModule.
        class_names: Class names in label order; the CLI links them from the DataModule.
        in_channels: 3 for RGB, 1 for grayscale.
        arch: ``tutorial`` (the tutorial's AlexNet) or ``torchvision`` (torchvision's, the one
            ImageNet weights exist for); see :func:`~alexnet_lit.model.build_alexnet`.
        weights: Where a fit starts: None (random), ``imagenet`` (torchvision's
            ``IMAGENET1K_V1``, from the torch hub cache), a ``.pth`` state dict of ``arch``, or
            a ``.ckpt`` of this project; loaded when a fit starts (not when it resumes), the
            last layer fresh when the class count differs. The CLI makes the data's
            preprocessing follow them.
        dropout: Dropout probability in the classifier.
        hidden_features: Width of the classifier's two hidden linear layers: 4096 in both
            AlexNets and in ImageNet's weights; narrower makes smaller checkpoints.
        optimizer: Builds the optimizer from the parameters; the tutorial's Adam(lr=1e-4) when
            not given. From YAML: ``class_path: torch.optim.SGD`` with ``init_args``.
        lr_scheduler: Builds an LR scheduler from the optimizer; none by default. A scheduler
            with an unset ``total_steps`` (OneCycleLR, WarmupCosineLR) gets the trainer's
            ``estimated_stepping_batches``.
        preprocessing: The eval preprocessing (image size, mean, std) the model was trained with,
            linked from the DataModule so that predictions never re-type it.
        class_weights: Per-class cross-entropy weights, or None; the CLI links them from
            ``data.balance: loss``.
        lr_scheduler_interval: Step the scheduler per ``"step"`` or per ``"epoch"``. None: per
            step for OneCycleLR, CyclicLR and WarmupCosineLR, per epoch for the others.
        no_decay_bias: Exempt biases (and any other 1-d parameter, e.g. norm weights) from the
            optimizer's weight decay.
        label_smoothing: Label smoothing of the cross-entropy loss, e.g. 0.1.
        mixup_alpha: MixUp's Beta(alpha, alpha) parameter for training batches; 0 is off.
        cutmix_alpha: CutMix's Beta(alpha, alpha) parameter; 0 is off. With both on, each batch
            uses one of the two at random. Accuracy is still measured on the integer labels.
        channels_last: Keep weights and inputs in channels-last memory format, which oneDNN
            and cuDNN convolutions run faster in (``configs/default.yaml`` turns it on).
        temperature: Prediction reports ``softmax(logits / temperature)``. 1 is the raw model;
            ``TemperatureScaling`` sets the one fitted on each validation epoch, so every
            checkpoint saved from those weights carries it, and loading a checkpoint adopts it.
    """

    def __init__(
        self,
        num_classes: int = 2,
        class_names: Sequence[str] | None = None,
        in_channels: int = 3,
        arch: Arch = "tutorial",
        weights: str | None = None,
        dropout: float = 0.5,
        hidden_features: int = ALEXNET_WIDTH,
        optimizer: OptimizerCallable = tutorial_adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        preprocessing: dict[str, Any] | None = None,
        class_weights: Sequence[float] | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] | None = None,
        no_decay_bias: bool = False,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        channels_last: bool = False,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise DataConfigError(
                f"model.num_classes must be at least 2, got {num_classes}; a classifier needs "
                "two classes or more (the CLI links it from the data's class folders)."
            )
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"model.dropout must be at least 0 and below 1, got {dropout}.")
        if not 0.0 <= label_smoothing <= 1.0:
            raise UserError(f"model.label_smoothing must be from 0 to 1, got {label_smoothing}.")
        if class_names is not None and len(class_names) != num_classes:
            raise UserError(
                f"model.class_names has {len(class_names)} names but model.num_classes is "
                f"{num_classes}; pass one name per class."
            )
        if class_names is None:
            class_names = [str(i) for i in range(num_classes)]
        if preprocessing is None:
            preprocessing = preprocessing_record(in_channels=in_channels)
        self.save_hyperparameters(
            {
                "num_classes": num_classes,
                "class_names": list(class_names),
                "in_channels": in_channels,
                "arch": arch,
                "weights": None if weights is None else str(weights),
                "dropout": dropout,
                "hidden_features": hidden_features,
                "preprocessing": dict(preprocessing),
                "class_weights": None if class_weights is None else list(class_weights),
                "lr_scheduler_interval": lr_scheduler_interval,
                "no_decay_bias": no_decay_bias,
                "label_smoothing": label_smoothing,
                "mixup_alpha": mixup_alpha,
                "cutmix_alpha": cutmix_alpha,
                "channels_last": channels_last,
                "temperature": float(temperature),
            }
        )
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.model = build_alexnet(
            arch,
            num_classes,
            in_channels=in_channels,
            dropout=dropout,
            hidden_features=hidden_features,
        )
        self._start_weights_loaded = False  # see load_start_weights
        if class_weights is not None and len(class_weights) != num_classes:
            raise UserError(
                f"model.class_weights has {len(class_weights)} values but model.num_classes is "
                f"{num_classes}; pass one weight per class."
            )
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float)
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        # MixUp/CutMix of training batches: soft targets for the loss, None when both are off.
        self.batch_mix = batch_mix(num_classes, mixup_alpha, cutmix_alpha)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        # One metric set per stage, so their states never mix.
        self.train_metrics = self._stage_metrics(num_classes)
        self.val_metrics = self._stage_metrics(num_classes, macro=True)
        self.test_metrics = self._stage_metrics(num_classes, macro=True)
        self.val_acc_best = MaxMetric()
        self.eval_loss = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        # Each evaluation epoch's logits, collected once for every callback that reads them.
        self.eval_outputs = nn.ModuleDict(
            {stage: EpochOutputs(num_classes) for stage in ("val", "test")}
        )

    @staticmethod
    def _stage_metrics(num_classes: int, macro: bool = False) -> nn.ModuleDict:
        metrics = {"acc": MulticlassAccuracy(num_classes, average="micro")}
        if num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        if macro:  # macro averages weigh every class equally, whatever its size
            metrics["precision_macro"] = MulticlassPrecision(num_classes, average="macro")
            metrics["recall_macro"] = MulticlassRecall(num_classes, average="macro")
            metrics["f1_macro"] = MulticlassF1Score(num_classes, average="macro")
        return nn.ModuleDict(metrics)

    @property
    def backbone(self) -> nn.Module:
        """The convolutions, which fine-tuning (``BackboneFinetuning``) freezes, then thaws."""
        return self.model.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=self.memory_format))

    def on_fit_start(self) -> None:
        self.load_start_weights()

    def load_start_weights(self) -> None:
        """Load ``model.weights`` into the network once, when a new fit starts.

        Not in ``__init__``: ``load_from_checkpoint`` and a resumed fit (restored before
        ``on_fit_start``) must not read the starting weights again. The finders, which train in
        their own ``on_fit_start`` before this module's, call it first so that they search from
        the weights the fit starts from.
        """
        if self._start_weights_loaded or not self.hparams.weights or self.trainer.ckpt_path:
            return
        self._start_weights_loaded = True
        rank_zero_info(load_weights(self.model, self.hparams.weights, self.hparams.arch))

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str
    ) -> dict[str, torch.Tensor]:
        images, targets = batch
        if len(targets) == 0:
            # Every image of the batch was unreadable. A zero loss through the model still
            # gives every parameter a gradient, so DDP ranks stay in step.
            logits = self(images)
            return {"loss": logits.sum() * 0.0, "logits": logits.detach()}
        loss_targets = targets
        if stage == "train" and self.batch_mix is not None:
            images, loss_targets = self.batch_mix(images, targets)  # targets stay integers
        logits = self(images)
        loss = self.loss_fn(logits, loss_targets)
        if stage == "train":
            # No sync per step: under DDP the epoch value is rank 0's, and the per-step value
            # stays out of the progress bar, which would read it back to the host every step.
            self.log("train/loss", loss, on_step=True, on_epoch=True)
        else:
            # A torchmetrics mean syncs its sums once per epoch, so it is exact under DDP with
            # unequal shards (Lightning's sync_dist mean truncates the averaged sample count).
            self.eval_loss[stage].update(loss, weight=len(targets))
            self.eval_outputs[stage].update(logits, targets)
            self.log(f"{stage}/loss", self.eval_loss[stage], on_epoch=True, prog_bar=True)
        for name, metric in getattr(self, f"{stage}_metrics").items():
            metric(logits, targets)
            self.log(
                f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "acc"
            )
        # The logits go to callbacks (confusion matrix, misclassified images) via the outputs.
        return {"loss": loss, "logits": logits.detach()}

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "train")

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self.eval_outputs["val"].reset()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # the sanity check's few batches are not an epoch
            return
        self._log_calibration("val")
        self.val_acc_best(self.val_metrics["acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute())

    def test_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "test")

    def on_test_epoch_start(self) -> None:
        self.eval_outputs["test"].reset()

    def on_test_epoch_end(self) -> None:
        self._log_calibration("test")

    def _log_calibration(self, stage: str) -> None:
        # The first compute() of an epoch gathers from every process (a collective): it is made
        # in an *_epoch_end hook, which every process runs (here, or earlier in a callback's).
        outputs = self.eval_outputs[stage].compute()
        if len(outputs.targets):  # the same value on every process: no sync needed
            self.log(f"{stage}/ece", expected_calibration_error(outputs.logits, outputs.targets))

    def predict_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> dict:
        images = batch[0]  # (images, targets) or the DataModule's LoadedBatch
        logits = self(images)
        probs = (logits.float() / self.hparams.temperature).softmax(dim=1)  # calibrated
        confidence, predicted = probs.max(dim=1)
        return {"probs": probs, "predicted": predicted, "confidence": confidence, "logits": logits}

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: torch.optim.Optimizer,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Free the gradients once applied, as the tutorial's loop does before each forward pass;
        # Lightning zeroes them only after the next forward pass, which then runs beside 187 MB
        # of stale gradients. While accumulating, Lightning calls this hook only on the batches
        # that step, so accumulated gradients are kept; a strategy that accumulates by itself
        # (DeepSpeed) calls it on every batch, and there the gradients are left to it.
        if not self.trainer.strategy.handles_gradient_accumulation:
            self.optimizer_zero_grad(epoch, batch_idx, optimizer)

    def _checkpoint_path(self) -> str | None:
        try:
            return self.trainer.ckpt_path
        except RuntimeError:  # not attached to a trainer: load_from_checkpoint
            return None

    def _resuming_fit(self) -> bool:
        try:
            return self.trainer.state.fn == "fit"
        except RuntimeError:  # not attached to a trainer: load_from_checkpoint
            return False

    def configure_optimizers(self) -> Any:
        optimizer = self._build_optimizer()
        if self.lr_scheduler is None:
            return optimizer
        kwargs = {}
        if _total_steps_unset(self.lr_scheduler):
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        with _settings_of("model.lr_scheduler"):
            scheduler = self.lr_scheduler(optimizer, **kwargs)
        interval = self.hparams.lr_scheduler_interval or scheduler_interval(scheduler)
        config = {"scheduler": scheduler, "interval": interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if scheduler.mode != "max":
                raise UserError(
                    "model.lr_scheduler: ReduceLROnPlateau watches val/acc, where higher is "
                    "better; set its init_args.mode to max."
                )
            config["monitor"] = "val/acc"
            if interval == "epoch":
                # Stepped when val/acc is new: with check_val_every_n_epoch=N, after every Nth
                # epoch, as Lightning validates (it steps when (epoch + 1) % frequency == 0).
                config["frequency"] = self.trainer.check_val_every_n_epoch or 1
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """``model.optimizer`` over the trainable parameters; frozen ones (fine-tuning's
        backbone) get no optimizer state until they thaw."""
        groups = self._param_groups()
        with _settings_of("model.optimizer"):
            return self.optimizer(groups)

    def _param_groups(self) -> Iterable:
        params = [p for p in self.parameters() if p.requires_grad]
        if not self.hparams.no_decay_bias:
            return params
        # Biases and other 1-d tensors (norm scales) are offsets, not weights to shrink.
        return [
            {"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]

    def _check_resumed_training(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one line, a resume whose optimizer or schedule is not the checkpoint's:
        torch would fail deep in ``load_state_dict`` (or quietly mix two optimizers' states)."""
        saved = checkpoint.get("optimizer_states") or []
        if not saved:
            return  # weights only: refused before loading (AlexNetCLI), or Lightning's to say
        fresh = self._build_optimizer()
        # An optimizer's own settings name its kind (Adam: betas, eps; SGD: momentum, ...): each
        # saved group must have this one's. Schedulers add keys of their own (initial_lr,
        # OneCycleLR's max_lr, SWALR's swa_lr), and the implementation flags vary with the torch
        # version that saved the file (torch fills in missing ones).
        kind = set(fresh.defaults) - set(_OPTIMIZER_FLAGS)
        saved_groups = [group for state in saved for group in state.get("param_groups", [])]
        callbacks = self.trainer.callbacks
        # Fine-tuning adds the thawed backbone's group itself when it resumes; SWA adds its
        # own schedule.
        finetuning = any(isinstance(c, BaseFinetuning) for c in callbacks)
        averaging = any(isinstance(c, StochasticWeightAveraging) for c in callbacks)
        schedules = bool(checkpoint.get("lr_schedulers"))
        mismatch = None
        if len(saved) > 1 or any(kind - set(group) for group in saved_groups):
            mismatch = f"another optimizer than this config's {type(fresh).__name__}"
        elif not finetuning and len(saved_groups) != len(fresh.param_groups):
            mismatch = f"{len(saved_groups)} parameter group(s), not {len(fresh.param_groups)}"
            mismatch += " (model.no_decay_bias)"
        elif not averaging and schedules != (self.lr_scheduler is not None):
            mismatch = "a learning-rate schedule" if schedules else "no learning-rate schedule"
        if mismatch is not None:
            raise CheckpointError(
                f"--ckpt_path '{self._checkpoint_path()}' was saved by a fit with {mismatch}, "
                "so its training state cannot go on here; resume with the run's config.yaml "
                "(--config), or start a new fit from its weights with --model.weights."
            )

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        weights_only: bool = True,
        **kwargs: Any,
    ) -> "LitAlexNet":
        """Load a checkpoint as data only (``weights_only=True``): no code in it ever runs.

        Raises:
            CheckpointError: The file holds objects that could run code when unpickled.
        """
        try:
            return super().load_from_checkpoint(
                checkpoint_path, map_location=map_location, weights_only=weights_only, **kwargs
            )
        except pickle.UnpicklingError as err:
            raise CheckpointError(unsafe_checkpoint_message(checkpoint_path)) from err

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another network shape, or trained on other classes or
        preprocessing than this data's, and adopt the temperature fitted for it."""
        trained = checkpoint.get("hyper_parameters", {})
        # The network's shape; older checkpoints lack the keys and hold the tutorial's AlexNet.
        for key, default in (("arch", "tutorial"), ("hidden_features", ALEXNET_WIDTH)):
            value, here = trained.get(key, default), self.hparams[key]
            if value != here:
                raise CheckpointError(
                    f"--ckpt_path '{self._checkpoint_path()}' was trained with model.{key} "
                    f"{value} but model.{key} is {here}; pass the run's config.yaml with "
                    f"--config (or --model.{key} {value})."
                )
        if "temperature" in trained:
            self.hparams["temperature"] = float(trained["temperature"])
        if self._resuming_fit():
            self._check_resumed_training(checkpoint)
            # val/acc_best goes on from the best the checkpoint's ModelCheckpoint kept, as the
            # tracker's own state is not saved (a new state key would break older checkpoints).
            for key, state in checkpoint.get("callbacks", {}).items():
                if not key.startswith("ModelCheckpoint") or not isinstance(state, dict):
                    continue
                best = state.get("best_model_score")
                if state.get("monitor") == "val/acc" and best is not None:
                    self.val_acc_best.update(torch.as_tensor(float(best)))
        for key, what in (("class_names", "class names"), ("preprocessing", "preprocessing")):
            value, here = trained.get(key), self.hparams[key]
            if value is not None and value != here:
                raise CheckpointError(
                    f"--ckpt_path '{self._checkpoint_path()}' was trained with {what} {value} "
                    f"but the data gives {here}; pass the run's config.yaml with --config (or "
                    "the matching --data.* options)."
                )


def batch_mix(
    num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0
) -> Callable | None:
    """MixUp and/or CutMix for a batch of ``(images, integer labels)``; None when both are 0.

    The returned transform maps ``(images [B,C,H,W], labels [B])`` to mixed images and soft
    labels ``[B, num_classes]``; with both alphas set, each batch gets one of the two at random.
    """
    mixes = []
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


@contextlib.contextmanager
def _settings_of(key: str) -> Iterator[None]:
    """torch's optimizers and schedulers check their arguments (``Invalid learning rate: -1.0``)
    when built, in the fit: a ValueError there is the config's ``key``, said in one line."""
    try:
        yield
    except UserError:
        raise  # the project's own schedules say theirs already
    except ValueError as err:
        raise UserError(f"{key}: {first_line(err)}; fix its init_args.") from err


def _total_steps_unset(factory: Callable) -> bool:
    """Whether a scheduler factory takes ``total_steps`` and was not given one (nor OneCycleLR's
    other way to say it, ``epochs`` and ``steps_per_epoch``)."""
    keywords = getattr(factory, "keywords", None)  # jsonargparse passes every init arg by name
    if keywords and "total_steps" in keywords:
        per_epoch = (keywords.get("epochs"), keywords.get("steps_per_epoch"))
        return keywords["total_steps"] is None and None in per_epoch
    try:
        parameter = inspect.signature(factory).parameters.get("total_steps")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is None


def scheduler_interval(scheduler: object) -> str:
    """``"step"`` for schedules defined per optimizer step, else ``"epoch"``."""
    if getattr(scheduler, "interval", None) == "step" or isinstance(scheduler, PER_STEP_SCHEDULERS):
        return "step"
    return "epoch"
