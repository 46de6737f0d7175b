"""Surviving crashes: exact resume (the random generators), NaN stops, and saves on SIGTERM
and Ctrl-C.

Atomic, data-only checkpoint files are :class:`alexnet_lit.checkpoints.AtomicCheckpointIO`.
"""

import math
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from alexnet_lit.checkpoints import BackgroundCheckpointIO, SaveInterrupted
from alexnet_lit.errors import UserError, first_line
from alexnet_lit.runs import run_dir

_NONE = torch.iinfo(torch.long).max


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


class RNGStateCheckpoint(L.Callback):
    """Store the random generators in checkpoints, so a resumed run continues the same stream.

    Lightning restores weights, optimizer, scheduler and loop counters but not the RNGs: after a
    resume, ``seed_everything`` would replay the first epoch's shuffling and dropout masks. The
    states are set as soon as the checkpoint is restored, before the training loader draws its
    shuffling seed (Lightning runs the sanity check with isolated RNGs), so a run resumed from an
    epoch-end checkpoint computes exactly what the uninterrupted run would have. With several
    processes the checkpoint holds rank 0's states.
    """

    def state_dict(self) -> dict[str, Any]:
        version, numbers, gauss = random.getstate()
        name, keys, position, has_gauss, cached = np.random.get_state()
        state = {
            "python": [version, list(numbers), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, numbers, gauss = state["python"]
        random.setstate((version, tuple(numbers), gauss))
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class StopOnNonFiniteLoss(L.Callback):
    """Stop when the training loss becomes NaN or infinite, before any checkpoint is written.

    The check stays on the device: each step updates a small tensor holding the first bad step,
    and the host reads it (one sync) only every ``check_every_n_steps`` steps, before validation
    and before every checkpoint save. A checkpoint is never written from broken weights, so the
    best and last checkpoints keep the last good state.

    Args:
        check_every_n_steps: Steps between host-side checks; 1 checks every step.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        if check_every_n_steps < 1:
            raise UserError(f"check_every_n_steps must be at least 1, got {check_every_n_steps}.")
        self.check_every_n_steps = check_every_n_steps
        # [global_step, epoch, batch_idx] of the first bad step; _NONE while there is none.
        self._first_bad: torch.Tensor | None = None
        self._step = 0
        self._verified_step: int | None = None  # global step whose weights were found finite

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step  # the step this batch's loss belongs to

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        device = loss.device
        if self._first_bad is None or self._first_bad.device != device:
            self._first_bad = torch.full((3,), _NONE, dtype=torch.long, device=device)
        here = torch.tensor([self._step, trainer.current_epoch, batch_idx])
        first_time = (~torch.isfinite(loss.detach())) & (self._first_bad[0] == _NONE)
        here = here.to(device, non_blocking=True)
        self._first_bad = torch.where(first_time, here, self._first_bad)
        if trainer.global_step % self.check_every_n_steps == 0:
            self._check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)
        self._check_weights(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the ModelCheckpoints' own on_validation_end (Lightning runs them last): a
        # weights-only save calls no callback's on_save_checkpoint.
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._check_weights(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._check(trainer)
        self._check_weights(trainer, pl_module)

    def _check_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._verified_step == trainer.global_step:
            return  # the weights have not changed since the last save checked them
        # The largest magnitude of each tensor: NaN and infinity propagate, finite values cannot
        # overflow, and no full-size boolean copy of the weights is made (2x faster than isfinite).
        largest = [
            torch.linalg.vector_norm(p.detach(), ord=math.inf)
            for p in pl_module.parameters()
            if p.numel()  # the inf-norm of an empty tensor is undefined
        ]
        finite = torch.stack(largest).isfinite().all()
        if not bool(trainer.strategy.reduce_boolean_decision(bool(finite), all=True)):
            raise NonFiniteLossError(
                f"the weights hold NaN or infinite values at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); no checkpoint was written, the previous ones "
                "are kept: lower the learning rate (model.optimizer.init_args.lr) or check the "
                "data."
            )
        self._verified_step = trainer.global_step

    def _check(self, trainer: L.Trainer) -> None:
        if self._first_bad is None:
            return
        # Across processes the earliest bad step wins (a min over ranks).
        first = trainer.strategy.reduce(self._first_bad.clone(), reduce_op="min")
        step, epoch, batch_idx = (int(v) for v in first.tolist())
        if step == _NONE:
            return
        raise NonFiniteLossError(
            f"the training loss became NaN or infinite at global step {step} (epoch {epoch}, "
            f"batch {batch_idx}); training stopped and no checkpoint was written from the broken "
            "weights: lower the learning rate (model.optimizer.init_args.lr) or check the data."
        )


class CheckpointOnInterrupt(L.Callback):
    """On SIGTERM (preemption, ``scancel``, ``kill``) or Ctrl-C, save ``last.ckpt`` and say how
    to resume.

    Lightning turns SIGTERM into a clean stop after the current batch (on every rank); this
    callback then writes the checkpoint where ``--ckpt_path last`` finds it, and the process exits
    with status 0. Ctrl-C raises KeyboardInterrupt wherever the process is; Lightning hands it to
    :meth:`on_exception` and exits (the CLI with status 130). A Ctrl-C that comes while the
    optimizer updates the weights is held until that batch ends, so the checkpoint never holds half
    an update. Ctrl-C saves nothing when no training step was taken since the run started, when
    it stopped the writing of a checkpoint (the user wants the process to end, and the earlier
    checkpoints are intact), or under several processes (they stop at different points, and a
    save waits for all of them: stop those runs with SIGTERM).
    """

    def __init__(self) -> None:
        self._first_step: int | None = None  # the global step this run's training started at
        self._updating = False  # between the optimizer step's start and the batch's end
        self._held = False  # a Ctrl-C came while _updating
        self._previous_handler = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step, self._updating, self._held = trainer.global_step, False, False
        # Only Python's own Ctrl-C handling is replaced; signals can be set in the main thread only.
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._updating = True

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._updating = False
        if self._held:
            self._held = False
            raise KeyboardInterrupt

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handler()
        if trainer.state.fn != "fit":
            return
        if isinstance(exception, SIGTERMException):
            self._save(trainer, "SIGTERM")
        elif isinstance(exception, KeyboardInterrupt) and not isinstance(
            exception, SaveInterrupted
        ):
            if trainer.world_size > 1:
                rank_zero_info(
                    f"Stopped by Ctrl-C; nothing was saved, as {trainer.world_size} processes "
                    "stop at different points. Resume from the last epoch's checkpoint with "
                    "--ckpt_path last; to save on the way out, stop with SIGTERM (kill PID)."
                )
            elif self._first_step is not None and trainer.global_step > self._first_step:
                self._save(trainer, "Ctrl-C")

    def _save(self, trainer: L.Trainer, cause: str) -> None:
        path = last_checkpoint_path(trainer)
        try:
            trainer.save_checkpoint(path, weights_only=False)  # full state, to resume from
            if isinstance(trainer.strategy.checkpoint_io, BackgroundCheckpointIO):
                trainer.strategy.checkpoint_io.wait()  # on disk before the process says so
        except Exception as err:  # a full disk: said, not raised over the stop itself
            rank_zero_warn(f"Stopped by {cause}; '{path}' was not saved: {first_line(err)}")
            return
        rank_zero_info(
            f"Stopped by {cause} at epoch {trainer.current_epoch}, global step "
            f"{trainer.global_step}; saved '{path}'. To resume, run the same fit command with "
            f"--ckpt_path {path} (or --ckpt_path last)."
        )

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if not self._updating:
            raise KeyboardInterrupt  # as Python's default handler does
        self._held = True

    def _restore_handler(self) -> None:
        if (
            self._previous_handler is not None
            and signal.getsignal(signal.SIGINT) == self._on_sigint
        ):
            signal.signal(signal.SIGINT, self._previous_handler)
        self._previous_handler = None


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` of this run lives: the ModelCheckpoint folder, else the log folder."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
        return Path(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    return run_dir(trainer) / "checkpoints" / "last.ckpt"
