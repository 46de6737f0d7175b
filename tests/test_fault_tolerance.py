"""Resume, determinism, SIGKILL and SIGTERM, NaN stops, atomic and data-only checkpoints."""

import errno
import fcntl
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alexnet_lit import LitAlexNet
from alexnet_lit.cli import cli_main
from alexnet_lit.fault_tolerance import AtomicCheckpointIO, CheckpointError, LastCheckpoint
from tests.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "default.yaml")
# 6 training images, batch 2: 3 steps an epoch; 67 px is the smallest input AlexNet accepts.
TINY = [
    "--data.image_size=67", "--data.batch_size=2", "--data.num_workers=0",
    "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1",
]  # fmt: skip
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), splits={"train": 2, "val": 1})


def fit_args(data: Path, *extra: str) -> list[str]:
    return ["fit", "--config", DEFAULT_CONFIG, f"--data.data_dir={data}", *TINY, *extra]


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# --- checkpoint files --------------------------------------------------------------------------


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def half_write_then_fail(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


# A state that fills the 8 MB buffer more than once and ends mid-block.
LARGE = {"weights": torch.arange(2_500_003, dtype=torch.float32), "step": torch.tensor(7)}


def torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def accepts_o_direct(folder: Path) -> bool:
    """Whether the filesystem of ``folder`` lets a file be opened with O_DIRECT."""
    try:
        fd = os.open(folder / "o_direct_probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    (folder / "o_direct_probe").unlink()
    return True


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this OS")
def test_save_writes_past_the_page_cache_the_same_bytes(tmp_path, monkeypatch):
    if not accepts_o_direct(tmp_path):
        pytest.skip("the temporary folder's filesystem refuses O_DIRECT")
    direct, real_write = [], os.write

    def record(fd, data):
        direct.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", record)
    AtomicCheckpointIO().save_checkpoint(LARGE, tmp_path / "last.ckpt")
    monkeypatch.undo()
    assert len(direct) > 1 and all(direct)  # every block went out past the page cache
    # Whole blocks went out, yet the file ends where torch.save's stream ends.
    assert (tmp_path / "last.ckpt").read_bytes() == torch_save_bytes(LARGE)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this OS")
@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_save_falls_back_to_the_page_cache_where_o_direct_is_refused(
    refused_at, tmp_path, monkeypatch
):
    if not accepts_o_direct(tmp_path):
        pytest.skip("the temporary folder's filesystem refuses O_DIRECT")
    real_open, real_write, refusals = os.open, os.write, []

    def open_without_direct(path, flags, *args, **kwargs):
        if refused_at == "open" and flags & os.O_DIRECT:
            refusals.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    def write_without_direct(fd, data):
        if refused_at == "write" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refusals.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", open_without_direct)
    monkeypatch.setattr(os, "write", write_without_direct)
    AtomicCheckpointIO().save_checkpoint(LARGE, tmp_path / "last.ckpt")
    monkeypatch.undo()
    assert len(refusals) == 1  # refused once, then buffered for the rest of the file
    assert (tmp_path / "last.ckpt").read_bytes() == torch_save_bytes(LARGE)


@pytest.mark.slow
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    script = f"""
import os, signal, torch
from alexnet_lit.fault_tolerance import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({{"step": torch.tensor(1)}}, {str(path)!r})
def killed_midway(obj, file, *args, **kwargs):
    file.write(b"PK half a checkpoint"); file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = killed_midway
io.save_checkpoint({{"step": torch.tensor(2)}}, {str(path)!r})
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, timeout=300)
    assert result.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=True)["step"] == 1


class _CreatesMarker:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(
    subcommand, tiny_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    marker, crafted = tmp_path / "pwned", tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": _CreatesMarker(marker)}, crafted)
    args = fit_args(tiny_data, f"--ckpt_path={crafted}")
    args[0] = subcommand
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint") and str(crafted) in line and "refused" in line
    with pytest.raises(CheckpointError):
        AtomicCheckpointIO().load_checkpoint(crafted)
    with pytest.raises(Exception, match="Weights only load failed"):
        LitAlexNet.load_from_checkpoint(crafted)
    assert not marker.exists()


def test_ckpt_path_last_without_a_run_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli_main(fit_args(tiny_data, "--ckpt_path=last"))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --ckpt_path last: no version_*/checkpoints/last.ckpt under")


# --- NaN ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("improves", [True, False])
def test_last_checkpoint_links_to_a_best_checkpoint_of_the_same_state(tmp_path, improves):
    # monitor "step" with mode max improves every epoch; with mode min only in the first.
    best = ModelCheckpoint(monitor="step", mode="max" if improves else "min", filename="best")
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1,
        callbacks=[best, LastCheckpoint()], plugins=[AtomicCheckpointIO()], logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(BoringModel())
    folder = tmp_path / "checkpoints"
    last, best_file = folder / "last.ckpt", Path(best.best_model_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["last.ckpt", best_file.name])
    assert torch.load(last, weights_only=True)["epoch"] == 1  # always the last epoch
    assert torch.load(best_file, weights_only=True)["epoch"] == (1 if improves else 0)
    # Improving epoch: one file under two names. Otherwise two files, written separately.
    assert last.samefile(best_file) == improves
    assert "optimizer_states" in torch.load(last, weights_only=True)  # resumable either way


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_good_checkpoints(
    tiny_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    training_step = LitAlexNet.training_step
    bad_step = STEPS_PER_EPOCH + 1  # epoch 1, batch 1

    def nan_from_bad_step(self, batch, batch_idx):
        output = training_step(self, batch, batch_idx)
        if self.global_step >= bad_step:
            output = {**output, "loss": output["loss"] * float("nan")}
        return output

    monkeypatch.setattr(LitAlexNet, "training_step", nan_from_bad_step)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(fit_args(tiny_data, "--trainer.max_epochs=3"))
    assert exit_info.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"NaN or infinite at global step {bad_step} (epoch 1, batch 1)" in line
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names[0].startswith("best-epoch=00-") and names[1:] == ["last.ckpt"], names
    for path in checkpoints.iterdir():
        state = torch.load(path, weights_only=True, map_location="cpu")
        assert state["global_step"] == STEPS_PER_EPOCH
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values())


# --- resume ------------------------------------------------------------------------------------


def fit_in(folder: Path, data: Path, *extra: str):
    folder.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        return cli_main(fit_args(data, "--trainer.deterministic=true", *extra))


@pytest.mark.slow
def test_rerun_repeats_and_resume_matches_an_uninterrupted_run(tiny_data, tmp_path):
    # StepLR halves the rate each epoch, so a scheduler that is not restored shows in the lr.
    scheduler = [
        "--model.lr_scheduler.class_path=torch.optim.lr_scheduler.StepLR",
        "--model.lr_scheduler.init_args.step_size=1",
        "--model.lr_scheduler.init_args.gamma=0.5",
    ]
    # The baselines keep only the RNG callback: no 560 MB checkpoints are needed from them.
    overlay = tmp_path / "no_checkpoints.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "enable_checkpointing": False,
                    "logger": False,
                    "callbacks": [{"class_path": "alexnet_lit.fault_tolerance.RNGStateCheckpoint"}],
                }
            }
        )
    )
    full = fit_in(
        tmp_path / "a", tiny_data, "--config", str(overlay), "--trainer.max_epochs=2", *scheduler
    )
    again = fit_in(
        tmp_path / "b", tiny_data, "--config", str(overlay), "--trainer.max_epochs=2", *scheduler
    )
    first = fit_in(tmp_path / "c", tiny_data, "--trainer.max_epochs=1", *scheduler)
    assert first.trainer.global_step == STEPS_PER_EPOCH
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path / "c")
        resumed = cli_main(
            fit_args(
                tiny_data, "--trainer.deterministic=true", "--trainer.max_epochs=2",
                "--ckpt_path=last", *scheduler,
            )
        )  # fmt: skip
    # --ckpt_path last found version_0's last.ckpt and the run continued in version_0.
    assert sorted(p.name for p in (tmp_path / "c" / "lightning_logs").iterdir()) == ["version_0"]
    assert resumed.trainer.current_epoch == 2
    assert resumed.trainer.global_step == full.trainer.global_step == 2 * STEPS_PER_EPOCH
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4 * 0.25)

    weights = {name: run.model.state_dict() for name, run in [("full", full), ("again", again)]}
    weights["resumed"] = resumed.model.state_dict()
    for key, tensor in weights["full"].items():
        assert torch.equal(tensor, weights["again"][key]), f"rerun differs in {key}"
        assert torch.equal(tensor, weights["resumed"][key]), f"resume differs in {key}"
    adam_full = full.trainer.optimizers[0].state_dict()["state"]
    adam_resumed = resumed.trainer.optimizers[0].state_dict()["state"]
    assert torch.equal(adam_full[0]["exp_avg"], adam_resumed[0]["exp_avg"])


def kill_at(step: int, signal_name: str) -> list[str]:
    return [
        "--trainer.callbacks+=tests.signals.SignalAtStep",
        f"--trainer.callbacks.step={step}",
        f"--trainer.callbacks.signal_name={signal_name}",
    ]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_a_best_checkpoint_and_full_history(tiny_data, tmp_path):
    args = fit_args(tiny_data, "--trainer.max_epochs=2")
    killed = run_script([*args, *kill_at(STEPS_PER_EPOCH + 1, "SIGKILL")], tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()  # from epoch 0

    resumed = run_script([*args, "--ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 2 * STEPS_PER_EPOCH
    best = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("best-")]
    assert len(best) == 1
    model = LitAlexNet.load_from_checkpoint(best[0], map_location="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("val/acc")] == [
        STEPS_PER_EPOCH - 1,
        2 * STEPS_PER_EPOCH - 1,
    ]


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_and_explains_how_to_resume(tiny_data, tmp_path):
    result = run_script(
        [*fit_args(tiny_data, "--trainer.max_epochs=1"), *kill_at(1, "SIGTERM")], tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    last = Path("lightning_logs", "version_0", "checkpoints", "last.ckpt")  # relative to cwd
    output = result.stdout + result.stderr
    assert "Stopped by SIGTERM" in output and f"--ckpt_path {last} " in output, output[-2000:]
    state = torch.load(tmp_path / last, weights_only=True, map_location="cpu")
    assert state["epoch"] == 0 and 1 <= state["global_step"] < STEPS_PER_EPOCH


@pytest.mark.slow
def test_step_checkpoints_overlay_saves_mid_epoch(tiny_data, tmp_path):
    overlay = yaml.safe_load((ROOT / "configs" / "step_checkpoints.yaml").read_text())
    (step_callback,) = overlay["trainer"]["callbacks+"]
    step_callback["init_args"]["every_n_train_steps"] = 2  # the shipped 500, scaled to 3 steps
    (tmp_path / "every_2.yaml").write_text(yaml.safe_dump(overlay))
    args = fit_args(tiny_data, "--config", str(tmp_path / "every_2.yaml"), *kill_at(2, "SIGKILL"))
    killed = run_script(args, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # Killed in the first epoch, before any epoch-end checkpoint: only the step one exists.
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 2


def test_config_files_are_parsed_as_data_only(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    marker, overlay = tmp_path / "pwned", tmp_path / "evil.yaml"
    overlay.write_text(f"seed_everything: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(fit_args(tiny_data, "--config", str(overlay)))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")
    assert not marker.exists()
