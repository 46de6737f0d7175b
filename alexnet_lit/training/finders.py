"""Lightning's learning-rate and batch-size finders as callbacks that write into the run folder."""

import json
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.trainer.states import TrainerFn

from alexnet_lit.evaluation.pictures import close_and_save
from alexnet_lit.module import LitAlexNet
from alexnet_lit.runs import run_dir


def _stop(trainer: L.Trainer) -> None:
    """End the fit before its first epoch: the finder's result is what the run was for."""
    trainer.should_stop = True


def _start_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    # A finder trains in its on_fit_start, which Lightning runs before the module's: load
    # model.weights now, or it would search from random weights. (Only a fit starts from them.)
    if trainer.state.fn == TrainerFn.FITTING and isinstance(pl_module, LitAlexNet):
        pl_module.load_start_weights()


class LRFinder(LearningRateFinder):
    """Lightning's LR range test; writes ``lr_find.json`` and ``lr_find.png`` to the run folder.

    The model's learning rate lives in ``model.optimizer``, so the suggestion is reported, not
    applied: put it into the config and train again.

    Args:
        min_lr: Smallest learning rate tried.
        max_lr: Largest learning rate tried.
        num_training_steps: Steps of the range test.
        mode: ``"exponential"`` or ``"linear"`` growth of the learning rate.
        early_stop_threshold: Stop once the loss exceeds this multiple of the best loss; None
            runs all steps.
        stop: End the run after the test (the usual use); False trains on afterwards.
    """

    def __init__(
        self,
        min_lr: float = 1e-8,
        max_lr: float = 1.0,
        num_training_steps: int = 100,
        mode: str = "exponential",
        early_stop_threshold: float | None = 4.0,
        stop: bool = True,
    ) -> None:
        super().__init__(
            min_lr, max_lr, num_training_steps, mode, early_stop_threshold, update_attr=False
        )
        self.stop = stop

    def lr_find(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _start_weights(trainer, pl_module)
        super().lr_find(trainer, pl_module)
        finder = self.optimal_lr
        if finder is None:  # skipped, e.g. under fast_dev_run
            return
        folder = run_dir(trainer)
        if trainer.is_global_zero:  # one writer
            folder.mkdir(parents=True, exist_ok=True)
            suggestion = finder.suggestion()
            result = {"suggested_lr": suggestion, "lr": finder.results["lr"]}
            result["loss"] = finder.results["loss"]
            (folder / "lr_find.json").write_text(json.dumps(result, indent=2) + "\n")
            self._plot(finder, folder / "lr_find.png")
            print(f"LR finder: suggested learning rate {suggestion}; plot and data in {folder}")
        if self.stop:
            _stop(trainer)

    @staticmethod
    def _plot(finder, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        figure = finder.plot(suggest=finder.suggestion() is not None)
        axes = figure.axes[0]
        axes.set_title("LR range test (loss vs learning rate)")
        losses = [loss for loss in finder.results["loss"] if math.isfinite(loss)]
        if losses and max(losses) > 2 * losses[0]:  # keep a divergent tail from flattening it
            axes.set_ylim(min(losses) * 0.95, 2 * losses[0])
        close_and_save(figure, path, dpi=100)


class BatchSizeSearch(BatchSizeFinder):
    """Lightning's batch-size finder; writes ``batch_size.json`` to the run folder.

    It grows ``data.batch_size`` until memory runs out (or the batch covers the training set)
    and then trains on with the largest size that fit, unless ``stop`` is set.

    Args:
        mode: ``"power"`` doubles the size; ``"binsearch"`` then narrows it down.
        steps_per_trial: Training steps tried at each size.
        init_val: The first batch size tried.
        max_trials: At most this many sizes are tried.
        stop: End the run after the search.
    """

    def __init__(
        self,
        mode: str = "power",
        steps_per_trial: int = 3,
        init_val: int = 2,
        max_trials: int = 25,
        stop: bool = False,
    ) -> None:
        super().__init__(mode, steps_per_trial, init_val, max_trials, batch_arg_name="batch_size")
        self.mode = mode
        self.stop = stop

    def scale_batch_size(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _start_weights(trainer, pl_module)
        super().scale_batch_size(trainer, pl_module)
        if self.optimal_batch_size is None:
            return
        folder = run_dir(trainer)
        if trainer.is_global_zero:  # one writer
            folder.mkdir(parents=True, exist_ok=True)
            result = {"batch_size": self.optimal_batch_size, "mode": self.mode}
            (folder / "batch_size.json").write_text(json.dumps(result, indent=2) + "\n")
            print(f"Batch-size finder: batch size {self.optimal_batch_size}; written to {folder}")
        if self.stop:
            _stop(trainer)
