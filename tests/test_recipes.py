"""Research recipes: each overlay via the CLI, the schedules, MixUp/CutMix, EMA, the finders."""

import importlib.util
import json
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging

from alexnet_lit import LitAlexNet
from alexnet_lit.data import ImageFolderDataModule
from alexnet_lit.training.cli import cli_main
from alexnet_lit.training.schedules import WarmupCosineLR
from tests.conftest import make_image_folder
from tests.helpers import ROOT, fit_args, tiny_fit

OVERLAYS = sorted((ROOT / "configs").glob("experiments/*.yaml")) + sorted(
    (ROOT / "configs").glob("tools/*.yaml")
)


def tiny_args(data_dir: Path, *extra: str) -> list[str]:
    return fit_args(data_dir, "--data.batch_size=4", *extra)


def tiny_datamodule(data_dir: Path) -> ImageFolderDataModule:
    return ImageFolderDataModule(data_dir, batch_size=4, num_workers=0, image_size=67)


@pytest.mark.slow
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_overlay_fast_dev_run(overlay, image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(tiny_args(image_folder, "--config", str(overlay), "--trainer.fast_dev_run=1"))
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])
    if overlay.stem == "ema":
        assert any(isinstance(c, EMAWeightAveraging) for c in cli.trainer.callbacks)


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


def configured(model: LitAlexNet, total_steps: int = 17) -> dict:
    model.trainer = SimpleNamespace(estimated_stepping_batches=total_steps)  # a stand-in
    return model.configure_optimizers()


def test_one_cycle_gets_total_steps_from_the_trainer_and_steps_per_batch():
    factory = partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3, total_steps=None)
    config = configured(LitAlexNet(num_classes=3, lr_scheduler=factory), total_steps=17)
    assert config["lr_scheduler"]["scheduler"].total_steps == 17
    assert config["lr_scheduler"]["interval"] == "step"


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
    overlay = yaml.safe_load((ROOT / "configs" / "tools" / f"{name}.yaml").read_text())
    overlay["trainer"]["callbacks+"][0]["init_args"].update(init_args)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return str(path)


@pytest.mark.slow
def test_lr_finder_writes_its_plot_and_result_into_the_run(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overlay = tool_overlay(tmp_path, "lr_find", num_training_steps=14, early_stop_threshold=None)
    cli = cli_main(tiny_args(image_folder, "--config", overlay))
    run_dir = tmp_path / "lightning_logs" / "version_0"
    result = json.loads((run_dir / "lr_find.json").read_text())
    assert len(result["lr"]) == len(result["loss"]) == 14
    assert result["lr"][0] < result["lr"][-1] and "suggested_lr" in result
    assert (run_dir / "lr_find.png").stat().st_size > 1000
    assert cli.trainer.current_epoch == 0 and not list(run_dir.glob("checkpoints/*.ckpt"))


@pytest.mark.slow
def test_batch_size_finder_writes_its_result_into_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", splits={"train": 3, "val": 1})  # 9 images
    overlay = tool_overlay(tmp_path, "batch_size_find", steps_per_trial=1)
    cli_main(tiny_args(data, "--config", overlay))
    result = json.loads((tmp_path / "lightning_logs" / "version_0" / "batch_size.json").read_text())
    # Power mode doubles 2 -> 4 -> 8 -> 16, and stops once a batch covers all 9 images.
    assert result["batch_size"] in (8, 16)


def test_run_recipes_table_reports_mean_spread_and_the_command():
    script = ROOT / "scripts" / "run_recipes.py"
    spec = importlib.util.spec_from_file_location("run_recipes", script)
    run_recipes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_recipes)
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
