"""The LightningCLI end to end: fit, the saved run, checkpoint reload, and the other subcommands."""

import functools
import logging
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from PIL import Image

from alexnet_lit import LitAlexNet
from alexnet_lit.data.presets import eval_transform
from alexnet_lit.errors import UserError
from alexnet_lit.runs import read_scalars
from alexnet_lit.training import precision as precision_module
from alexnet_lit.training.cli import cli_main, parse_fit_args
from tests.conftest import (
    CLASSES,
    RUN_CLASSES,
    RUN_EPOCHS,
    RUN_TRAIN_BATCHES,
    EvaluatedRun,
    make_image_folder,
)
from tests.helpers import ROOT, TINY_WIDTH, cli_args, cli_error_line, fit_args, run_script


def test_fast_dev_run_links_classes_from_the_data(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(fit_args(image_folder, "--trainer.fast_dev_run=1"))
    assert cli.model.hparams.num_classes == 3
    assert cli.model.hparams.class_names == CLASSES
    assert cli.model.model.classifier[-1].out_features == 3
    assert cli.model.hparams.preprocessing["image_size"] == 67
    assert isinstance(cli.trainer.optimizers[0], torch.optim.Adam)
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])


@pytest.fixture(scope="module")
def trained_run(evaluated_run: EvaluatedRun) -> Path:
    """The shared fit's lightning_logs/version_0 (tests/conftest.py): 3 epochs of 2 steps, the
    last at learning rate 0, so that val/acc cannot improve in it."""
    return evaluated_run.fit


@pytest.mark.slow
def test_fit_writes_config_best_and_last_checkpoints(trained_run):
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == RUN_EPOCHS  # the resolved config: the command's keys
    hparams = yaml.safe_load((trained_run / "hparams.yaml").read_text())
    assert hparams["num_classes"] == 7 and hparams["class_names"] == RUN_CLASSES
    acc = [value for _, value in read_scalars(trained_run)["val/acc"]]
    assert len(acc) == RUN_EPOCHS and acc[-1] == acc[-2]  # the last epoch did not improve
    (best,) = (trained_run / "checkpoints").glob("best-epoch=*.ckpt")
    best_epoch = torch.load(best, weights_only=True)["epoch"]
    assert best_epoch == acc.index(max(acc)) < RUN_EPOCHS - 1  # the first epoch of the best val/acc
    # last.ckpt is the last epoch, which did not improve val/acc, and can resume the run.
    last = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (RUN_EPOCHS - 1, RUN_EPOCHS * RUN_TRAIN_BATCHES)
    assert "optimizer_states" in last and "lr_schedulers" in last
    # Temperature scaling after the fit: each checkpoint holds the one fitted for it.
    for checkpoint in (last, torch.load(best, weights_only=True)):
        assert checkpoint["hyper_parameters"]["temperature"] > 0
    assert list(trained_run.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_checkpoint_reloads_without_config_or_data(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config, no dataset here
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    model = LitAlexNet.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert model.hparams.class_names == RUN_CLASSES
    assert model.hparams.preprocessing["mean"] == [0.5, 0.5, 0.5]
    image = Image.new("RGB", (50, 40), "red")
    x = eval_transform(**model.hparams.preprocessing)(image).unsqueeze(0)
    assert x.shape == (1, 3, 67, 67)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()

    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["class_names"] == RUN_CLASSES
    reloaded = LitAlexNet(num_classes=7, hidden_features=raw["hyper_parameters"]["hidden_features"])
    reloaded.load_state_dict(raw["state_dict"])
    assert torch.equal(reloaded.model.classifier[-1].weight, model.model.classifier[-1].weight)


@pytest.mark.slow
def test_validate_and_test_ran_on_the_checkpoint(evaluated_run):
    # The shared fixture ran `validate` and `test` on last.ckpt, each in a run folder of its own.
    for subcommand, stage in (("validate", "val"), ("test", "test")):
        assert 0.0 <= evaluated_run.metrics[subcommand][f"{stage}/acc"] <= 1.0
        assert (getattr(evaluated_run, subcommand) / "config.yaml").is_file()


@pytest.mark.slow
def test_predict_runs_on_the_checkpoint(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = trained_run.parents[1] / "data"
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cli = cli_main(cli_args("predict", data, f"--ckpt_path={ckpt}"))
    assert cli.trainer.predict_loop.predictions  # one entry per batch


@pytest.mark.slow
def test_ckpt_path_is_read_from_disk_once(tiny_run, tiny_ckpt, tmp_path, monkeypatch):
    # LightningCLI reads --ckpt_path for its hyperparameters, then the trainer reads it again to
    # restore it; AlexNetCLI loads it once (safely) and hands it to the trainer's checkpoint IO.
    # A copy outside any run folder: a checkpoint of a run also refreshes that run's page, which
    # reads the run's best checkpoint for its temperature (a read of its own, not --ckpt_path's).
    ckpt = tmp_path / "elsewhere" / "model.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_ckpt, ckpt)
    monkeypatch.chdir(tmp_path)
    reads, real_load = [], torch.load

    def counting_load(f, *args, **kwargs):
        if isinstance(f, str | os.PathLike) and Path(f).resolve() == ckpt.resolve():
            reads.append(f)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    cli = cli_main(
        cli_args("validate", tiny_run / "data", "--data.image_size=96", "--data.batch_size=4",
                 f"--ckpt_path={ckpt}")
    )  # fmt: skip
    assert 0.0 <= float(cli.trainer.callback_metrics["val/acc"]) <= 1.0  # it was restored
    assert len(reads) == 1


@pytest.mark.parametrize(
    ("key", "ours", "theirs"),
    [("model.arch", "torchvision", "tutorial"), ("model.hidden_features", 4096, TINY_WIDTH)],
)
def test_a_checkpoint_of_another_network_shape_is_one_line_naming_the_option(
    key, ours, theirs, tiny_run, tiny_ckpt, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = cli_args("validate", tiny_run / "data", "--data.image_size=96", f"--{key}={ours}")
    line = cli_error_line(capsys, [*args, f"--ckpt_path={tiny_ckpt}"])
    assert line == (
        f"error: --ckpt_path '{tiny_ckpt}' was trained with {key} {theirs} but {key} is {ours}; "
        f"pass the run's config.yaml with --config (or --{key} {theirs})."
    )


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            ["--model.optimizer.class_path=torch.optim.SGD", "--model.optimizer.init_args.lr=0.1"],
            "with another optimizer than this config's SGD",
        ),
        (["--model.no_decay_bias=true"], "with 1 parameter group(s), not 2"),
        (["--model.lr_scheduler=null"], "with a learning-rate schedule"),
    ],
    ids=["optimizer", "groups", "schedule"],
)
def test_resuming_with_another_optimizer_or_schedule_is_one_line(
    change, named, evaluated_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    last = shutil.copy(evaluated_run.fit / "checkpoints" / "last.ckpt", tmp_path / "last.ckpt")
    config = str(evaluated_run.fit / "config.yaml")
    line = cli_error_line(capsys, ["fit", "--config", config, f"--ckpt_path={last}", *change])
    assert line.startswith(f"error: --ckpt_path '{last}' was saved by a fit {named}")
    assert line.endswith("or start a new fit from its weights with --model.weights.")


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


@pytest.mark.slow
def test_a_onecycle_fit_resumes(image_folder, tmp_path, monkeypatch):
    # OneCycleLR adds settings of its own (max_lr, min_lr, momentum bounds) to the optimizer's
    # group: the resume check must not take them for another optimizer's.
    monkeypatch.chdir(tmp_path)
    args = fit_args(
        image_folder, "--config", str(ROOT / "configs" / "experiments" / "onecycle.yaml"),
        "--trainer.max_epochs=2",
    )  # fmt: skip
    first = cli_main(args[1:], run=False)
    first.trainer.callbacks.append(StopAfterFirstEpoch())  # a fit cut short after one epoch
    first.trainer.fit(first.model, datamodule=first.datamodule)
    resumed = cli_main([*args, "--ckpt_path=last"])
    assert resumed.trainer.global_step == 2 * first.trainer.global_step


def test_a_ckpt_path_that_is_no_lightning_checkpoint_points_to_model_weights(
    tiny_run, tiny_ckpt, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "alexnet.pth"
    torch.save(torch.load(tiny_ckpt, weights_only=True)["state_dict"], plain)
    args = cli_args("validate", tiny_run / "data", "--data.image_size=96", f"--ckpt_path={plain}")
    line = cli_error_line(capsys, args)
    assert line == (
        f"error: --ckpt_path '{plain}' is not a Lightning checkpoint (it has no state_dict "
        f"entry); to start from weights such as a plain state_dict or the tutorial's "
        f"alexnet.pt, pass --model.weights {plain} instead."
    )


def test_missing_data_dir_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = cli_error_line(capsys, fit_args(tmp_path / "nowhere"))
    assert line.startswith(f"error: data.data_dir: '{tmp_path / 'nowhere'}' does not exist;")
    (tmp_path / "a.zip").write_bytes(b"PK")  # the dataset still zipped, say
    line = cli_error_line(capsys, fit_args(tmp_path / "a.zip"))
    assert line.startswith(f"error: data.data_dir: '{tmp_path / 'a.zip'}' is a file, not a folder;")


def test_a_log_folder_under_a_file_is_one_line(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").write_text("a file where the logs' folder would be")
    line = cli_error_line(
        capsys, fit_args(image_folder, "--trainer.logger.init_args.save_dir=notes")
    )
    assert line.startswith("error: trainer.logger's save_dir 'notes/lightning_logs' cannot be")
    assert "('notes' is a file, not a folder)" in line


def test_missing_train_split_names_it(tmp_path, monkeypatch, capsys):
    # A missing val/ is not an error: train/ is split (tests/test_data_dirty.py).
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", splits={"val": 1})
    line = cli_error_line(capsys, fit_args(data, "--trainer.fast_dev_run=1"))
    assert f"'{data / 'train'}' does not exist" in line and line.startswith("error:")


def test_split_without_images_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", splits={"train": 1})
    for name in CLASSES:
        (data / "val" / name).mkdir(parents=True)
    line = cli_error_line(capsys, fit_args(data, "--trainer.fast_dev_run=1"))
    assert f"'{data / 'val'}' has no images" in line


@pytest.mark.parametrize("classes", [["a"], ["a", "b"]])
def test_fewer_than_two_classes_with_images_is_one_line_before_any_model(
    classes, tmp_path, monkeypatch, capsys
):
    # train/a/ and val/a/ are empty; with ["a", "b"], b holds images but is the only class.
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", classes=classes[1:], splits={"train": 2, "val": 1})
    for split in ("train", "val"):
        (data / split / "a").mkdir(parents=True)

    built, build = [], LitAlexNet.__init__

    @functools.wraps(build)  # the same signature, for the CLI's parser
    def counted(self, *args, **kwargs):
        built.append(self)
        build(self, *args, **kwargs)

    monkeypatch.setattr(LitAlexNet, "__init__", counted)
    line = cli_error_line(capsys, fit_args(data, "--trainer.fast_dev_run=1"))
    assert line.startswith(f"error: '{data / 'train'}' needs at least two class folders")
    assert "'a' (empty)" in line and "train/cat/ and train/dog/" in line
    assert not built


def test_unknown_config_key_names_it(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("model:\n  learning_rate: 0.1\n")
    line = cli_error_line(capsys, fit_args(image_folder, "--config", str(overlay)))
    assert "model.learning_rate" in line and "--help" in line


def test_script_prints_one_line_and_no_traceback(tmp_path):
    result = run_script("train.py", fit_args(tmp_path / "missing"), tmp_path, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.data_dir")


def test_bad_value_names_the_key_and_the_reason(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = cli_error_line(capsys, fit_args(image_folder, "--data.batch_size=many"))
    assert 'Parser key "data.batch_size"' in line and "Got value: many" in line
    # A key cut short is a mistake, not the key it begins (argparse would take it).
    line = cli_error_line(capsys, fit_args(image_folder, "--model.hidden=3"))
    assert "unrecognized arguments: --model.hidden=3" in line


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("--data.image_size=32", "data.image_size must be at least 65"),
        ("--data.crop_scale=[0.9,0.1]", "data.crop_scale must be two area fractions"),
        ("--data.crop_scale=[0,0.5]", "data.crop_scale must be two area fractions"),
        ("--data.num_workers=-1", "data.num_workers must be 0 or more"),
    ],
)
def test_a_data_value_no_image_could_pass_is_one_line_before_the_fit(
    option, named, image_folder, tmp_path, monkeypatch, capsys
):
    # Each would otherwise fail every image in its loader (recorded as unreadable, the fit
    # "done" on nothing) or end in a traceback from deep in torch.
    monkeypatch.chdir(tmp_path)
    line = cli_error_line(capsys, fit_args(image_folder, option))
    assert line.startswith(f"error: {named}")
    assert list((tmp_path / "lightning_logs").glob("*")) == []  # no run folder half-made


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--model.hidden_features=0"], "model.hidden_features must be at least 1, got 0."),
        (["--model.dropout=1.7"], "model.dropout must be at least 0 and below 1, got 1.7."),
        (
            ["--config", str(ROOT / "configs" / "experiments" / "plateau.yaml"),
             "--model.lr_scheduler.init_args.mode=min"],
            "model.lr_scheduler: ReduceLROnPlateau watches val/acc",
        ),
        (["--model.label_smoothing=1.5"], "model.label_smoothing must be from 0 to 1, got 1.5."),
        # torch's own check of an optimizer's arguments, when the fit builds it
        (["--model.optimizer.init_args.lr=-1"], "model.optimizer: Invalid learning rate: -1.0"),
        # Lightning's refusals of trainer settings, and one it would divide by mid-fit
        (["--trainer.max_epochs=-5"], "`max_epochs` must be a non-negative integer or -1."),
        (["--trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be"),
        # the project's own schedule says its own line, not wrapped in another
        (
            ["--config", str(ROOT / "configs" / "experiments" / "warmup_cosine.yaml"),
             "--model.lr_scheduler.init_args.warmup_steps=100000"],
            "WarmupCosineLR: warmup_steps (100000) must be",
        ),
    ],
    ids=["width", "dropout", "plateau", "smoothing", "lr", "epochs", "accumulate", "warmup"],
)  # fmt: skip
def test_a_model_or_trainer_value_that_cannot_train_is_one_line(
    options, named, image_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    line = cli_error_line(capsys, fit_args(image_folder, *options))
    assert line.startswith(f"error: {named}")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            b"trainer:\n  max_epochs: [1, 2\n",
            "expected ',' or ']', but got '<stream end>' at line 3",
        ),
        (b"\x80\x04 a checkpoint, say", "'utf-8' codec can't decode byte 0x80"),
    ],
    ids=["yaml", "binary"],
)
def test_a_config_file_that_is_not_yaml_is_named_in_one_line(
    content, reason, image_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_bytes(content)
    for config in (["--config=mine.yaml"], ["-c", "mine.yaml"]):  # and LightningCLI's short form
        line = cli_error_line(capsys, fit_args(image_folder, *config))
        assert line.startswith(f"error: --config mine.yaml is not a YAML config ({reason}")
    with pytest.raises(UserError, match=r"--config mine\.yaml is not a YAML config"):
        parse_fit_args(["--config", "mine.yaml"])  # the sweeps' and recipes' parse


# --- fast.yaml: native mixed precision only ------------------------------------------------------

FAST_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fast.yaml")


@pytest.mark.parametrize(
    ("flags", "expected", "reason"),
    [((), "32-true", "no bf16 instructions"), (("amx_bf16",), "bf16-mixed", "amx_bf16")],
)
def test_fast_yaml_uses_bf16_only_where_the_cpu_has_it(
    flags, expected, reason, image_folder, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: flags)
    caplog.set_level(logging.INFO)
    args = fit_args(image_folder, "--config", FAST_CONFIG, "--trainer.fast_dev_run=1")
    cli = cli_main(args)
    assert cli.trainer.precision == expected
    (line,) = [r.getMessage() for r in caplog.records if "native_mixed_precision" in r.getMessage()]
    assert line.startswith(f"native_mixed_precision: {expected}, ") and reason in line


def test_a_run_of_fast_yaml_saves_its_config_for_any_machine(image_folder, tmp_path, monkeypatch):
    # Trained where bf16 is native, its config.yaml run on a CPU without it trains in fp32: the
    # choice is the machine's, not the run's recipe.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ("amx_bf16",))
    one_batch = ("--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1")
    fitted = cli_main(fit_args(image_folder, "--config", FAST_CONFIG, *one_batch))
    assert fitted.trainer.precision == "bf16-mixed"
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ())
    config = tmp_path / "lightning_logs" / "version_0" / "config.yaml"
    again = cli_main(["fit", "--config", str(config), "--trainer.fast_dev_run=1"])
    assert again.trainer.precision == "32-true"


def test_an_explicit_precision_wins_over_fast_yaml(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ())
    args = fit_args(
        image_folder, "--config", FAST_CONFIG, "--trainer.precision=bf16-mixed",
        "--trainer.fast_dev_run=1",
    )  # fmt: skip
    assert cli_main(args).trainer.precision == "bf16-mixed"


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), "bf16-mixed"), ((8, 0), "bf16-mixed"), ((7, 5), "16-mixed")],
)
def test_native_precision_on_cuda_gpus(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Some GPU")
    chosen, reason = precision_module.native_mixed_precision("auto")
    assert chosen == expected and f"compute capability {capability[0]}.{capability[1]}" in reason
    assert precision_module.native_mixed_precision("cpu")[0] in ("32-true", "bf16-mixed")
