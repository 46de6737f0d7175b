"""The run folder (``lightning_logs/version_N``): where it is, how text and CSV files are written
into it and read back, and how its logged scalars are read.

File names on Linux are bytes; Python hands the ones that are not valid UTF-8 over as strings
with "surrogate escapes" (PEP 383). Every text file the project writes (CSV, TXT, Markdown)
goes through :func:`open_text`, which writes such a name back as its original bytes, so each
path can be recovered exactly (read the file with ``errors="surrogateescape"``) and no name ever
aborts a write. JSON escapes them instead (``\\udcXX``, which ``json.loads`` turns back into the
same string).
"""

import contextlib
import csv
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from alexnet_lit.errors import UserError

if TYPE_CHECKING:  # Lightning is imported where a trainer exists; the data doctor needs none
    import lightning as L

ENCODING = "utf-8"
ERRORS = "surrogateescape"


# The run folder of each trainer's current stage, resolved once (see run_dir).
_RESOLVED: "weakref.WeakKeyDictionary[L.Trainer, tuple[str, Path]]" = weakref.WeakKeyDictionary()


def run_dir(trainer: "L.Trainer") -> Path:
    """The folder of the trainer's run: its logger's ``log_dir`` (``lightning_logs/version_N``),
    the logger's ``save_dir`` for other loggers, else ``trainer.default_root_dir``.

    Rank 0's folder on every process. It is resolved once per stage (``fit``, ``validate``, ...)
    and then remembered: resolving is a collective under DDP (``Trainer.log_dir`` broadcasts
    it), which the DataModule's ``setup`` makes on every process before any callback asks.
    """
    stage = str(trainer.state.fn)
    resolved = _RESOLVED.get(trainer)
    if resolved is None or resolved[0] != stage:
        resolved = _RESOLVED[trainer] = (stage, Path(trainer.log_dir or trainer.default_root_dir))
    return resolved[1]


def next_run_folder(root: str | Path = "lightning_logs", option: str = "the run folders") -> Path:
    """Create and return ``root/version_N`` for the next free N, the folder a TensorBoardLogger
    would take (its own numbering). Creating it is the claim: a run started at the same moment
    gets the next N.

    Raises:
        UserError: ``root`` cannot be written (``option`` names where it was set).
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    check_writable(root, option, folder=True)
    version = TensorBoardLogger(save_dir=root, name="").version
    while True:
        folder = Path(root, f"version_{version}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            version += 1


@contextlib.contextmanager
def discard_if_unused(folder: Path) -> Iterator[None]:
    """A tool's claimed run folder (:func:`next_run_folder`) is removed when what runs inside
    this block fails before anything was written there (a mistyped argument, a missing data
    folder): a mistake leaves no empty ``version_N`` behind."""
    try:
        yield
    except BaseException:
        if folder.is_dir() and not any(path.is_file() for path in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def open_text(path: str | Path, mode: str = "w") -> IO[str]:
    """Open a text file for the project's outputs: UTF-8, and any file name (or other string)
    that is not valid UTF-8 written as its original bytes. ``newline=""`` suits ``csv``."""
    return open(path, mode, encoding=ENCODING, errors=ERRORS, newline="")


def check_writable(path: str | Path, option: str, folder: bool = False) -> None:
    """Make ``path``'s folder (``folder``: ``path`` itself) and check that the file (a file in
    it) can be written there, before the work that ends in writing it.

    Raises:
        UserError: It cannot (a file where a folder should be, permissions, a read-only
            place); the message names ``option`` and the path.
    """
    path = Path(path)
    try:
        if folder:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):  # a name of its own: the folder may be shared
                pass
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            existed = path.exists()
            with open(path, "ab"):
                pass
            if not existed:
                path.unlink()
    except OSError as err:
        above = [path, *path.parents] if folder else path.parents
        in_the_way = next((p for p in above if p.is_file()), None)
        reason = f"'{in_the_way}' is a file, not a folder" if in_the_way else err.strerror
        raise UserError(
            f"{option} '{path}' cannot be written ({reason}); pick another path."
        ) from err


def printable(text: str | Path) -> str:
    """``text`` (a path, or a message holding paths) for a terminal, a picture or a web page:
    the bytes of a file name that are not valid UTF-8 shown as ``\\xNN``."""
    return os.fsencode(text).decode(ENCODING, "backslashreplace")


def write_csv(
    path: str | Path,
    rows: Iterable[Mapping[str, Any]],
    fields: Sequence[str],
    append: bool = False,
) -> int:
    """Write ``rows`` as a CSV file with a header (floats to 4 decimals, missing cells empty);
    ``append`` adds them to the file, with the header only when the file is new. Returns the
    number of rows."""
    path = Path(path)
    new = not (append and path.exists())
    count = 0
    with open_text(path, "a" if append else "w") as file:
        writer = csv.DictWriter(file, fieldnames=list(fields), restval="")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
            count += 1
    return count


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file the project wrote, by column; ``[]`` when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return []
    with open_text(path, "r") as file:
        return list(csv.DictReader(file))


def read_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run logged to TensorBoard, as ``tag -> [(step, value), ...]`` in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 1})  # 0: all
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags().get("scalars", [])
    }


def logged_step(trainer: "L.Trainer") -> int:
    """The step Lightning logs scalars at, so that pictures line up with them.

    Lightning has no public name for it: this is what its own LearningRateMonitor and logger
    connector read. ``trainer.global_step`` is not it: the epoch-end validation logs before this
    counter moves, one step behind ``global_step``, and a resume adjusts it on its own.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped
