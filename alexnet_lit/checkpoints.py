"""Checkpoint files: the one safe loader, the one finder of a run's best or last file, atomic
saves.

Every command that reads a checkpoint (the CLI's ``--ckpt_path``, ``predict.py``, ``export.py``,
the tutorial importer, the notebook) goes through :func:`load_checkpoint`, which loads tensors and
plain data only (``weights_only=True``): a file that would run code when unpickled is refused.
"""

import contextlib
import errno
import itertools
import os
import pickle
import re
import shutil
import sys
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import torch
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.serialization import config as serialization_config

from alexnet_lit.errors import CheckpointError, first_line
from alexnet_lit.runs import printable

# A run's checkpoints: RUN/checkpoints/best-epoch=EE-val_acc=A.AAAA[-vN].ckpt and last.ckpt.
BEST_PATTERN = "best*.ckpt"
LAST_NAME = "last.ckpt"
_SCORE = re.compile(r"val_acc=(\d+(?:\.\d+)?)")


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """``torch.load`` a checkpoint as data only (``weights_only=True``), with one-sentence errors.

    Args:
        path: The file.
        map_location: Where tensors go, as for ``torch.load``.
        mmap: Map the file instead of reading it (tensors are read when first used).

    Raises:
        CheckpointError: The file is missing, unreadable, or holds objects that could run code.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint '{path}' {what}; pass the path of a .ckpt file.")
    # torch maps only its zip format; a file of the older format (a .pth saved with
    # _use_new_zipfile_serialization=False) is read whole.
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(unsafe_checkpoint_message(path)) from err
    # torch.load raises many types for files that are not checkpoints (KeyError, EOFError, ...).
    except Exception as err:
        raise CheckpointError(
            f"checkpoint '{path}' is not a readable PyTorch file ({type(err).__name__}: "
            f"{first_line(err)}); check the file."
        ) from err


def unsafe_checkpoint_message(path: str | Path) -> str:
    """The one-sentence refusal of a checkpoint that holds more than tensors and plain data."""
    return (
        f"checkpoint '{path}' was refused: it holds Python objects that could run code when "
        "loaded (only tensors and plain data load, weights_only=True); use a checkpoint "
        "written by this project, or re-save its state_dict from a source you trust."
    )


def checkpoint_score(path: str | Path) -> float | None:
    """The ``val_acc=`` a best checkpoint's file name records, or None."""
    match = _SCORE.search(Path(path).name)
    return float(match.group(1)) if match else None


def best_checkpoint(run: str | Path) -> Path | None:
    """A run folder's best checkpoint: the ``best*.ckpt`` with the highest ``val_acc=`` in its
    name (the newest among equals, and the newest when the names carry no score)."""

    def rank(path: Path) -> tuple[float, float]:
        score = checkpoint_score(path)
        return (-1.0 if score is None else score, path.stat().st_mtime)

    found = sorted(Path(run, "checkpoints").glob(BEST_PATTERN), key=rank)
    return found[-1] if found else None


def find_checkpoint(
    roots: Iterable[str | Path] = ("lightning_logs",), which: Literal["best", "last"] = "best"
) -> Path:
    """The ``best`` (:func:`best_checkpoint`) or ``last.ckpt`` of the newest run under any of
    ``roots`` (logger folders such as ``lightning_logs``): the run whose such file was written
    last.

    Raises:
        CheckpointError: No run there has one.
    """
    roots = [Path(root) for root in roots]
    name = BEST_PATTERN if which == "best" else LAST_NAME
    found = [ckpt for root in roots for ckpt in root.glob(f"*/checkpoints/{name}")]
    if not found:
        searched = ", ".join(f"'{root}'" for root in roots)
        raise CheckpointError(
            f"no */checkpoints/{name} under {searched}; train first, or pass the checkpoint's path."
        )
    newest = max(found, key=lambda ckpt: ckpt.stat().st_mtime)
    return best_checkpoint(newest.parent.parent) if which == "best" else newest


# The help of a script's --ckpt (checkpoint_argument).
CKPT_HELP = (
    "a checkpoint from scripts/train.py, or best / last: the newest run's best checkpoint or "
    "last.ckpt under ./lightning_logs"
)


def checkpoint_argument(value: str | Path) -> Path:
    """A script's ``--ckpt``: a file, or ``best`` / ``last``, the newest run's under
    ``./lightning_logs`` (:func:`find_checkpoint`, the file chosen printed), as ``train.py``'s
    ``--ckpt_path`` takes them.

    Raises:
        CheckpointError: ``best`` or ``last`` with no run there that has one.
    """
    if str(value) not in ("best", "last"):
        return Path(value)
    path = find_checkpoint(which="best" if str(value) == "best" else "last")
    print(printable(f"--ckpt {value}: {path}"))
    return path


def checkpoint_temperature(path: str | Path | None) -> float | None:
    """The fitted temperature a checkpoint carries, read without loading its tensors; None when
    there is no such file or it records none."""
    if not path or not Path(path).is_file():
        return None
    try:
        return load_checkpoint(path, mmap=True).get("hyper_parameters", {}).get("temperature")
    except CheckpointError:
        return None


class SaveInterrupted(KeyboardInterrupt):
    """Ctrl-C while a checkpoint was being written: no partial file is left, and the checkpoints
    written before are intact. A KeyboardInterrupt still, so Lightning and Python treat it as one.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        resume = (
            ", resume with --ckpt_path last" if (self.path.parent / LAST_NAME).is_file() else ""
        )
        super().__init__(
            f"interrupted (Ctrl-C) while writing checkpoint '{self.path}'; no partial file is "
            f"left and the checkpoints written before it are intact{resume}."
        )


# Numbers the temporary files of one process's saves, so that no two share a name.
_SAVES = itertools.count()


@dataclass
class UnsyncedCheckpoint:
    """A checkpoint written to its temporary file (``file``, still open) beside ``path``, not
    yet synced to disk nor renamed: the first half of an :class:`AtomicCheckpointIO` save."""

    file: IO[bytes]
    temporary: Path
    path: Path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files that are never half-written and never run code when loaded.

    A save writes ``<name>.tmp-<pid>-<n>`` in the same folder (:meth:`write`), syncs it to disk
    and renames it over the target (:meth:`commit`; ``os.replace`` is atomic on one
    filesystem), so a crash, SIGKILL, Ctrl-C or full disk during a save leaves the previous file
    intact; a full disk ends in one sentence that names the folder, a Ctrl-C in
    :class:`SaveInterrupted`, and neither leaves the temporary file. Loading goes through
    :func:`load_checkpoint` (``weights_only=True``).

    Args:
        loaded: Checkpoints already loaded (by path) that the trainer's load should take instead
            of reading the file again; each is handed out once.
    """

    def __init__(self, loaded: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self._loaded: dict[str, dict[str, Any]] = {}
        self.hand_over(loaded or {})

    def hand_over(self, loaded: dict[str, dict[str, Any]]) -> None:
        """Checkpoints already loaded, by path, for the trainer's load to take (each once)."""
        self._loaded |= {os.path.abspath(path): ckpt for path, ckpt in loaded.items()}

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | Path,
        storage_options: Any = None,
        serialized: Callable[[], None] | None = None,
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically; ``serialized`` is called once its
        tensors have been read, before the file is synced and renamed."""
        unsynced = self.write(checkpoint, path, storage_options)
        if serialized is not None:
            serialized()
        if unsynced is not None:
            self.commit(unsynced)

    def write(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> UnsyncedCheckpoint | None:
        """The first half of a save: ``checkpoint`` written to a new temporary file beside
        ``path``, for :meth:`commit` (or :meth:`discard`). A remote path, which has no rename to
        rely on, is saved whole by Lightning's writer instead (None)."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}-{next(_SAVES)}")
        unsynced = UnsyncedCheckpoint(open(temporary, "wb"), temporary, path)  # noqa: SIM115
        with _discarded_on_error(unsynced, lambda: _tensor_bytes(checkpoint)):
            # Tensors on a GPU reach the file through pinned host buffers, which torch's
            # caching host allocator keeps for the next save, instead of fresh pageable memory
            # each time (no effect on CPU tensors). The documented setting is a module
            # attribute; patch(), the config module's context manager, restores the process's
            # own value afterwards (and keeps the change to this thread in recent torch).
            with serialization_config.patch({"save.use_pinned_memory_for_d2h": True}):
                torch.save(checkpoint, unsynced.file)
            unsynced.file.flush()
        return unsynced

    def commit(self, unsynced: UnsyncedCheckpoint) -> None:
        """The second half of a save: sync the temporary file to disk and rename it over its
        target."""
        with _discarded_on_error(unsynced, lambda: unsynced.temporary.stat().st_size):
            os.fsync(unsynced.file.fileno())
            unsynced.file.close()
            os.replace(unsynced.temporary, unsynced.path)

    @staticmethod
    def discard(unsynced: UnsyncedCheckpoint) -> None:
        """Drop a written, uncommitted checkpoint: its target stays as it was."""
        with contextlib.suppress(OSError):
            unsynced.file.close()
        unsynced.temporary.unlink(missing_ok=True)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):  # remote: Lightning's own loader, still data only
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        loaded = self._loaded.pop(os.path.abspath(path), None)
        if loaded is not None:
            return loaded
        return load_checkpoint(path, map_location=map_location)


class BackgroundCheckpointIO(CheckpointIO):
    """Checkpoints finished by a background thread while training goes on: the
    :class:`AtomicCheckpointIO`'s files (temporary file, sync, rename), in the order they were
    asked for, deletions of replaced checkpoints included.

    With ``serialize_in_background=False`` (what a fit uses unless a plugin says otherwise) a
    save writes the tensors to the temporary file on the calling thread, as the atomic writer
    does (a Ctrl-C or a full disk there ends it the same way), and returns; the sync to disk, the
    rename and the deletions after it, which wait on the disk rather than use the CPU, go on in
    the background. With ``True`` (configs/background_checkpoints.yaml) the writing goes on there
    too: on a CPU no copy of the weights is made, a save reads the live tensors, and the next
    optimizer step (the only thing in a fit that changes them in place; AlexNet has no running
    statistics) runs its forward and backward pass meanwhile, then waits until every pending
    save has read them; a checkpoint with tensors on an accelerator is first copied there (a
    device-to-device copy, fast), and training goes on. At most two such copies are held: a save
    that would make a third first waits until the oldest is written (synced and renamed), so that
    epochs shorter than a save do not pile copies up in device memory.

    After a failed save nothing more is written or deleted, so the checkpoint it would have
    replaced stays; the error is raised at the next optimizer step, save, load or :meth:`wait`,
    or when the trainer tears down, and every later save is refused. :meth:`wait` returns once
    everything asked for is on disk; a fit waits for it before it ends.

    Args:
        checkpoint_io: The writer used in the background; an :class:`AtomicCheckpointIO` by
            default.
        serialize_in_background: Whether the tensors are also written while training goes on.
    """

    def __init__(
        self,
        checkpoint_io: AtomicCheckpointIO | None = None,
        serialize_in_background: bool = True,
    ) -> None:
        self.checkpoint_io = checkpoint_io or AtomicCheckpointIO()
        self.serialize_in_background = serialize_in_background
        self._idle()

    def _idle(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._unread = 0  # saves of live tensors not yet serialized
        self._copies = 0  # device copies held, each until its file is renamed
        self._read = threading.Condition()
        self._failed = False  # for good: nothing is written or deleted after a failure
        self._error: BaseException | None = None  # the failure, until it is raised
        self._hook: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy (EMA deep-copies the module, which reaches the trainer; ddp_spawn pickles it)
        # is an idle writer: threads and locks are not copied.
        return {
            "checkpoint_io": self.checkpoint_io,
            "serialize_in_background": self.serialize_in_background,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._idle()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        self._raise_error()
        if self._failed:  # raised before: say so again rather than skip this one silently
            raise CheckpointError(
                f"checkpoint '{path}' was not written: an earlier checkpoint write of this run "
                "failed (see the error above); the checkpoints before it are intact."
            )
        if not self.serialize_in_background:
            unsynced = self.checkpoint_io.write(checkpoint, path, storage_options)
            if unsynced is not None:
                self._commit_in_background(unsynced)
            return
        self._start()
        live = not _on_accelerator(checkpoint)  # read in place: the next step waits for it
        if live:
            with self._read:
                self._unread += 1
        else:  # a copy, which the next steps' kernels cannot change
            with self._read:  # at most two held: epochs shorter than a save must not pile them up
                self._read.wait_for(lambda: self._copies < 2)
                self._copies += 1
            try:
                self._raise_error()
                checkpoint = apply_to_collection(checkpoint, torch.Tensor, _copy)
            except BaseException:
                self._release_copy()
                raise
        read = threading.Event()

        def serialized() -> None:
            with self._read:  # the writer, or this thread if the job was never queued
                if live and not read.is_set():
                    read.set()
                    self._unread -= 1
                    self._read.notify_all()

        def save() -> None:
            nonlocal checkpoint
            try:
                if not self._failed:
                    self.checkpoint_io.save_checkpoint(
                        checkpoint, path, storage_options, serialized
                    )
            except BaseException as err:
                self._fail(err)  # before the optimizer step waiting on it wakes
            finally:
                serialized()
                if not live:
                    checkpoint = None  # the copy's memory is free once its file is renamed
                    self._release_copy()

        try:
            self._submit(save)
        except BaseException:
            serialized()
            if not live:
                self._release_copy()
            raise

    def _release_copy(self) -> None:
        with self._read:
            self._copies -= 1
            self._read.notify_all()

    def _commit_in_background(self, unsynced: UnsyncedCheckpoint) -> None:
        self._start()

        def commit() -> None:
            try:
                if self._failed:  # a save before it failed: keep what this would replace
                    self.checkpoint_io.discard(unsynced)
                else:
                    self.checkpoint_io.commit(unsynced)
            except BaseException as err:
                self._fail(err)

        try:
            self._submit(commit)
        except BaseException:
            self.checkpoint_io.discard(unsynced)
            raise

    def remove_checkpoint(self, path: str | Path) -> None:
        self._raise_error()
        if self._executor is None:
            self.checkpoint_io.remove_checkpoint(path)
            return

        def remove() -> None:
            try:
                if not self._failed:  # a save before it failed: keep what it would replace
                    self.checkpoint_io.remove_checkpoint(path)
            except BaseException as err:
                self._fail(err)

        self._submit(remove)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        self.wait()
        return self.checkpoint_io.load_checkpoint(path, map_location, weights_only)

    def wait(self) -> None:
        """Return once every save and deletion asked for is done; raise the first error."""
        for future in list(self._pending):
            future.result()
        self._pending.clear()
        self._raise_error()

    def teardown(self) -> None:
        """Wait for the writes, stop the thread, and raise a write error, unless another
        exception is being handled (a Ctrl-C, a crash): then it is a warning, not raised over
        it."""
        try:
            self.wait()
        except Exception as err:
            if sys.exc_info()[1] is None:
                raise
            warnings.warn(f"a checkpoint was not written: {first_line(err)}", stacklevel=2)
        finally:
            executor, hook, self._executor, self._hook = self._executor, self._hook, None, None
            try:
                if executor is not None:
                    executor.shutdown(wait=True)
            finally:
                if hook is not None:
                    hook.remove()
                self._idle()
                self.checkpoint_io.teardown()

    def _start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
            self._hook = register_optimizer_step_pre_hook(self._before_optimizer_step)

    def _submit(self, job: Callable[[], None]) -> None:
        assert self._executor is not None
        self._pending = [f for f in self._pending if not f.done()] + [self._executor.submit(job)]

    def _fail(self, err: BaseException) -> None:
        if not self._failed:
            self._failed, self._error = True, err

    def _before_optimizer_step(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        # Torch runs this before the step, and the step runs its closure (Lightning's forward
        # and backward pass, which change no saved tensor): the wait goes after the closure,
        # so that the two overlap.
        closure = kwargs.get("closure")
        if not callable(closure):
            self._wait_until_read()
            return None

        def closure_then_wait() -> Any:
            loss = closure()
            self._wait_until_read()
            return loss

        return args, {**kwargs, "closure": closure_then_wait}

    def _wait_until_read(self) -> None:
        with self._read:
            self._read.wait_for(lambda: self._unread == 0)
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _on_accelerator(checkpoint: dict[str, Any]) -> bool:
    found: list[bool] = []
    apply_to_collection(checkpoint, torch.Tensor, lambda t: found.append(t.device.type != "cpu"))
    return any(found)


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


def _out_of_space(err: BaseException | None) -> bool:
    """Whether ``err`` or an exception it was raised from is "no space" or "quota exceeded".

    ``torch.save`` reports a failed write as a ``RuntimeError`` ("unexpected pos ...") raised
    while handling the file's own ``OSError``, so the chain is searched.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def _discarded_on_error(unsynced: UnsyncedCheckpoint, needed: Callable[[], int]) -> Iterator[None]:
    """If the block fails, remove the temporary file (the target stays as it was) and say why:
    a Ctrl-C as :class:`SaveInterrupted`, a full disk in one sentence (``needed``: the bytes)."""
    # BaseException: a Ctrl-C mid-write must not leave the temporary file either.
    try:
        yield
    except BaseException as err:
        size = needed() if isinstance(err, Exception) and _out_of_space(err) else None
        AtomicCheckpointIO.discard(unsynced)
        if isinstance(err, KeyboardInterrupt) and not isinstance(err, SaveInterrupted):
            raise SaveInterrupted(unsynced.path) from err
        if size is not None:
            raise CheckpointError(_full_disk_message(unsynced.path, size)) from err
        raise


def _full_disk_message(path: Path, needed: int) -> str:
    free = shutil.disk_usage(path.parent).free
    return (
        f"no space left on the device to write checkpoint '{path}' (it needs about "
        f"{needed / 1e6:,.0f} MB, {free / 1e6:,.0f} MB are free in '{path.parent}'); free space "
        "there, for example by deleting old runs' checkpoints, or write the run elsewhere with "
        "--trainer.logger.init_args.save_dir=DIR. The previous checkpoints are intact."
    )


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0
