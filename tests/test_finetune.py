"""Starting from known weights: ImageNet's (a random stand-in in torchvision's exact layout, in
the torch hub cache), a .pth, a .ckpt of other classes; the fine-tuning schedule; bad inputs."""

import logging
from pathlib import Path
from urllib.error import URLError

import lightning as L
import pytest
import torch
import torchvision
import yaml

from alexnet_lit import ImageFolderDataModule, LitAlexNet
from alexnet_lit.checkpoints import load_checkpoint
from alexnet_lit.errors import CheckpointError
from alexnet_lit.inference.predict import predict_probs
from alexnet_lit.model import build_alexnet
from alexnet_lit.preprocessing import normalize
from alexnet_lit.runs import read_scalars
from alexnet_lit.training.callbacks import BackboneFinetuning
from alexnet_lit.training.cli import cli_main
from alexnet_lit.weights import (
    imagenet_file,
    imagenet_preprocessing,
    load_weights,
    read_state_dict,
    weights_preprocessing,
)
from tests.conftest import make_image_folder
from tests.helpers import ROOT, TINY_WIDTH, cli_error_line, edited_overlay, fit_args, tiny_trainer

FINETUNE = str(ROOT / "configs" / "finetune.yaml")
IMAGENET_WIDTH = 4096  # the classifier of torchvision's AlexNet and of its ImageNet weights
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A torch home whose hub cache holds a random 1000-class AlexNet state dict in torchvision's
    exact keys, standing in for the ImageNet file (nothing is downloaded)."""
    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        path = imagenet_file()
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return home


@pytest.fixture
def imagenet(hub: Path, monkeypatch) -> dict[str, torch.Tensor]:
    monkeypatch.setenv("TORCH_HOME", str(hub))
    return torch.load(imagenet_file(), weights_only=True)


@pytest.fixture
def offline(monkeypatch) -> None:
    """No network: torch.hub's download fails as it does on a machine that is offline."""

    def no_network(url, *args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def test_imagenet_weights_load_every_tensor_but_a_fresh_head(imagenet):
    model = build_alexnet("torchvision", num_classes=2)
    line = load_weights(model, "imagenet", "torchvision")
    assert line.startswith("model.weights: loaded 14 of 16 tensors from ImageNet (")
    assert line.endswith("classifier.6 starts fresh (1000 classes there, 2 here).")
    loaded = model.state_dict()
    for key, tensor in imagenet.items():
        if key.startswith("classifier.6."):
            assert loaded[key].shape[0] == 2
        else:
            assert torch.equal(loaded[key], tensor), key


def test_grayscale_data_sums_the_first_filters_over_colour(imagenet):
    model = build_alexnet("torchvision", num_classes=3, in_channels=1)
    line = load_weights(model, "imagenet", "torchvision")
    assert "features.0.weight summed over its 3 colour channels" in line
    expected = imagenet["features.0.weight"].sum(dim=1, keepdim=True)
    assert torch.equal(model.state_dict()["features.0.weight"], expected)
    gray = torch.rand(1, 1, 224, 224)
    assert torch.isfinite(model(gray)).all()


def test_a_checkpoint_of_three_classes_starts_a_five_class_model(tiny_ckpt):
    checkpoint = load_checkpoint(tiny_ckpt)
    trained, width = checkpoint["state_dict"], checkpoint["hyper_parameters"]["hidden_features"]
    with pytest.raises(CheckpointError) as error:  # the tutorial's 4096-wide classifier
        load_weights(build_alexnet("tutorial", num_classes=5), str(tiny_ckpt), "tutorial")
    assert str(error.value).endswith(
        f"has a classifier {width} wide but model.hidden_features is 4096; set "
        f"model.hidden_features: {width}."
    )
    model = build_alexnet("tutorial", num_classes=5, hidden_features=width)
    line = load_weights(model, str(tiny_ckpt), "tutorial")
    assert line == (
        f"model.weights: loaded 14 of 16 tensors from {tiny_ckpt}; classifier.6 starts fresh "
        "(3 classes there, 5 here)."
    )
    for key, tensor in model.state_dict().items():
        if not key.startswith("classifier.6."):
            assert torch.equal(tensor, trained[f"model.{key}"]), key
    # Its preprocessing is what a fit from it takes (96 px, the tutorial's mean and std).
    assert (
        weights_preprocessing(str(tiny_ckpt))
        == load_checkpoint(tiny_ckpt)["hyper_parameters"]["preprocessing"]
    )


def test_weights_of_another_architecture_name_the_first_misfit(imagenet, tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_weights(build_alexnet("tutorial", 2), "imagenet", "tutorial")
    assert "tensor features.0.weight is [64, 3, 11, 11] there but [96, 3, 11, 11] here" in str(
        error.value
    )
    gray = tmp_path / "gray.pth"  # grayscale weights for RGB data: the fix is data.in_channels
    torch.save(build_alexnet("torchvision", 2, in_channels=1).state_dict(), gray)
    with pytest.raises(CheckpointError, match=r"grayscale .* set data\.in_channels: 1\.$"):
        load_weights(build_alexnet("torchvision", 2), str(gray), "torchvision")
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in imagenet.items() if not k.startswith("features.3")}, partial)
    with pytest.raises(CheckpointError, match=r"has no tensor features\.3\.weight"):
        load_weights(build_alexnet("torchvision", 2), str(partial), "torchvision")


def test_a_fit_from_imagenet_prints_what_it_loaded_and_records_imagenet_preprocessing(
    imagenet, image_folder, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)
    # The stand-in for ImageNet's file has torchvision's classifier, 4096 wide.
    args = fit_args(image_folder, "--config", FINETUNE, f"--model.hidden_features={IMAGENET_WIDTH}")
    cli = cli_main([*args, "--trainer.max_epochs=1"])
    text = "\n".join(record.getMessage() for record in caplog.records)
    # The test's --data.image_size=67 wins over the weights' 224, and says so in one line.
    assert "data.image_size: keeping 67, which the config sets, over the 224" in text
    assert "model.weights: loaded 14 of 16 tensors from ImageNet (" in text
    assert "classifier.6 starts fresh (1000 classes there, 3 here)" in text
    run = Path(cli.trainer.log_dir)
    record = load_checkpoint(run / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert record["arch"] == "torchvision"
    assert record["preprocessing"]["mean"] == pytest.approx(IMAGENET_MEAN)
    assert record["preprocessing"]["std"] == pytest.approx(IMAGENET_STD)
    # The convolutions were frozen for the epoch: still ImageNet's.
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert torch.equal(state["model.features.0.weight"], imagenet["features.0.weight"])
    # hparams.yaml shows the two parameter groups.
    groups = yaml.safe_load((run / "hparams.yaml").read_text())["param_groups"]
    assert groups["head"] == {"trains_from_epoch": 0, "lr": 1e-4}
    assert groups["backbone"]["trains_from_epoch"] == 2
    assert groups["backbone"]["lr"] == pytest.approx(1e-5)

    # Prediction normalizes with the recorded ImageNet mean and std, without being told.
    model = LitAlexNet.load_from_checkpoint(run / "checkpoints" / "last.ckpt").eval()
    image = sorted((image_folder / "val").rglob("*.jpg"))[0]
    probs = predict_probs(model, [(image, 0)])[0]
    data = ImageFolderDataModule(image_folder, image_size=67, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    pixels = data.eval_preset().read(image)[None]
    with torch.no_grad():
        logits = model(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD))
    expected = logits.softmax(dim=1)[0]
    assert torch.allclose(probs, expected, atol=1e-5)
    tutorial_normalized = normalize(pixels, [0.5] * 3, [0.5] * 3)
    with torch.no_grad():
        other = model(tutorial_normalized).softmax(dim=1)[0]
    assert not torch.allclose(probs, other, atol=1e-5)


class RecordBackbone(L.Callback):
    """After each training epoch: the backbone's weights, whether any has a gradient, and how
    many backbone tensors the optimizer holds state for."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        backbone = list(pl_module.backbone.parameters())
        optimizer = trainer.optimizers[0]
        self.epochs.append(
            {
                "weights": [p.detach().clone() for p in backbone],
                "grads": [p.grad is not None for p in backbone],
                "state": sum(p in optimizer.state for p in backbone),
                "lrs": [group["lr"] for group in optimizer.param_groups],
            }
        )


def test_frozen_backbone_gets_no_gradient_or_state_until_it_thaws(image_folder):
    data = ImageFolderDataModule(image_folder, image_size=67, batch_size=4, num_workers=0)
    model = LitAlexNet(
        data.num_classes, data.class_names, hidden_features=TINY_WIDTH,
        preprocessing=data.preprocessing,
    )  # fmt: skip
    start = [p.detach().clone() for p in model.backbone.parameters()]
    record = RecordBackbone()
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1)
    tiny_trainer(max_epochs=2, callbacks=[finetune, record]).fit(model, datamodule=data)
    frozen, thawed = record.epochs
    assert all(torch.equal(a, b) for a, b in zip(frozen["weights"], start, strict=True))
    assert not any(frozen["grads"]) and frozen["state"] == 0 and frozen["lrs"] == [1e-4]
    assert not any(torch.equal(a, b) for a, b in zip(thawed["weights"], start, strict=True))
    assert thawed["state"] == len(start)
    assert thawed["lrs"] == pytest.approx([1e-4, 1e-5])  # discriminative learning rates


@pytest.mark.slow
def test_resume_after_the_thaw_continues_the_schedule_exactly(tmp_path, caplog):
    # From weights trained with ImageNet's preprocessing (a narrow stand-in for ImageNet's, whose
    # 4096-wide classifier trains 10x slower), which the resumed fit must take from its checkpoint.
    start = tmp_path / "start.ckpt"
    model = LitAlexNet(3, arch="torchvision", hidden_features=TINY_WIDTH,
                       preprocessing=imagenet_preprocessing())  # fmt: skip
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, start)
    data = make_image_folder(tmp_path / "data", splits={"train": 2, "val": 1})
    overlay = edited_overlay(tmp_path, Path(FINETUNE), unfreeze_backbone_at_epoch=1)

    def fit(folder: str, *extra: str):
        (tmp_path / folder).mkdir(exist_ok=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp_path / folder)
            args = fit_args(data, "--config", overlay, f"--model.weights={start}",
                            "--trainer.deterministic=true", *extra)  # fmt: skip
            return cli_main(args)

    full = fit("a", "--trainer.max_epochs=3")
    fit("b", "--trainer.max_epochs=2")  # thawed at epoch 1, stopped after epoch 2
    caplog.clear()
    caplog.set_level(logging.INFO)
    resumed = fit("b", "--trainer.max_epochs=3", "--ckpt_path=last")
    assert not [r for r in caplog.records if "model.weights: loaded" in r.getMessage()]
    assert resumed.datamodule.preprocessing["mean"] == pytest.approx(IMAGENET_MEAN)
    for key, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[key]), f"resume differs in {key}"
    lrs = [[g["lr"] for g in cli.trainer.optimizers[0].param_groups] for cli in (full, resumed)]
    assert lrs[0] == lrs[1] == pytest.approx([1e-4, 2e-5])
    # TensorBoard has the backbone's rate from the thaw epoch on, each epoch's own.
    logged = read_scalars(tmp_path / "a" / "lightning_logs" / "version_0")["lr-Adam/pg2"]
    assert [value for _, value in logged] == pytest.approx([1e-5, 2e-5])


def test_missing_imagenet_file_offline_is_one_line(
    image_folder, tmp_path, monkeypatch, capsys, offline
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    line = cli_error_line(capsys, fit_args(image_folder, "--config", FINETUNE))
    folder = tmp_path / "empty" / "hub" / "checkpoints"
    assert line.startswith(
        f"error: model.weights: imagenet needs alexnet-owt-7be5be79.pth in {folder}, and it "
        "could not be downloaded (URLError); on a machine that is online run python -c"
    )
    assert not (tmp_path / "lightning_logs").exists()


def test_weights_of_another_architecture_end_a_fit_in_one_line(
    imagenet, image_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    line = cli_error_line(
        capsys, fit_args(image_folder, "--model.weights=imagenet", "--model.arch=tutorial")
    )
    assert line.startswith("error: model.weights 'ImageNet (")
    assert "tensor features.0.weight is [64, 3, 11, 11] there but [96, 3, 11, 11] here" in line


def test_weights_that_would_run_code_are_refused(
    crafted_checkpoint, image_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    line = cli_error_line(
        capsys, fit_args(image_folder, f"--model.weights={crafted_checkpoint.path}")
    )
    assert "was refused: it holds Python objects that could run code" in line
    assert not crafted_checkpoint.marker.exists()


def test_a_state_dict_in_torchs_older_file_format_loads_and_a_list_is_one_line(tmp_path):
    state = build_alexnet("tutorial", 2, hidden_features=8).state_dict()
    old = tmp_path / "old_format.pth"  # what torch wrote before 1.6, and still can
    torch.save(state, old, _use_new_zipfile_serialization=False)
    assert weights_preprocessing(str(old)) is None  # a .pth records no preprocessing
    loaded, _ = read_state_dict(str(old), "tutorial")
    assert all(torch.equal(loaded[key], tensor) for key, tensor in state.items())

    listed = tmp_path / "list.pth"
    torch.save([state], listed)
    assert weights_preprocessing(str(listed)) is None
    with pytest.raises(CheckpointError, match=r"list\.pth' holds no state dict; check the file"):
        read_state_dict(str(listed), "tutorial")


def test_a_weights_only_file_as_ckpt_path_points_at_model_weights(
    tiny_ckpt, tiny_run, tmp_path, monkeypatch, capsys
):
    # tiny_ckpt was saved with save_weights_only, as scripts/import_tutorial_weights.py saves.
    monkeypatch.chdir(tmp_path)
    line = cli_error_line(capsys, fit_args(tiny_run / "data", f"--ckpt_path={tiny_ckpt}"))
    # That run has no last.ckpt beside it (test_epoch_costs.py has one that does).
    assert line == (
        f"error: --ckpt_path '{tiny_ckpt}' holds weights only (no optimizer or loop state), so "
        f"there is no fit to resume: start a new fit from these weights with --model.weights "
        f"{tiny_ckpt}."
    )


def test_a_finder_searches_from_the_weights_the_fit_starts_from(tiny_ckpt, tmp_path, monkeypatch):
    # The LR finder trains in its on_fit_start, before the module's, and then restores the model
    # it started from: that must be the checkpoint's network, not random weights.
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", splits={"train": 2, "val": 1})
    lr_find = ROOT / "configs" / "tools" / "lr_find.yaml"
    overlay = edited_overlay(tmp_path, lr_find, num_training_steps=2, early_stop_threshold=None)
    cli = cli_main(fit_args(data, "--config", overlay, f"--model.weights={tiny_ckpt}"))
    assert (tmp_path / "lightning_logs" / "version_0" / "lr_find.json").is_file()
    trained = load_checkpoint(tiny_ckpt)["state_dict"]
    for key, tensor in cli.model.model.features.state_dict().items():
        assert torch.equal(tensor, trained[f"model.features.{key}"]), key


@pytest.mark.parametrize(
    ("extra", "start", "end"),
    [
        (["--config", str(ROOT / "configs" / "experiments" / "onecycle.yaml")],
         "error: BackboneFinetuning sets the backbone's learning rate itself",
         "leave out the scheduler overlay or configs/finetune.yaml."),
        (["--model.no_decay_bias=true"],
         "error: BackboneFinetuning adds the backbone's optimizer group with weight decay",
         "pass --model.no_decay_bias false with configs/finetune.yaml."),
    ],
)  # fmt: skip
def test_what_the_finetune_schedule_cannot_reach_is_one_line(
    extra, start, end, imagenet, image_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = fit_args(image_folder, "--config", FINETUNE, f"--model.hidden_features={IMAGENET_WIDTH}")
    line = cli_error_line(capsys, [*args, *extra])
    assert line.startswith(start) and line.endswith(end)
