"""Do the confidences mean anything? Expected calibration error, reliability diagrams, and one
temperature fitted after training (temperature scaling, Guo et al. 2017).

A model is calibrated when, among the images it gives 80% confidence, 80% are right. The
expected calibration error (ECE) is torchmetrics' ``MulticlassCalibrationError`` with 15 bins:
the gap between confidence and accuracy, averaged over the bins by their share of images.
Temperature scaling divides the logits by one scalar ``T`` fitted on the validation set (L-BFGS on
the negative log-likelihood): the predicted class never changes, only how sure the model says
it is.
"""

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.functional.classification import multiclass_calibration_error

from alexnet_lit.checkpoints import AtomicCheckpointIO, load_checkpoint

BINS = 15


def expected_calibration_error(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> float:
    """ECE (15 bins, L1) of ``softmax(logits / temperature)`` against integer ``targets``."""
    if len(targets) == 0:
        return float("nan")
    probs = (logits.float() / temperature).softmax(dim=1)
    ece = multiclass_calibration_error(probs, targets, logits.shape[1], n_bins=BINS, norm="l1")
    return float(ece)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The ``T > 0`` minimizing the cross-entropy of ``logits / T`` (L-BFGS on ``log T``)."""
    logits, targets = logits.detach().float().cpu(), targets.detach().cpu()
    if len(targets) == 0:
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return temperature if np.isfinite(temperature) else 1.0


def reliability_bins(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, bins: int = BINS
) -> list[dict[str, float]]:
    """Per confidence bin: its range, mean confidence, accuracy and number of images."""
    probs = (logits.float() / temperature).softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    rows = []
    for low, high in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        inside = (confidence > low) & (confidence <= high)
        count = int(inside.sum())
        rows.append(
            {
                "low": low,
                "high": high,
                "confidence": float(confidence[inside].mean()) if count else float("nan"),
                "accuracy": float(correct[inside].mean()) if count else float("nan"),
                "count": count,
            }
        )
    return rows


def render_reliability(
    logits: torch.Tensor,
    targets: torch.Tensor,
    path: str | Path,
    temperature: float = 1.0,
    title: str = "Reliability",
) -> Path:
    """Write a reliability diagram: accuracy against confidence per bin, raw and (when
    ``temperature`` is not 1) after temperature scaling, with each curve's ECE."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.8, 4.8), dpi=100)
    axes.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="calibrated")
    curves = [("raw", 1.0, "#1f77b4")]
    if abs(temperature - 1.0) > 1e-6:
        curves.append((f"T = {temperature:.2f}", temperature, "#d62728"))
    for label, t, color in curves:
        rows = [row for row in reliability_bins(logits, targets, t) if row["count"]]
        ece = expected_calibration_error(logits, targets, t)
        axes.plot(
            [row["confidence"] for row in rows],
            [row["accuracy"] for row in rows],
            marker="o",
            color=color,
            label=f"{label} (ECE {ece:.3f})",
        )
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{title} ({len(targets)} images, {BINS} bins)")
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def gather_uneven(trainer: L.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (dim 0 may differ by rank) from every process, on every process."""
    if trainer.world_size == 1:
        return tensor
    size = torch.tensor([len(tensor)], device=tensor.device)
    sizes = trainer.strategy.all_gather(size).view(-1).tolist()
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    gathered = trainer.strategy.all_gather(padded)  # [world, max, ...]
    return torch.cat([gathered[rank, :n] for rank, n in enumerate(sizes)])


class EpochLogits:
    """One evaluation epoch's logits ``[N, num_classes]`` and targets ``[N]``: collected per batch
    on this process, then gathered from every process."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if len(targets):  # empty when every image of the batch was unreadable
            self._logits.append(logits.detach().float())
            self._targets.append(targets)

    def gather(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every process's logits and targets, on the CPU; a collective: call it on every rank."""
        device, width = pl_module.device, pl_module.hparams.num_classes
        logits = torch.cat(self._logits) if self._logits else torch.empty(0, width)
        targets = torch.cat(self._targets) if self._targets else torch.empty(0)
        self.reset()
        return (
            gather_uneven(trainer, logits.to(device)).cpu(),
            gather_uneven(trainer, targets.long().to(device)).cpu(),
        )


class TemperatureScaling(L.Callback):
    """Fit one temperature on each validation epoch's logits and store it in the checkpoints
    written from those weights (hyperparameter ``temperature``): the best checkpoint (by
    ``val/acc``) carries the one fitted on its epoch, ``last.ckpt`` the latest epoch's, so
    prediction reports calibrated probabilities. Nothing is rewritten after the fit.

    The logits come from the fit's own validation epochs (no extra pass), gathered from every
    process, so every rank fits the same temperature. A checkpoint saved between validations
    (mid-epoch, on SIGTERM) keeps the temperature the model already had. ``save_weights_only``
    checkpoints skip callbacks' ``on_save_checkpoint``; those files are given their temperature
    when the fit ends.

    Args:
        monitor: The metric the best checkpoint is chosen by (higher is better).
    """

    def __init__(self, monitor: str = "val/acc") -> None:
        self.monitor = monitor
        self._epoch = EpochLogits()
        # The latest validation's fit, and the best epoch's: step, temperature, ECE before/after.
        self._latest: dict[str, float] | None = None
        self._best: dict[str, float] | None = None
        self._best_score = -float("inf")
        self.temperatures: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        # Saved in every full checkpoint, so a resumed fit still knows the best epoch's fit.
        return {"best_score": self._best_score, "best": self._best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._best_score = float(state_dict.get("best_score", -float("inf")))
        self._best = state_dict.get("best")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch.reset()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx=0
    ) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._epoch.update(outputs["logits"], batch[1])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        logits, targets = self._epoch.gather(trainer, pl_module)
        if len(targets) == 0:
            return
        temperature = fit_temperature(logits, targets)
        self._latest = {
            "step": trainer.global_step,
            "temperature": temperature,
            "before": expected_calibration_error(logits, targets),
            "after": expected_calibration_error(logits, targets, temperature),
        }
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None and float(score) > self._best_score:  # as ModelCheckpoint(mode=max)
            self._best_score, self._best = float(score), self._latest

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # ModelCheckpoint saves after the validation (on_validation_end): the same weights.
        if self._latest is not None and self._latest["step"] == trainer.global_step:
            hparams = checkpoint.setdefault("hyper_parameters", {})
            hparams["temperature"] = self._latest["temperature"]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._latest is None:
            return
        best = self._best or self._latest
        self.temperatures = {"best": best["temperature"], "last": self._latest["temperature"]}
        pl_module.temperature = self.temperatures["last"]  # the weights in memory are the last
        pl_module.hparams["temperature"] = self.temperatures["last"]
        if not trainer.is_global_zero:
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_weights_only:
                path = callback.best_model_path  # with no monitor: the latest file it wrote
                name = "last" if callback.monitor is None else "best"
                if path and Path(path).is_file():
                    set_temperature(path, self.temperatures[name])
        rank_zero_info(
            f"temperature scaling: T = {self.temperatures['best']:.3f} (best epoch), "
            f"{self.temperatures['last']:.3f} (last); val ECE {best['before']:.4f} -> "
            f"{best['after']:.4f}, stored in the checkpoints' hyperparameters."
        )


def set_temperature(path: str | Path, temperature: float) -> None:
    """Store ``temperature`` in a checkpoint's hyperparameters (atomically rewritten)."""
    checkpoint = load_checkpoint(path)
    checkpoint.setdefault("hyper_parameters", {})["temperature"] = float(temperature)
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
