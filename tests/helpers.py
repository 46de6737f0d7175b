"""Builders shared by the tests: CLI argument lists, running the CLI or its script, a tiny
trainer, and reading the CSV files a run writes."""

import errno
import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml

from alexnet_lit import ImageFolderDataModule, LitAlexNet
from alexnet_lit.runs import read_csv as read_run_csv
from alexnet_lit.training.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "default.yaml")
TINY_WIDTH = 64
# Small and quick: 67 px is the smallest input AlexNet accepts, and a classifier 64 wide instead
# of 4096 (4.2M parameters instead of 46.8M) trains and saves ~10x less; later arguments
# override these.
TINY = (
    "--data.image_size=67", "--data.batch_size=2", "--data.num_workers=0",
    f"--model.hidden_features={TINY_WIDTH}",
    "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
)  # fmt: skip


def cli_args(subcommand: str, data_dir: Path | None, *extra: str) -> list[str]:
    """``SUBCOMMAND --config configs/default.yaml --data.data_dir=DATA``, TINY, then ``extra``."""
    args = [subcommand, "--config", DEFAULT_CONFIG]
    if data_dir is not None:
        args.append(f"--data.data_dir={data_dir}")
    return [*args, *TINY, *extra]


def fit_args(data_dir: Path | None, *extra: str) -> list[str]:
    return cli_args("fit", data_dir, *extra)


def cli_error_line(capsys, args: list[str], code: int = 2) -> str:
    """Run the CLI in-process, expect it to exit with ``code``, return stderr's last line."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == code
    return capsys.readouterr().err.strip().splitlines()[-1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a test's own server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_script(script: str, args: list[str], cwd: Path, timeout: float = 600):
    """Run ``scripts/SCRIPT`` in a subprocess on this checkout; returns the completed process."""
    process = start_script(script, args, cwd)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def start_script(script: str, args: list[str], cwd: Path) -> subprocess.Popen:
    """Start ``scripts/SCRIPT`` in a subprocess on this checkout, its output captured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "scripts" / script), *args]
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        errors="backslashreplace", preexec_fn=_default_sigint,
    )  # fmt: skip


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C
    # handler; the script must meet Ctrl-C as it does in a terminal, however pytest was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def edited_overlay(tmp_path: Path, path: Path, **init_args) -> str:
    """A copy of overlay ``path`` in ``tmp_path`` with its one callback's ``init_args`` updated."""
    overlay = yaml.safe_load(path.read_text())
    overlay["trainer"]["callbacks+"][0]["init_args"].update(init_args)
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(overlay))
    return str(copy)


def tiny_trainer(**overrides: Any) -> L.Trainer:
    """A plain ``L.Trainer`` for a short CPU fit: 1 epoch, no sanity check, and no logger,
    checkpoints, progress bar or model summary unless ``overrides`` ask for them."""
    settings = dict(
        accelerator="cpu", devices=1, max_epochs=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    return L.Trainer(**{**settings, **overrides})


def tiny_fit(datamodule: ImageFolderDataModule, **overrides: Any) -> L.Trainer:
    """Fit a LitAlexNet made for ``datamodule`` (its classes and preprocessing) with
    :func:`tiny_trainer`; returns the trainer, whose ``lightning_module`` is the model."""
    model = LitAlexNet(
        datamodule.num_classes,
        datamodule.class_names,
        hidden_features=TINY_WIDTH,
        preprocessing=datamodule.preprocessing,
    )
    trainer = tiny_trainer(**overrides)
    trainer.fit(model, datamodule=datamodule)
    return trainer


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file a run wrote, by column, read by the package's own reader (a name
    that is not UTF-8 comes back as ``os.fsdecode`` gives it); the file must exist."""
    assert Path(path).is_file(), f"{path} was not written"
    return read_run_csv(path)


class FullDiskAfter(io.FileIO):
    """A file on a disk that fills up after ``room`` bytes: later writes raise ENOSPC."""

    def __init__(self, path, mode: str, room: int = 1000) -> None:
        super().__init__(path, mode)
        self.room = room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return super().write(data)
