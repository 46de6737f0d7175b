"""The run folder (``lightning_logs/version_N``) and how text files are written into it.

File names on Linux are bytes; Python hands the ones that are not valid UTF-8 over as strings
with "surrogate escapes" (PEP 383). Every text file the project writes (CSV, TXT, Markdown)
goes through :func:`open_text`, which writes such a name back as its original bytes, so each
path can be recovered exactly (read the file with ``errors="surrogateescape"``) and no name ever
aborts a write. JSON escapes them instead (``\\udcXX``, which ``json.loads`` turns back into the
same string).
"""

import os
from pathlib import Path
from typing import IO

import lightning as L

ENCODING = "utf-8"
ERRORS = "surrogateescape"


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of the trainer's run: its logger's ``log_dir`` (``lightning_logs/version_N``),
    the logger's ``save_dir`` for other loggers, else ``trainer.default_root_dir``.

    Rank 0's folder on every process: under DDP this is a collective call (``Trainer.log_dir``
    broadcasts it), so every rank must make it, even where only rank 0 then writes.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def next_run_folder(root: str | Path = "lightning_logs") -> Path:
    """Create and return ``root/version_N`` for the next free N, the folder a fit's default
    TensorBoardLogger would take (its own numbering), for commands that are not one fit."""
    from lightning.pytorch.loggers import TensorBoardLogger

    folder = Path(TensorBoardLogger(save_dir=root, name="").log_dir)
    folder.mkdir(parents=True)
    return folder


def open_text(path: str | Path, mode: str = "w") -> IO[str]:
    """Open a text file for the project's outputs: UTF-8, and any file name (or other string)
    that is not valid UTF-8 written as its original bytes. ``newline=""`` suits ``csv``."""
    return open(path, mode, encoding=ENCODING, errors=ERRORS, newline="")


def printable(text: str | Path) -> str:
    """``text`` (a path, or a message holding paths) for a terminal, a picture or a web page:
    the bytes of a file name that are not valid UTF-8 shown as ``\\xNN``."""
    return os.fsencode(text).decode(ENCODING, "backslashreplace")
