"""Where a fit's wall time goes, for the benchmark: wall-clock marks at the edges of the loops.

``PhaseTimer(report=FILE)`` (added to a fit with ``--trainer.callbacks+=phases.PhaseTimer``)
writes, at the end of training, the Unix times of the first training step and of each epoch's
start, its last training step's end, and its validation batches (first to last), and the end of
training. :func:`summarize_phases` turns such marks, with the process's start and exit, into
start-up, time outside the loops per epoch and end to exit. ``tutorial_loop.py`` and the
benchmark's plain loop write the same marks.
"""

import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L


class PhaseTimer(L.Callback):
    """Record the loop edges of a fit (rank 0) and write them to ``report`` as JSON."""

    def __init__(self, report: str) -> None:
        self.report = report
        self.marks: dict[str, Any] = {"first_step": None, "epochs": []}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = {"start": time.time(), "train_end": None, "val_start": None, "val_end": None}
        self.marks["epochs"].append(epoch)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.marks["first_step"] is None:
            self.marks["first_step"] = time.time()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.marks["epochs"][-1]["train_end"] = time.time()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self.marks["epochs"]:
            self.marks["epochs"][-1]["val_start"] = time.time()

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.sanity_checking and self.marks["epochs"]:
            self.marks["epochs"][-1]["val_end"] = time.time()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks["train_end"] = time.time()
        if trainer.is_global_zero:
            Path(self.report).write_text(json.dumps(self.marks))


def summarize_phases(launched: float, exited: float, marks: dict[str, Any]) -> dict[str, Any]:
    """Seconds: ``startup`` (process start to the first training step), ``outside`` (per epoch:
    from its last training step to the next epoch's start, or to the end of training, less its
    validation batches), ``outside_later`` (their median over the epochs after the first) and
    ``exit`` (end of training to the process's exit)."""
    epochs = marks["epochs"]
    ends = [epoch["start"] for epoch in epochs[1:]] + [marks["train_end"]]
    outside = []
    for epoch, end in zip(epochs, ends, strict=True):
        validation = (epoch["val_end"] - epoch["val_start"]) if epoch["val_start"] else 0.0
        outside.append(end - epoch["train_end"] - validation)
    return {
        "startup_s": marks["first_step"] - launched,
        "outside_s": outside,
        "outside_later_s": statistics.median(outside[1:] or outside),
        "exit_s": exited - marks["train_end"],
    }
