"""Research recipes: each overlay via the CLI, the schedules, MixUp/CutMix, EMA, the finders."""

import itertools
import json
import math
import shlex
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, EMAWeightAveraging, ModelCheckpoint
from PIL import Image
from torchvision.transforms import v2

from alexnet_lit import LitAlexNet
from alexnet_lit.data import ImageFolderDataModule
from alexnet_lit.training import recipes as recipes_module
from alexnet_lit.training.cli import cli_main
from alexnet_lit.training.finders import BatchSizeSearch, LRFinder
from alexnet_lit.training.recipes import command, finished_runs, recipes_main
from alexnet_lit.training.schedules import WarmupCosineLR
from tests.conftest import make_image_folder
from tests.helpers import ROOT, edited_overlay, fit_args, tiny_fit

OVERLAYS = sorted((ROOT / "configs").glob("experiments/*.yaml")) + sorted(
    (ROOT / "configs").glob("tools/*.yaml")
)


def tiny_args(data_dir: Path, *extra: str) -> list[str]:
    return fit_args(data_dir, "--data.batch_size=4", *extra)


def tiny_datamodule(data_dir: Path) -> ImageFolderDataModule:
    return ImageFolderDataModule(data_dir, batch_size=4, num_workers=0, image_size=67)


def configured(model: LitAlexNet, total_steps: int = 17) -> dict:
    # A stand-in for the trainer: what configure_optimizers reads of it.
    model.trainer = SimpleNamespace(
        estimated_stepping_batches=total_steps, check_val_every_n_epoch=1
    )
    return model.configure_optimizers()


def callbacks_of(cli, kind: type) -> list:
    return [callback for callback in cli.trainer.callbacks if isinstance(callback, kind)]


def check_optimizer(cli, kind: type, groups: int, **settings) -> None:
    optimizer = configured(cli.model)
    assert type(optimizer) is kind and len(optimizer.param_groups) == groups
    for key, value in settings.items():
        assert optimizer.param_groups[0][key] == value, key
    if groups == 2:  # the biases' group: no weight decay
        assert optimizer.param_groups[1]["weight_decay"] == 0.0


def check_scheduler(cli, kind: type, interval: str) -> None:
    config = configured(cli.model, total_steps=17)["lr_scheduler"]
    assert type(config["scheduler"]) is kind and config["interval"] == interval
    if kind in (torch.optim.lr_scheduler.OneCycleLR, WarmupCosineLR):
        assert config["scheduler"].total_steps == 17  # from the trainer
    if kind is torch.optim.lr_scheduler.ReduceLROnPlateau:
        assert config["monitor"] == "val/acc"


def check_overlay_effect(name: str, cli) -> None:
    """What overlay ``name`` changes, checked on the objects the CLI built from it (no fit)."""
    steps = torch.optim.lr_scheduler
    if name == "adamw":
        check_optimizer(cli, torch.optim.AdamW, 2, weight_decay=0.05)
    elif name == "sgd_nesterov":
        check_optimizer(cli, torch.optim.SGD, 2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    elif name in ("onecycle", "warmup_cosine", "step_lr", "plateau"):
        kind, interval = {
            "onecycle": (steps.OneCycleLR, "step"),
            "warmup_cosine": (WarmupCosineLR, "step"),
            "step_lr": (steps.StepLR, "epoch"),
            "plateau": (steps.ReduceLROnPlateau, "epoch"),
        }[name]
        check_scheduler(cli, kind, interval)
    elif name in ("mixup", "cutmix"):
        assert isinstance(cli.model.batch_mix, v2.MixUp if name == "mixup" else v2.CutMix)
    elif name == "label_smoothing":
        assert cli.model.loss_fn.label_smoothing == 0.1
    elif name == "early_stopping":
        (stopper,) = callbacks_of(cli, EarlyStopping)
        assert (stopper.monitor, stopper.mode, cli.trainer.max_epochs) == ("val/acc", "max", 30)
    elif name == "ema":
        assert len(callbacks_of(cli, EMAWeightAveraging)) == 1
    elif name == "grad_accum":
        assert cli.trainer.accumulate_grad_batches == 4 and cli.datamodule.hparams.batch_size == 8
    elif name == "grad_clip":
        assert cli.trainer.gradient_clip_val == 1.0
        assert cli.trainer.gradient_clip_algorithm == "norm"
    elif name == "strong_augment":
        assert cli.datamodule.train_preset().trivial_augment is not None
    elif name == "lr_find":
        assert len(callbacks_of(cli, LRFinder)) == 1
    elif name == "batch_size_find":
        assert len(callbacks_of(cli, BatchSizeSearch)) == 1
    else:
        pytest.fail(f"no check for the overlay {name!r}: add one here")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_overlay_builds_and_takes_effect(overlay, image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # run=False: the model, data and trainer are built from the configs, and nothing runs.
    cli = cli_main(tiny_args(image_folder, "--config", str(overlay))[1:], run=False)
    check_overlay_effect(overlay.stem, cli)
    # callbacks+ appends to configs/default.yaml's callbacks instead of replacing them.
    assert len(callbacks_of(cli, ModelCheckpoint)) == 2


# Fitted (one fast_dev_run batch) only where the overlay takes a code path of its own at run
# time: mixed batches and soft labels (mixup, cutmix), weights swapped around validation and
# checkpoints (ema), a scheduler that reads val/acc at the epoch's end (plateau), the strong
# augmentation (trivial augment on the loader, random erasing on the device) and accumulated
# gradients (grad_accum). The others only change arguments of objects that the test above
# builds; early stopping, which fast_dev_run turns off, and the finders, which fast_dev_run
# skips, have tests of their own below.
FITTED = ["mixup", "cutmix", "ema", "plateau", "strong_augment", "grad_accum"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FITTED)
def test_overlay_fast_dev_run(name, image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overlay = ROOT / "configs" / "experiments" / f"{name}.yaml"
    cli = cli_main(tiny_args(image_folder, "--config", str(overlay), "--trainer.fast_dev_run=1"))
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])


@pytest.mark.slow
def test_plateau_steps_after_each_validation_when_not_every_epoch_validates(
    image_folder, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    overlay = ROOT / "configs" / "experiments" / "plateau.yaml"
    every_other = ("--trainer.check_val_every_n_epoch=2", "--trainer.limit_train_batches=1")
    cli = cli_main(
        tiny_args(image_folder, "--config", str(overlay), "--trainer.max_epochs=2", *every_other)
    )
    assert cli.trainer.current_epoch == 2
    (config,) = cli.trainer.lr_scheduler_configs
    assert config.scheduler.last_epoch == 1  # after epoch 2, the first with a val/acc


def test_warmup_cosine_follows_its_formula():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.2)
    scheduler = WarmupCosineLR(optimizer, total_steps=10, warmup_steps=4, min_lr_ratio=0.1)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    def expected(step: int) -> float:
        if step < 4:
            return 0.2 * (step + 1) / 4
        cosine = 0.5 * (1 + math.cos(math.pi * (step - 4) / 6))
        return 0.2 * (0.1 + 0.9 * cosine)

    assert seen == pytest.approx([expected(s) for s in range(10)])
    assert seen[0] == pytest.approx(0.05) and seen[3] == pytest.approx(0.2)
    assert seen[7] == pytest.approx(0.2 * (0.1 + 0.9 * 0.5))  # halfway through the cosine


def test_warmup_defaults_to_a_fraction_and_rejects_a_too_long_one():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert WarmupCosineLR(optimizer, total_steps=200, warmup_fraction=0.1).warmup_steps == 20
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosineLR(optimizer, total_steps=10, warmup_steps=10)


def test_one_cycle_gets_total_steps_from_the_trainer_and_steps_per_batch():
    factory = partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3, total_steps=None)
    config = configured(LitAlexNet(num_classes=3, lr_scheduler=factory), total_steps=17)
    assert config["lr_scheduler"]["scheduler"].total_steps == 17
    assert config["lr_scheduler"]["interval"] == "step"
    # Its other way to say the length, epochs x steps per epoch, is the user's to keep.
    factory = partial(factory, epochs=2, steps_per_epoch=5)
    config = configured(LitAlexNet(num_classes=3, lr_scheduler=factory), total_steps=17)
    assert config["lr_scheduler"]["scheduler"].total_steps == 10


def test_epoch_schedulers_step_per_epoch_and_plateau_needs_mode_max():
    step_lr = partial(torch.optim.lr_scheduler.StepLR, step_size=5)
    assert configured(LitAlexNet(lr_scheduler=step_lr))["lr_scheduler"]["interval"] == "epoch"
    plateau = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="max")
    config = configured(LitAlexNet(lr_scheduler=plateau))["lr_scheduler"]
    assert config["monitor"] == "val/acc" and config["interval"] == "epoch"
    with pytest.raises(ValueError, match="mode to max"):
        configured(LitAlexNet(lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau))


def test_no_decay_bias_exempts_every_bias():
    optimizer_factory = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    model = LitAlexNet(num_classes=3, optimizer=optimizer_factory, no_decay_bias=True)
    decay, no_decay = configured(model).param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    biases = {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    assert {id(p) for p in no_decay["params"]} == biases
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    plain = configured(LitAlexNet(num_classes=3, optimizer=optimizer_factory))
    assert len(plain.param_groups) == 1


def test_label_smoothing_reaches_the_loss():
    assert LitAlexNet(label_smoothing=0.1).loss_fn.label_smoothing == 0.1


@pytest.mark.parametrize("mix", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}])
def test_mixed_batches_train_on_soft_labels_and_measure_hard_ones(mix):
    torch.manual_seed(0)
    model = LitAlexNet(num_classes=3, **mix)
    images = torch.randn(8, 3, 32, 32)
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    perfect = 20.0 * torch.nn.functional.one_hot(targets, 3).float()  # right on the true labels
    seen = []

    def forward(x):
        seen.append(x)
        return perfect

    model.forward = forward
    loss = model.training_step((images, targets), 0)["loss"]
    assert not torch.equal(seen[0], images)  # the batch was mixed
    assert model.train_metrics["acc"].compute() == 1.0  # accuracy against the integer labels
    hard_loss = torch.nn.functional.cross_entropy(perfect, targets)
    assert loss > hard_loss + 1e-3  # the loss saw mixed (soft) labels
    model.validation_step((images, targets), 0)
    assert torch.equal(seen[1], images)  # validation batches are never mixed
    assert model.val_metrics["acc"].compute() == 1.0


class WeightSpy(Callback):
    """Records a classifier weight after each train step, during validation and in checkpoints."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.after_train_step = None
        self.validated = None
        self.checkpoint = None

    @staticmethod
    def weight(module: L.LightningModule) -> torch.Tensor:
        return module.model.classifier[-1].weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after_train_step = self.weight(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, *args) -> None:
        self.validated = self.weight(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # What a ModelCheckpoint writes at this point of the epoch.
        trainer.save_checkpoint(self.folder / "now.ckpt")
        self.checkpoint = torch.load(self.folder / "now.ckpt", weights_only=True)


@pytest.mark.slow
def test_ema_weights_are_validated_and_checkpointed_beside_the_raw_ones(image_folder, tmp_path):
    overlay = yaml.safe_load((ROOT / "configs" / "experiments" / "ema.yaml").read_text())
    (entry,) = overlay["trainer"]["callbacks+"]
    ema, spy = EMAWeightAveraging(**entry["init_args"]), WeightSpy(tmp_path)
    tiny_fit(
        tiny_datamodule(image_folder), limit_train_batches=3, limit_val_batches=1,
        callbacks=[ema, spy], default_root_dir=tmp_path,
    )  # fmt: skip
    raw, validated = spy.after_train_step, spy.validated
    assert not torch.allclose(validated, raw)  # the EMA differs from the raw weights ...
    key = "model.classifier.6.weight"
    assert torch.equal(spy.checkpoint["state_dict"][key], validated)  # ... is evaluated, saved
    assert torch.equal(spy.checkpoint["current_model_state"][key], raw)  # and the raw is kept


def tool_overlay(tmp_path: Path, name: str, **init_args) -> str:
    return edited_overlay(tmp_path, ROOT / "configs" / "tools" / f"{name}.yaml", **init_args)


@pytest.mark.slow
def test_early_stopping_overlay_stops_a_run_that_stopped_improving(
    image_folder, tmp_path, monkeypatch
):
    # At learning rate 0 val/acc never improves after the first epoch: with patience 1 the run
    # stops after 2 of its 30 epochs. (fast_dev_run would turn early stopping off.)
    monkeypatch.chdir(tmp_path)
    early = ROOT / "configs" / "experiments" / "early_stopping.yaml"
    bare = tmp_path / "no_checkpoints.yaml"  # no checkpoint files, logs or pictures to write
    bare.write_text("trainer: {callbacks: [], enable_checkpointing: false, logger: false}\n")
    patient = edited_overlay(tmp_path, early, patience=1)
    cli = cli_main(
        tiny_args(
            image_folder, "--config", str(bare), "--config", patient,
            "--model.optimizer.init_args.lr=0", "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
        )
    )  # fmt: skip
    (stopper,) = callbacks_of(cli, EarlyStopping)
    assert stopper.stopped_epoch == 1 and cli.trainer.current_epoch == 2
    assert cli.trainer.max_epochs == 30


@pytest.mark.slow
def test_lr_finder_writes_its_plot_and_result_into_the_run(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overlay = tool_overlay(tmp_path, "lr_find", num_training_steps=14, early_stop_threshold=None)
    cli = cli_main(tiny_args(image_folder, "--config", overlay))
    run_dir = tmp_path / "lightning_logs" / "version_0"
    result = json.loads((run_dir / "lr_find.json").read_text())
    # 14 real training steps, the rate growing from min_lr 1e-8 to max_lr 1.
    lrs, losses = result["lr"], result["loss"]
    assert len(lrs) == len(losses) == 14
    assert lrs[0] == pytest.approx(1e-8) and lrs[-1] == pytest.approx(1.0)
    assert all(before < after for before, after in itertools.pairwise(lrs))
    assert all(math.isfinite(loss) and loss > 0 for loss in losses[:10])
    # The suggestion is a rate it tried: the steepest descent after the first 10 steps.
    assert result["suggested_lr"] in lrs[10:13]
    with Image.open(run_dir / "lr_find.png") as plot:
        assert plot.width > 200 and plot.height > 200
        assert np.asarray(plot.convert("L")).std() > 5  # a drawn curve, not a blank image
    assert cli.trainer.current_epoch == 0 and not list(run_dir.glob("checkpoints/*.ckpt"))


@pytest.mark.slow
def test_batch_size_finder_writes_its_result_into_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", splits={"train": 3, "val": 1})  # 9 images
    overlay = tool_overlay(tmp_path, "batch_size_find", steps_per_trial=1)
    cli = cli_main(tiny_args(data, "--config", overlay))
    run_dir = tmp_path / "lightning_logs" / "version_0"
    result = json.loads((run_dir / "batch_size.json").read_text())
    # Power mode doubles 2 -> 4 -> 8 -> 16, and stops once a batch covers all 9 images.
    assert result == {"batch_size": result["batch_size"], "mode": "power"}
    assert result["batch_size"] in (8, 16)
    assert cli.datamodule.hparams.batch_size == result["batch_size"]  # the size it found
    assert cli.trainer.current_epoch == 0 and not list(run_dir.glob("checkpoints/*.ckpt"))


def test_run_recipes_table_reports_mean_spread_and_the_command():
    from alexnet_lit.training import recipes as run_recipes

    runs = [
        {"recipe": "adamw", "seed": s, "returncode": 0, "wall_s": w, "epochs": 10}
        | {"best_val_acc": a}
        for s, w, a in [(0, 100.0, 0.90), (1, 110.0, 0.92), (2, 120.0, 0.94)]
    ]
    runs.append({"recipe": "ema", "seed": 0, "returncode": 1, "wall_s": 3.0, "epochs": 0,
                 "best_val_acc": None})  # fmt: skip
    table = run_recipes.markdown_table(runs, ["--trainer.max_epochs", "10"])
    adamw, ema = table.splitlines()[2:]
    assert "--config configs/experiments/adamw.yaml --trainer.max_epochs 10`" in adamw
    assert "| 0.920 ± 0.020 |" in adamw and "| 1 min 50 s |" in adamw
    assert "--seed_everything" not in adamw
    assert "failed" in ema


def test_run_recipes_checks_its_arguments_before_any_run(tmp_path, capsys):
    out = tmp_path / "runs"
    bad = ["--recipes", "default", "--out", str(out), "--", "--trainer.max_epochs=abc"]
    assert recipes_main(bad) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        'error: after -- (with the default recipe): Parser key "trainer.max_epochs"'
    )
    assert not out.exists()
    (tmp_path / "taken").write_text("a file where --out wants a folder")
    assert recipes_main(["--recipes", "default", "--out", str(tmp_path / "taken" / "runs")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_run_recipes_redoes_a_run_whose_record_was_cut_short(tmp_path, monkeypatch, capsys):
    def record(recipe: str, seed: int, extra: list[str]) -> dict:
        done = {"recipe": recipe, "seed": seed, "command": shlex.join(command(recipe, seed, extra))}
        return done | {"returncode": 0, "wall_s": 60.0, "epochs": 10, "best_val_acc": 0.96}

    ran = []

    def run_one(recipe, seed, extra, out, keep):  # instead of a real fit
        ran.append(recipe)
        return record(recipe, seed, extra)

    monkeypatch.setattr(recipes_module, "run_one", run_one)
    # A finished run of the default recipe, and adamw's record cut short by a kill.
    log = tmp_path / "runs.jsonl"
    log.write_text(json.dumps(record("default", 0, [])) + '\n{"recipe": "adamw", "se')
    assert recipes_main(["--recipes", "default", "adamw", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{log}:2 is not a whole record (cut short?); that run is done again." in out
    assert ran == ["adamw"]  # default was done, adamw again
    assert "| adamw | " in (tmp_path / "results.md").read_text()
    # The cut-short line was ended: adamw's new record is whole, and read back.
    assert [r["recipe"] for r in finished_runs(log)] == ["default", "adamw"]
    ran.clear()
    assert recipes_main(["--recipes", "sgd_nesterov", "--out", str(tmp_path), "--",
                         "--model.optimizer.init_args.momentum=0.95"]) == 0  # fmt: skip
    assert ran == ["sgd_nesterov"]  # a key of the recipe's own optimizer passes the check
