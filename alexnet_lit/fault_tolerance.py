"""Surviving crashes: atomic and safe checkpoint files, exact resume, SIGTERM and NaN stops."""

import errno
import math
import mmap
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from alexnet_lit.callbacks import run_dir

_NONE = torch.iinfo(torch.long).max
_UNSAFE = (
    "checkpoint '{path}' holds objects other than tensors and plain data, and loading it could "
    "run code, so it was refused; use a checkpoint written by this project."
)
_MISSING = "checkpoint '{path}' does not exist; pass an existing .ckpt file or --ckpt_path last."


class CheckpointError(ValueError):
    """A checkpoint that cannot or must not be loaded, explained in one sentence."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files that are never half-written and never run code when loaded.

    Saving writes ``<name>.tmp-<pid>`` in the same folder, past the page cache and synced
    (:class:`DirectWriter`), and renames it over the target (``os.replace`` is atomic on one
    filesystem), so a crash or SIGKILL during a save leaves the previous file intact. Loading
    always uses ``weights_only=True``: a checkpoint is data, and one that needs arbitrary
    unpickling is refused with :class:`CheckpointError`.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote: no rename to rely on
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(temporary: Path) -> None:
            with DirectWriter(temporary) as file:  # closing it syncs the file to disk
                torch.save(checkpoint, file)

        _replace_atomically(path, write)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(_UNSAFE.format(path=path)) from err
        except FileNotFoundError as err:
            raise CheckpointError(_MISSING.format(path=path)) from err


class DirectWriter:
    """A write-only file that goes straight to the disk, past the page cache (``O_DIRECT``).

    For checkpoints: each AlexNet save is ~560 MB that nothing reads during training. Written
    through the page cache, every save first takes 560 MB of fresh kernel memory and then waits
    for ``fsync`` to flush it; written directly, it streams through one 8 MB buffer and leaves the
    cache to the images. On the 2-core benchmark machine a save took 0.4 s this way, against
    0.4-1.5 s buffered (fresh page-cache memory is slow to take there; README, Speed). Bytes are
    gathered in a page-aligned buffer (an anonymous mmap) and written in whole blocks, as
    O_DIRECT requires; ``close`` pads the last block, truncates the file to its true length and
    syncs it. Where the OS or filesystem refuses O_DIRECT (no such flag, tmpfs before Linux 6.6,
    some network and FUSE filesystems) the same writes go through the page cache instead. Only
    sequential writes: no ``seek`` (``torch.save`` needs none, except under ``skip_data``).
    """

    BLOCK = 4096  # the offset, length and memory alignment O_DIRECT asks for on common disks
    BUFFER = 8 * 2**20

    def __init__(self, path: str | Path) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0)
        try:
            self._fd = os.open(path, flags | direct, 0o666)
            self._direct = bool(direct)
        except OSError as err:
            if not direct or err.errno != errno.EINVAL:
                raise
            self._fd = os.open(path, flags, 0o666)  # a filesystem without O_DIRECT
            self._direct = False
        try:
            self._buffer = mmap.mmap(-1, self.BUFFER)
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._buffer)
        self._filled = 0
        self._length = 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        size = len(data)
        while data:
            taken = min(len(data), self.BUFFER - self._filled)
            self._view[self._filled : self._filled + taken] = data[:taken]
            self._filled += taken
            data = data[taken:]
            if self._filled == self.BUFFER:
                self._write_out(self._view)
        self._length += size
        return size

    def flush(self) -> None:
        """Nothing to do before ``close``: only whole blocks can be written directly."""

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Write the last block, truncate the file to its true length and sync it to disk."""
        if self._fd < 0:
            return
        try:
            if self._filled:
                padded = -(-self._filled // self.BLOCK) * self.BLOCK
                self._view[self._filled : padded] = bytes(padded - self._filled)
                self._write_out(self._view[:padded])
            os.ftruncate(self._fd, self._length)  # drop the last block's padding
            os.fsync(self._fd)
        finally:
            self._release()

    def __enter__(self) -> "DirectWriter":
        return self

    def __exit__(self, error_type: type | None, *_: Any) -> None:
        if error_type is None:
            self.close()
        else:  # a failed save: the caller deletes the file, so nothing is worth syncing
            self._release()

    def _write_out(self, view: memoryview) -> None:
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError as err:
                if not (self._direct and err.errno == errno.EINVAL):
                    raise
                self._stop_direct()  # the filesystem refuses O_DIRECT writes: buffer them
                continue
            view = view[written:]
        self._filled = 0

    def _stop_direct(self) -> None:
        import fcntl  # POSIX only, and O_DIRECT (Linux) is the only way here

        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self._direct = False

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        # Dropped, not closed: a traceback may still hold a slice of the buffer.
        self._view = self._buffer = None


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after every epoch, for resuming; a hard link where that state was just saved.

    In an epoch that improves ``val/acc`` the best-checkpoint callback has just written this very
    state (weights, Adam's two moments, loops, callbacks and RNGs: ~560 MB for AlexNet). Writing
    it again would cost 0.5-1.5 s on a 2-core machine for nothing, so ``last.ckpt`` becomes a hard
    link to that file instead: the same bytes, no copy. The two names stay independent: the next
    save replaces ``last.ckpt`` (temporary file + rename) without touching the best file, and
    removing an old best file leaves ``last.ckpt`` whole. Where a hard link is impossible (another
    filesystem) the file is copied; remote paths are written as usual.

    "The same state" means another ModelCheckpoint saved at this global step *during the current
    hook*: a save made in an earlier hook of the same step (``on_validation_end`` before
    ``on_train_epoch_end``, say) may hold other loop and callback states, so it is not reused.
    Not ``ModelCheckpoint(save_last=True)``: Lightning 2.6 writes that only in epochs that save a
    top-k checkpoint, i.e. that improve the monitored metric.
    """

    def __init__(self, dirpath: str | Path | None = None, filename: str = "last") -> None:
        # No version counter: always last.ckpt (never last-v1.ckpt), overwritten each epoch.
        super().__init__(dirpath=dirpath, filename=filename, enable_version_counter=False)
        self._seen: dict[int, tuple[int, str]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        self._seen = self._saves_of_others(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._seen = self._saves_of_others(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._seen = self._saves_of_others(trainer)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        twin = self._twin(trainer, filepath)
        if twin is None:
            super()._save_checkpoint(trainer, filepath)
            return
        if trainer.is_global_zero:
            _link_or_copy(twin, filepath)
        trainer.strategy.barrier("LastCheckpoint")
        # What ModelCheckpoint._save_checkpoint records after a save.
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _saves_of_others(self, trainer: L.Trainer) -> dict[int, tuple[int, str]]:
        """(global step, file) of the latest save of every other ModelCheckpoint, by callback."""
        return {
            id(callback): _latest_save(callback)
            for callback in trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint) and callback is not self
        }

    def _twin(self, trainer: L.Trainer, filepath: str) -> str | None:
        """A file another ModelCheckpoint wrote from the current state in this hook, if any."""
        if "://" in filepath:
            return None
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or callback is self:
                continue
            saved = _latest_save(callback)
            if (
                saved != self._seen.get(id(callback))  # saved since this callback's last hook
                and saved[0] == trainer.global_step
                and saved[1]
                and "://" not in saved[1]
                and callback.save_weights_only == self.save_weights_only
                and os.path.abspath(saved[1]) != os.path.abspath(filepath)
            ):
                return saved[1]
        return None


def _latest_save(callback: ModelCheckpoint) -> tuple[int, str]:
    """(global step, file) of a ModelCheckpoint's latest save: private attributes of Lightning
    2.x, read defensively (a version without them just never links)."""
    return (
        getattr(callback, "_last_global_step_saved", -1),
        getattr(callback, "_last_checkpoint_saved", ""),
    )


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    """Make ``target`` a hard link to ``source`` (a copy across filesystems), atomically."""

    def link(temporary: Path) -> None:
        try:
            os.link(source, temporary)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(source, temporary)

    _replace_atomically(Path(target), link)


def _replace_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill ``<target>.tmp-<pid>`` in the same folder, then rename it over
    ``target`` (atomic on one filesystem): a crash or SIGKILL meanwhile leaves the old file."""
    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    temporary.unlink(missing_ok=True)  # left by an earlier crash of a process with this pid
    try:
        write(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


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


def check_checkpoint_is_data(path: str | Path) -> None:
    """Refuse a checkpoint that is missing or needs more than ``weights_only`` unpickling.

    Memory-maps the file, so the tensors are not read: cheap even for a 560 MB checkpoint.

    Raises:
        CheckpointError: Naming the file and what to do.
    """
    if "://" in str(path):
        return  # remote: AtomicCheckpointIO.load_checkpoint still loads it with weights_only
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_UNSAFE.format(path=path)) from err
    except FileNotFoundError as err:
        raise CheckpointError(_MISSING.format(path=path)) from err


def find_last_checkpoint(log_root: str | Path) -> Path:
    """The newest ``version_*/checkpoints/last.ckpt`` under a logger folder (e.g. lightning_logs).

    Raises:
        CheckpointError: When there is none.
    """
    candidates = sorted(
        Path(log_root).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
    )
    if not candidates:
        raise CheckpointError(
            f"--ckpt_path last: no version_*/checkpoints/last.ckpt under '{log_root}'; train "
            "first, or pass the checkpoint file with --ckpt_path PATH."
        )
    return candidates[-1]
