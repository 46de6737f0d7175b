"""A test-only callback that signals its own process at a chosen training step."""

import os
import signal

import lightning as L

from alexnet_lit.checkpoints import BackgroundCheckpointIO


class SignalAtStep(L.Callback):
    """Send ``signal_name`` (e.g. SIGKILL, SIGTERM, SIGINT) to this process at training step
    ``step``: at the batch's start, or, with ``during_update``, just before the optimizer updates
    the weights.

    Args:
        step: The global step (0-based) at which the signal is sent.
        signal_name: A name from the ``signal`` module.
        during_update: Send it from ``on_before_optimizer_step`` instead of the batch's start.
    """

    def __init__(
        self, step: int, signal_name: str = "SIGKILL", during_update: bool = False
    ) -> None:
        self.step = step
        self.signal_name = signal_name
        self.during_update = during_update

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if not self.during_update:
            self._send(trainer)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        if self.during_update:
            self._send(trainer)

    def _send(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self.step:
            # The checkpoints asked for so far on disk first, as a save on the training thread
            # leaves them (BackgroundCheckpointIO finishes them while the next epoch trains).
            if isinstance(trainer.strategy.checkpoint_io, BackgroundCheckpointIO):
                trainer.strategy.checkpoint_io.wait()
            os.kill(os.getpid(), getattr(signal, self.signal_name))


def kill_at(step: int, signal_name: str, during_update: bool = False) -> list[str]:
    """CLI arguments that add :class:`SignalAtStep` to a fit."""
    return [
        "--trainer.callbacks+=tests.signals.SignalAtStep",
        f"--trainer.callbacks.step={step}",
        f"--trainer.callbacks.signal_name={signal_name}",
        f"--trainer.callbacks.during_update={during_update}",
    ]


class SignalAtTrainEnd(L.Callback):
    """Send ``signal_name`` to this process when training ends: after the fit's last look for
    a SIGTERM, before its teardown."""

    def __init__(self, signal_name: str = "SIGTERM") -> None:
        self.signal_name = signal_name

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        os.kill(os.getpid(), getattr(signal, self.signal_name))
