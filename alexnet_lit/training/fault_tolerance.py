"""Surviving crashes: exact resume (the random generators), NaN stops, and SIGTERM saves.

Atomic, data-only checkpoint files are :class:`alexnet_lit.checkpoints.AtomicCheckpointIO`.
"""

import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

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
            raise ValueError(f"check_every_n_steps must be at least 1, got {check_every_n_steps}.")
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

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._check(trainer)
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


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (preemption, ``scancel``, ``kill``) save ``last.ckpt`` and say how to resume.

    Lightning turns SIGTERM into a clean stop after the current batch (on every rank); this
    callback then writes the checkpoint where ``--ckpt_path last`` finds it, and the process exits
    with status 0.
    """

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # full state, to resume from
        rank_zero_info(
            f"Stopped by SIGTERM at epoch {trainer.current_epoch}, global step "
            f"{trainer.global_step}; saved '{path}'. To resume, run the same fit command with "
            f"--ckpt_path {path} (or --ckpt_path last)."
        )


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` of this run lives: the ModelCheckpoint folder, else the log folder."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
        return Path(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    return run_dir(trainer) / "checkpoints" / "last.ckpt"
