"""Resume, determinism, SIGKILL, SIGTERM and Ctrl-C, NaN stops, full disks, atomic and data-only
files."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alexnet_lit import LitAlexNet
from alexnet_lit import checkpoints as checkpoints_module
from alexnet_lit.checkpoints import AtomicCheckpointIO, SaveInterrupted
from alexnet_lit.errors import CheckpointError
from alexnet_lit.training.cli import AlexNetCLI, cli_main
from tests.conftest import make_image_folder
from tests.helpers import ROOT, FullDiskAfter, cli_error_line, run_script
from tests.helpers import fit_args as tiny_fit_args
from tests.signals import kill_at

# 6 training images, batch 2: 3 steps an epoch.
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), splits={"train": 2, "val": 1})


def fit_args(data: Path, *extra: str) -> list[str]:
    return tiny_fit_args(data, "--trainer.log_every_n_steps=1", *extra)


# --- checkpoint files --------------------------------------------------------------------------


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io_, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io_.save_checkpoint({"step": torch.tensor(1)}, path)

    def half_write_then_fail(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        io_.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert io_.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_ctrl_c_during_save_keeps_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    io_, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io_.save_checkpoint({"step": torch.tensor(1)}, path)

    def half_write_then_ctrl_c(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_write_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        io_.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert isinstance(interrupted.value, SaveInterrupted)
    assert str(interrupted.value) == (
        f"interrupted (Ctrl-C) while writing checkpoint '{path}'; no partial file is left and the "
        "checkpoints written before it are intact, resume with --ckpt_path last."
    )
    assert io_.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def fill_the_disk(monkeypatch) -> None:
    """Let every checkpoint save from now on hit a full disk after its first kilobyte."""
    monkeypatch.setattr(checkpoints_module, "open", FullDiskAfter, raising=False)


def test_full_disk_is_one_sentence_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io_, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io_.save_checkpoint({"step": torch.tensor(1)}, path)
    fill_the_disk(monkeypatch)
    with pytest.raises(CheckpointError) as error:
        io_.save_checkpoint({"weights": torch.zeros(1_000_000), "step": torch.tensor(2)}, path)
    message = str(error.value)
    assert message.startswith(f"no space left on the device to write checkpoint '{path}'")
    assert "about 4 MB" in message and f"free in '{tmp_path}'" in message
    assert "--trainer.logger.init_args.save_dir" in message and "\n" not in message
    assert io_.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file


def test_full_disk_at_the_first_save_ends_a_fit_in_one_line(
    tiny_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    fill_the_disk(monkeypatch)
    line = cli_error_line(capsys, fit_args(tiny_data, "--trainer.max_epochs=1"))
    folder = Path("lightning_logs", "version_0", "checkpoints")
    assert line.startswith("error: no space left on the device to write checkpoint")
    assert f"free in '{folder}'" in line
    assert not list((tmp_path / folder).iterdir())  # nothing half-written


@pytest.mark.slow
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    script = f"""
import os, signal, torch
from alexnet_lit.checkpoints import AtomicCheckpointIO
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


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(
    subcommand, tiny_data, crafted_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    crafted, marker = crafted_checkpoint
    args = fit_args(tiny_data, f"--ckpt_path={crafted}")
    args[0] = subcommand
    line = cli_error_line(capsys, args)
    assert line == f"error: checkpoint '{crafted}' was refused: " + (
        "it holds Python objects that could run code when loaded (only tensors and plain data "
        "load, weights_only=True); use a checkpoint written by this project, or re-save its "
        "state_dict from a source you trust."
    )
    with pytest.raises(CheckpointError, match="was refused"):
        AtomicCheckpointIO().load_checkpoint(crafted)
    with pytest.raises(CheckpointError, match="was refused"):
        LitAlexNet.load_from_checkpoint(crafted)
    assert not marker.exists()


def test_ckpt_path_last_without_a_run_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = cli_error_line(capsys, fit_args(tiny_data, "--ckpt_path=last"))
    assert line == (
        "error: no */checkpoints/last.ckpt under 'lightning_logs'; train first, or pass the "
        "checkpoint's path."
    )


# --- NaN ---------------------------------------------------------------------------------------


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
        # A loader worker, as by default: its random crops and flips must continue too.
        "--data.num_workers=1",
        # No sanity check: the validation loader is then first made after the resume, at
        # another point of the random stream than in the uninterrupted run.
        "--trainer.num_sanity_val_steps=0",
    ]
    # The baselines keep only the RNG callback: no checkpoints are needed from them.
    overlay = tmp_path / "no_checkpoints.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "enable_checkpointing": False,
                    "logger": False,
                    "callbacks": [
                        {"class_path": "alexnet_lit.training.fault_tolerance.RNGStateCheckpoint"}
                    ],
                }
            }
        )
    )
    full = fit_in(
        tmp_path / "a", tiny_data, "--config", str(overlay), "--trainer.max_epochs=3", *scheduler
    )
    again = fit_in(
        tmp_path / "b", tiny_data, "--config", str(overlay), "--trainer.max_epochs=3", *scheduler
    )
    first = fit_in(tmp_path / "c", tiny_data, "--trainer.max_epochs=1", *scheduler)
    assert first.trainer.global_step == STEPS_PER_EPOCH
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path / "c")
        resumed = cli_main(
            fit_args(
                tiny_data, "--trainer.deterministic=true", "--trainer.max_epochs=3",
                "--ckpt_path=last", *scheduler,
            )
        )  # fmt: skip
    # --ckpt_path last found version_0's last.ckpt and the run continued in version_0.
    logs = tmp_path / "c" / "lightning_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    assert resumed.trainer.current_epoch == 3
    assert resumed.trainer.global_step == full.trainer.global_step == 3 * STEPS_PER_EPOCH
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4 * 0.125)

    weights = {name: run.model.state_dict() for name, run in [("full", full), ("again", again)]}
    weights["resumed"] = resumed.model.state_dict()
    for key, tensor in weights["full"].items():
        assert torch.equal(tensor, weights["again"][key]), f"rerun differs in {key}"
        assert torch.equal(tensor, weights["resumed"][key]), f"resume differs in {key}"
    adam_full = full.trainer.optimizers[0].state_dict()["state"]
    adam_resumed = resumed.trainer.optimizers[0].state_dict()["state"]
    assert torch.equal(adam_full[0]["exp_avg"], adam_resumed[0]["exp_avg"])

    # The run's config.yaml, run again, is a new run in a new folder, not this resume again.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path / "c")
        config = str(logs / "version_0" / "config.yaml")
        again = cli_main(["fit", "--config", config, "--trainer.max_epochs=1"])
    assert again.trainer.global_step == STEPS_PER_EPOCH  # from step 0
    assert sorted(p.name for p in logs.iterdir()) == ["version_0", "version_1"]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_a_best_checkpoint_and_full_history(tiny_data, tmp_path):
    args = fit_args(tiny_data, "--trainer.max_epochs=2")
    killed = run_script("train.py", [*args, *kill_at(STEPS_PER_EPOCH + 1, "SIGKILL")], tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()  # from epoch 0

    resumed = run_script("train.py", [*args, "--ckpt_path=last"], tmp_path)
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
    args = [*fit_args(tiny_data, "--trainer.max_epochs=1"), *kill_at(1, "SIGTERM")]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    last = Path("lightning_logs", "version_0", "checkpoints", "last.ckpt")  # relative to cwd
    output = result.stdout + result.stderr
    assert "Stopped by SIGTERM" in output and f"--ckpt_path {last} " in output, output[-2000:]
    state = torch.load(tmp_path / last, weights_only=True, map_location="cpu")
    assert state["epoch"] == 0 and 1 <= state["global_step"] < STEPS_PER_EPOCH


@pytest.mark.slow
def test_ctrl_c_saves_last_checkpoint_and_explains_how_to_resume(tiny_data, tmp_path):
    args = [*fit_args(tiny_data, "--trainer.max_epochs=1"), *kill_at(1, "SIGINT")]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 130, result.stderr[-2000:]
    last = Path("lightning_logs", "version_0", "checkpoints", "last.ckpt")  # relative to cwd
    output = result.stdout + result.stderr
    assert "Stopped by Ctrl-C" in output and f"--ckpt_path {last} " in output, output[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: interrupted (Ctrl-C)."
    state = torch.load(tmp_path / last, weights_only=True, map_location="cpu")
    assert state["epoch"] == 0 and state["global_step"] == 1  # step 1 had not started


@pytest.mark.slow
def test_ctrl_c_during_the_weight_update_is_held_until_the_batch_ends(tiny_data, tmp_path):
    # SignalAtStep comes after CheckpointOnInterrupt in the callbacks, so the Ctrl-C arrives once
    # the update has begun: the checkpoint holds step 1 complete, not half of it.
    args = [*fit_args(tiny_data, "--trainer.max_epochs=1"), *kill_at(1, "SIGINT", True)]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 130, result.stderr[-2000:]
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True, map_location="cpu")
    assert state["global_step"] == 2
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2


@pytest.mark.slow
def test_ctrl_c_while_a_checkpoint_is_written_ends_in_one_line(
    tiny_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    save = torch.save

    def ctrl_c_in_the_second_epochs_save(obj, file, *args, **kwargs):
        if obj.get("epoch") == 1:
            file.write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt
        return save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", ctrl_c_in_the_second_epochs_save)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(fit_args(tiny_data, "--trainer.max_epochs=2"))
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    checkpoints = Path("lightning_logs", "version_0", "checkpoints")
    assert line.startswith(f"error: interrupted (Ctrl-C) while writing checkpoint '{checkpoints}")
    assert line.endswith("; no partial file is left and the checkpoints written before it are "
                         "intact, resume with --ckpt_path last.")  # fmt: skip
    assert not list(checkpoints.glob("*.tmp-*"))
    monkeypatch.undo()
    # Epoch 0's files, whole; the interrupted save was not started again.
    for path in (tmp_path / checkpoints).iterdir():
        assert torch.load(path, weights_only=True, map_location="cpu")["epoch"] == 0


def test_ctrl_c_before_training_is_one_line_and_exit_130(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def ctrl_c(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(AlexNetCLI, "before_instantiate_classes", ctrl_c)
    try:
        line = cli_error_line(capsys, fit_args(tiny_data), code=130)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt left cli_main")
    assert line == "error: interrupted (Ctrl-C)."


def test_a_config_with_the_callbacks_old_name_names_the_new_one(tmp_path, monkeypatch, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - alexnet_lit.fault_tolerance.CheckpointOnSigterm\n"
    )
    monkeypatch.chdir(tmp_path)
    line = cli_error_line(capsys, ["fit", "--config", str(config), "--trainer.fast_dev_run=1"])
    assert line == (
        f"error: '{config}' names alexnet_lit.fault_tolerance.CheckpointOnSigterm, which is now "
        "alexnet_lit.training.fault_tolerance.CheckpointOnInterrupt; replace it there."
    )


@pytest.mark.slow
def test_step_checkpoints_overlay_saves_mid_epoch(tiny_data, tmp_path):
    overlay = yaml.safe_load((ROOT / "configs" / "step_checkpoints.yaml").read_text())
    (step_callback,) = overlay["trainer"]["callbacks+"]
    step_callback["init_args"]["every_n_train_steps"] = 2  # the shipped 500, scaled to 3 steps
    (tmp_path / "every_2.yaml").write_text(yaml.safe_dump(overlay))
    args = fit_args(tiny_data, "--config", str(tmp_path / "every_2.yaml"), *kill_at(2, "SIGKILL"))
    killed = run_script("train.py", args, tmp_path)
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
