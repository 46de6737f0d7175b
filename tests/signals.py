"""A test-only callback that signals its own process at a chosen training step."""

import os
import signal

import lightning as L


class SignalAtStep(L.Callback):
    """Send ``signal_name`` (e.g. SIGKILL, SIGTERM) to this process before training step ``step``.

    Args:
        step: The global step (0-based) at whose start the signal is sent.
        signal_name: A name from the ``signal`` module.
    """

    def __init__(self, step: int, signal_name: str = "SIGKILL") -> None:
        self.step = step
        self.signal_name = signal_name

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))
