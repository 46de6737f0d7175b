"""Checkpoint files: the one safe loader, the one finder of a run's best or last file, atomic
saves.

Every command that reads a checkpoint (the CLI's ``--ckpt_path``, ``predict.py``, ``export.py``,
the tutorial importer, the notebook) goes through :func:`load_checkpoint`, which loads tensors and
plain data only (``weights_only=True``): a file that would run code when unpickled is refused.
"""

import errno
import os
import pickle
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from alexnet_lit.errors import CheckpointError, first_line

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
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass the path of a .ckpt file.")
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files that are never half-written and never run code when loaded.

    A save writes ``<name>.tmp-<pid>`` in the same folder, syncs it to disk and renames it over
    the target (``os.replace`` is atomic on one filesystem), so a crash, SIGKILL, Ctrl-C or full
    disk during a save leaves the previous file intact; a full disk ends in one sentence that
    names the folder, a Ctrl-C in :class:`SaveInterrupted`, and neither leaves the temporary
    file. Loading goes through :func:`load_checkpoint` (``weights_only=True``).

    Args:
        loaded: Checkpoints already loaded (by path) that the trainer's load should take instead
            of reading the file again; each is handed out once.
    """

    def __init__(self, loaded: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self._loaded = {os.path.abspath(path): ckpt for path, ckpt in (loaded or {}).items()}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote: no rename to rely on
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        # BaseException: a Ctrl-C mid-write must not leave the temporary file either.
        except BaseException as err:
            temporary.unlink(missing_ok=True)
            if isinstance(err, KeyboardInterrupt) and not isinstance(err, SaveInterrupted):
                raise SaveInterrupted(path) from err
            if isinstance(err, Exception) and _out_of_space(err):
                raise CheckpointError(_full_disk_message(path, checkpoint)) from err
            raise

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):  # remote: Lightning's own loader, still data only
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        loaded = self._loaded.pop(os.path.abspath(path), None)
        if loaded is not None:
            return loaded
        return load_checkpoint(path, map_location=map_location)


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


def _full_disk_message(path: Path, checkpoint: dict[str, Any]) -> str:
    needed = _tensor_bytes(checkpoint)
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
