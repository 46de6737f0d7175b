"""The record of images left out of a run: ``skipped_images.csv`` in the run folder."""

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from alexnet_lit.errors import DataConfigError
from alexnet_lit.runs import printable, write_csv

SKIPPED_FILE = "skipped_images.csv"


class SkippedImages:
    """Images left out as unreadable, each recorded once: ``path, reason, when``.

    ``when`` is ``scan`` (found by the cheap checks before training) or ``load`` (failed to
    decode in a loader worker). Scan-time entries are the same on every process, so only rank 0
    writes them; images that fail at load time are written by the process that met them, rank
    N > 0 into ``skipped_images.rankN.csv``. Entries recorded before the run folder is known are
    written as soon as it is (:meth:`start`).

    Args:
        on_bad_image: ``skip`` records and goes on; ``error`` raises at the first image.
    """

    def __init__(self, on_bad_image: str = "skip") -> None:
        self.on_bad_image = on_bad_image
        self.entries: dict[str, tuple[str, str]] = {}  # path -> (reason, when), in record order
        self.folder: Path | None = None
        self.rank = 0
        self._written: set[str] = set()

    def __contains__(self, path: object) -> bool:
        return path in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def file(self) -> Path | None:
        """This process's CSV file, once the run folder is known."""
        if self.folder is None:
            return None
        name = (
            SKIPPED_FILE
            if self.rank == 0
            else SKIPPED_FILE.replace(".csv", f".rank{self.rank}.csv")
        )
        return self.folder / name

    def start(self, folder: Path | None, rank: int = 0) -> None:
        """Write into ``folder`` (the run folder) from now on, as process ``rank``."""
        self.folder, self.rank = folder, rank
        self._write()

    def add(self, path: str, reason: str, when: str) -> None:
        """Record a left-out image; with ``on_bad_image: error``, raise instead."""
        if self.on_bad_image == "error":
            raise DataConfigError(
                f"unreadable image '{path}' ({reason}); fix or delete it, or set "
                "data.on_bad_image=skip to leave unreadable images out."
            )
        if path in self.entries:
            return
        self.entries[path] = (reason, when)
        if when == "load":
            rank_zero_warn(
                printable(f"skipped image '{path}' ({reason}); recorded in {self.where()}.")
            )
        self._write()

    def where(self) -> str:
        """Where the record is, for messages."""
        return str(self.file) if self.file is not None else "the run folder's " + SKIPPED_FILE

    def _write(self) -> None:
        if self.folder is None:
            return
        pending = [
            (path, reason, when)
            for path, (reason, when) in self.entries.items()
            if path not in self._written and (self.rank == 0 or when == "load")
        ]
        if not pending:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        rows = ({"path": path, "reason": reason, "when": when} for path, reason, when in pending)
        write_csv(self.file, rows, ["path", "reason", "when"], append=True)
        self._written.update(path for path, _, _ in pending)
