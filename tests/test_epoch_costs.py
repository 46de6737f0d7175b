"""The seconds around each epoch: each checkpoint written once, in the background, and the
evaluation pictures drawn only when they are news."""

import threading
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alexnet_lit import checkpoints as checkpoints_module
from alexnet_lit.checkpoints import AtomicCheckpointIO, BackgroundCheckpointIO
from alexnet_lit.errors import CheckpointError
from alexnet_lit.training.cli import cli_main
from tests.conftest import make_image_folder
from tests.helpers import ROOT, FullDiskAfter, cli_args, cli_error_line, fit_args

EPOCHS = 3
PICTURES = ("val/confusion_matrix", "val/reliability", "val/misclassified")


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory) -> dict:
    """A CLI fit of 3 one-step epochs at learning rate 0 (every epoch scores as the first, so
    only the first improves val/acc), with configs/background_checkpoints.yaml, recording each
    checkpoint the atomic writer writes."""
    root = tmp_path_factory.mktemp("flat_run")
    data = make_image_folder(root / "data", splits={"train": 2, "val": 2})
    writes: list[dict] = []
    real_save = AtomicCheckpointIO.save_checkpoint

    def recording_save(self, checkpoint, path, *args, **kwargs):
        writes.append(
            {
                "file": Path(path).name,
                "epoch": checkpoint["epoch"],
                "optimizer": "optimizer_states" in checkpoint,
                "thread": threading.current_thread().name,
            }
        )
        return real_save(self, checkpoint, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
        cli_main(
            fit_args(
                data,
                "--config",
                str(ROOT / "configs" / "background_checkpoints.yaml"),
                f"--trainer.max_epochs={EPOCHS}",
                "--trainer.limit_train_batches=1",
                "--trainer.log_every_n_steps=1",
                "--model.optimizer.init_args.lr=0",
            )
        )
    return {
        "root": root,
        "data": data,
        "run": root / "lightning_logs" / "version_0",
        "writes": writes,
    }


@pytest.mark.slow
def test_each_epoch_writes_the_full_state_once_and_the_best_file_weights_only(flat_run):
    writes = flat_run["writes"]
    # Epoch 0 improves val/acc: the best file (weights, hyperparameters, temperature) and
    # last.ckpt (the full state), each once; the other epochs write last.ckpt alone.
    assert [(w["epoch"], w["file"].split("-")[0], w["optimizer"]) for w in writes] == [
        (0, "best", False),
        (0, "last.ckpt", True),
        (1, "last.ckpt", True),
        (2, "last.ckpt", True),
    ]
    assert all(w["thread"].startswith("checkpoint-writer") for w in writes)  # off the loop
    checkpoints = sorted(p.name for p in (flat_run["run"] / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and checkpoints[1] == "last.ckpt"  # nothing half-written
    best = torch.load(flat_run["run"] / "checkpoints" / checkpoints[0], weights_only=True)
    assert "optimizer_states" not in best and "temperature" in best["hyper_parameters"]


@pytest.mark.slow
def test_pictures_are_drawn_in_improving_epochs_and_the_last_one(flat_run):
    events = EventAccumulator(str(flat_run["run"]), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    steps = [event.step for event in events.Scalars("val/acc")]
    assert len(steps) == EPOCHS and len({e.value for e in events.Scalars("val/acc")}) == 1
    for tag in PICTURES:  # epoch 1 neither improves nor is the last: no picture of it
        assert [image.step for image in events.Images(tag)] == [steps[0], steps[-1]], tag
    # The run folder's pictures are the last epoch's, drawn after its reports were written.
    last_report = (flat_run["run"] / "val_report.csv").stat().st_mtime_ns
    for name in ("val_confusion_matrix.png", "val_reliability.png", "val_misclassified.png"):
        assert (flat_run["run"] / name).stat().st_mtime_ns >= last_report, name


@pytest.mark.slow
def test_the_best_file_validates_and_is_refused_for_resume_naming_last_ckpt(
    flat_run, monkeypatch, capsys
):
    monkeypatch.chdir(flat_run["root"])
    cli = cli_main(cli_args("validate", flat_run["data"], "--ckpt_path=best"))
    (best,) = (flat_run["run"] / "checkpoints").glob("best-*.ckpt")
    best = best.relative_to(flat_run["root"])  # as found under lightning_logs/, and named
    assert Path(cli.trainer.ckpt_path) == best
    assert "val/acc" in cli.trainer.callback_metrics
    line = cli_error_line(capsys, fit_args(flat_run["data"], "--ckpt_path=best"))
    assert line.startswith(f"error: --ckpt_path '{best}' holds weights only")
    assert f"resume from '{best.with_name('last.ckpt')}' (the full state)" in line


def test_a_failed_background_save_keeps_the_file_it_would_replace(tmp_path, monkeypatch):
    writer = BackgroundCheckpointIO()
    old = tmp_path / "best-epoch=00.ckpt"
    try:
        writer.save_checkpoint({"step": torch.tensor(1)}, old)
        writer.wait()
        monkeypatch.setattr(checkpoints_module, "open", FullDiskAfter, raising=False)
        # A new best that does not fit on the disk; its error is raised (here by wait, in a
        # fit by the next optimizer step) before ModelCheckpoint asks to delete the old best.
        new = tmp_path / "best-epoch=01.ckpt"
        writer.save_checkpoint({"weights": torch.zeros(1_000_000)}, new)
        with pytest.raises(CheckpointError, match=r"^no space left on the device to write"):
            writer.wait()
        writer.remove_checkpoint(old)
        with pytest.raises(CheckpointError, match="an earlier checkpoint write of this run failed"):
            writer.save_checkpoint({"step": torch.tensor(2)}, new)  # refused, not skipped quietly
    finally:
        writer.teardown()
    assert [p.name for p in tmp_path.iterdir()] == [old.name]  # kept, and no temporary file
    assert AtomicCheckpointIO().load_checkpoint(old)["step"] == 1


def test_the_next_step_computes_its_gradients_then_waits_for_the_save_to_read_the_weights(
    tmp_path, monkeypatch
):
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    order, real_save = [], torch.save

    def slow_save(obj, file, *args, **kwargs):
        time.sleep(1.0)  # a slow disk: the step below is asked for while this runs
        real_save(obj, file, *args, **kwargs)
        order.append("read")

    def forward_and_backward():  # as Lightning's closure: it changes no saved tensor
        order.append("closure")
        weight.grad = torch.ones(3)
        return torch.zeros(())

    monkeypatch.setattr(torch, "save", slow_save)
    writer = BackgroundCheckpointIO()
    try:
        writer.save_checkpoint({"weight": weight.detach()}, tmp_path / "last.ckpt")
        optimizer.step(closure=forward_and_backward)  # then changes the weight in place
        order.append("step")
    finally:
        writer.teardown()
    assert order == ["closure", "read", "step"]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["weight"]
    assert torch.equal(saved, torch.ones(3)) and torch.equal(weight.detach(), torch.zeros(3))


def test_a_background_save_error_stops_the_next_optimizer_step(tmp_path, monkeypatch):
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    weight.grad = torch.ones(3)
    monkeypatch.setattr(checkpoints_module, "open", FullDiskAfter, raising=False)
    writer = BackgroundCheckpointIO()
    try:
        writer.save_checkpoint({"weights": torch.zeros(1_000_000)}, tmp_path / "last.ckpt")
        with pytest.raises(CheckpointError, match="no space left"):
            optimizer.step()
        assert torch.equal(weight.detach(), torch.ones(3))  # not updated
    finally:
        writer.teardown()
    assert list(tmp_path.iterdir()) == []


def test_a_save_returns_with_its_tensors_written_and_is_synced_and_renamed_in_the_background(
    tmp_path, monkeypatch
):
    synced, real_save, real_commit = threading.Event(), torch.save, AtomicCheckpointIO.commit

    def slow_save(obj, file, *args, **kwargs):  # a slow disk
        time.sleep(0.5)
        real_save(obj, file, *args, **kwargs)

    def commit_when_told(self, unsynced):
        assert synced.wait(timeout=60)
        real_commit(self, unsynced)

    monkeypatch.setattr(torch, "save", slow_save)
    monkeypatch.setattr(AtomicCheckpointIO, "commit", commit_when_told)
    weight, path = torch.ones(3), tmp_path / "last.ckpt"
    writer = BackgroundCheckpointIO(serialize_in_background=False)  # what a fit uses
    try:
        writer.save_checkpoint({"weight": weight}, path)  # returns while the sync waits
        weight.zero_()  # the next optimizer step changes the weights in place
        assert not path.exists()  # renamed only once synced
        synced.set()
        writer.wait()
    finally:
        synced.set()
        writer.teardown()
    assert torch.equal(torch.load(path, weights_only=True)["weight"], torch.ones(3))  # as asked


def _record_threads(monkeypatch) -> dict[str, list[str]]:
    """The names of the threads that write checkpoints' tensors and that sync and rename them."""
    threads: dict[str, list[str]] = {"write": [], "commit": []}
    for step in threads:
        real = getattr(AtomicCheckpointIO, step)

        def recording(self, *args, _step=step, _real=real, **kwargs):
            threads[_step].append(threading.current_thread().name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(AtomicCheckpointIO, step, recording)
    return threads


@pytest.mark.slow
def test_a_fit_syncs_its_checkpoints_in_the_background_unless_told_otherwise(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", splits={"train": 2, "val": 1})
    monkeypatch.chdir(tmp_path)
    main = threading.main_thread().name
    threads = _record_threads(monkeypatch)
    cli_main(fit_args(data, "--trainer.max_epochs=1"))
    assert threads["write"] == [main] * 2  # best, then last.ckpt
    assert len(threads["commit"]) == 2 and main not in threads["commit"]
    threads["write"].clear()
    threads["commit"].clear()
    synchronous = "--trainer.plugins=alexnet_lit.checkpoints.AtomicCheckpointIO"
    cli_main(fit_args(data, "--trainer.max_epochs=1", synchronous))
    assert threads == {"write": [main] * 2, "commit": [main] * 2}


def test_on_a_gpu_the_background_writer_keeps_at_most_two_copies_waiting(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints_module, "_on_accelerator", lambda checkpoint: True)  # a GPU
    threads, release, real_save = _record_threads(monkeypatch), threading.Event(), torch.save

    def held_save(obj, file, *args, **kwargs):  # a slow disk, until released
        assert release.wait(timeout=60)
        real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", held_save)
    writer = BackgroundCheckpointIO()  # configs/background_checkpoints.yaml's
    weight, third = torch.ones(3), threading.Event()

    def save_a_third() -> None:
        writer.save_checkpoint({"weight": weight}, tmp_path / "c.ckpt")
        third.set()

    try:
        writer.save_checkpoint({"weight": weight}, tmp_path / "a.ckpt")  # returns: a copy waits
        weight.zero_()  # the next optimizer step changes the weights in place
        writer.save_checkpoint({"weight": weight}, tmp_path / "b.ckpt")
        saving = threading.Thread(target=save_a_third)
        saving.start()
        assert not third.wait(timeout=1)  # a third copy waits until the oldest is written
        release.set()
        saving.join(timeout=60)
        assert third.is_set()
        writer.wait()
    finally:
        release.set()
        writer.teardown()
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["weight"], torch.ones(3))
    assert torch.equal(torch.load(tmp_path / "c.ckpt", weights_only=True)["weight"], weight)
    assert len(threads["write"]) == 3 and threading.main_thread().name not in threads["write"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("background", [False, True], ids=["atomic", "background"])
def test_a_gpu_checkpoint_written_through_pinned_buffers_loads_back_equal(tmp_path, background):
    # From a GPU each tensor is staged in a pinned host buffer that torch's caching host
    # allocator hands out again, to the next tensor of the same size and to the next save: every
    # file must hold each tensor as it was when that file was saved.
    weight, moments = (torch.randn(1000, 300, device="cuda") for _ in range(2))
    state = {"exp_avg": moments, "exp_avg_sq": moments.square(), "step": torch.tensor(7.0)}
    writer = BackgroundCheckpointIO() if background else AtomicCheckpointIO()
    handed_out = torch.cuda.host_memory_stats()["active_requests.allocated"]
    expected = []
    try:
        for name in ("a.ckpt", "b.ckpt"):
            writer.save_checkpoint({"weight": weight, "state": state}, tmp_path / name)
            expected.append([t.cpu() for t in (weight, state["exp_avg"], state["exp_avg_sq"])])
            for tensor in (weight, state["exp_avg"], state["exp_avg_sq"]):
                tensor.add_(1.0)  # the next optimizer step changes them in place
        if background:
            writer.wait()
    finally:
        if background:
            writer.teardown()
    assert torch.cuda.host_memory_stats()["active_requests.allocated"] > handed_out  # pinned
    for name, (w, m, v) in zip(("a.ckpt", "b.ckpt"), expected, strict=True):
        loaded = torch.load(tmp_path / name, weights_only=True, map_location="cpu")
        assert torch.equal(loaded["weight"], w)
        assert torch.equal(loaded["state"]["exp_avg"], m)
        assert torch.equal(loaded["state"]["exp_avg_sq"], v)
        assert loaded["state"]["step"].item() == 7.0
    assert torch.load(tmp_path / "a.ckpt", weights_only=True)["weight"].is_cuda  # as torch saves


@pytest.mark.slow
def test_with_ema_the_best_file_holds_the_averaged_weights(tmp_path, monkeypatch):
    # EMA writes its averaged weights into a checkpoint in a hook that weights-only files skip,
    # and changes them outside the optimizer step: its checkpoints stay full and their tensors
    # are written on the training thread, even with the background writer asked for.
    data = make_image_folder(tmp_path / "data", splits={"train": 2, "val": 1})
    monkeypatch.chdir(tmp_path)
    threads = _record_threads(monkeypatch)
    overlays = [ROOT / "configs" / "experiments" / "ema.yaml"]
    overlays.append(ROOT / "configs" / "background_checkpoints.yaml")
    args = [arg for overlay in overlays for arg in ("--config", str(overlay))]
    lr = "--model.optimizer.init_args.lr=0.01"
    cli_main(fit_args(data, *args, "--trainer.max_epochs=1", lr))
    assert threads["write"] == [threading.main_thread().name] * 2  # best, then last.ckpt
    (best,) = (tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("best-*.ckpt")
    checkpoint = torch.load(best, weights_only=True)
    assert "current_model_state" in checkpoint  # the raw weights, beside the averaged ones
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw)
