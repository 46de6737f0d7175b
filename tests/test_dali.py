"""data.backend: dali, run on the CPU (device_id=None): the same images, labels and presets as the
PIL path, exact shards, unreadable images skipped and recorded, and a fit through the CLI."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alexnet_lit import ImageFolderDataModule
from alexnet_lit.data import dali as dali_backend
from alexnet_lit.data.dali import DALILoader, DALIPreset
from alexnet_lit.errors import DataConfigError
from alexnet_lit.training.cli import cli_main
from tests.conftest import make_image_folder
from tests.helpers import cli_error_line, fit_args, read_csv

pytest.importorskip("nvidia.dali", reason="DALI is a Linux-only extra: pip install -e '.[dali]'")

SIZE = 67


def broken_jpeg(path: Path, like: Path) -> Path:
    """A JPEG whose header reads fine (it passes the scan) but whose Huffman table is garbage."""
    data = bytearray(like.read_bytes())
    table = data.index(b"\xff\xc4")
    data[table + 5 : table + 21] = b"\xff" * 16
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", splits={"train": 4, "val": 3})


def data_module(root: Path, **kwargs) -> ImageFolderDataModule:
    kwargs = {"batch_size": 4, "num_workers": 1, "image_size": SIZE, **kwargs}
    return ImageFolderDataModule(root, **kwargs)


def pil_batches(dm: ImageFolderDataModule, loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [dm.on_after_batch_transfer(dm.on_before_batch_transfer(b, 0), 0) for b in loader]


def test_evaluation_batches_match_the_pil_path(data):
    pil, dali = data_module(data), data_module(data, backend="dali")
    pil.setup("validate")
    dali.setup("validate")
    expected = pil_batches(pil, pil.val_dataloader())
    got = list(dali.val_dataloader())
    assert len(got) == len(expected) == len(dali.val_dataloader())
    for (images, targets), (want_images, want_targets) in zip(got, expected, strict=True):
        assert images.shape == want_images.shape and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(targets, want_targets) and targets.dtype == torch.long
        assert images.min() >= -1.0 and images.max() <= 1.0
        # The same preset, resampled by another library: a few levels of 255 apart.
        assert (images - want_images).abs().mean() < 0.05


def test_training_batches_cover_the_split_with_random_crops(data):
    dm = data_module(data, backend="dali")
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = list(loader)
    targets = torch.cat([t for _, t in first])
    assert sorted(targets.tolist()) == sorted(t for _, t in dm.datasets["train"].samples)
    assert all(images.shape[1:] == (3, SIZE, SIZE) for images, _ in first)
    second = list(loader)  # the next epoch: another permutation, other crops
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, second, strict=True))


def test_a_loader_made_for_a_resumed_epoch_reads_what_the_uninterrupted_one_does(data):
    dm = data_module(data)
    dm.setup("fit")
    preset = DALIPreset(SIZE, 77, 3, (0.5,) * 3, (0.5,) * 3, train=True)
    samples = dm.datasets["train"].samples
    uninterrupted = DALILoader(samples, preset, 4)
    list(uninterrupted)  # epoch 0
    expected = list(uninterrupted)  # epoch 1
    resumed = list(DALILoader(samples, preset, 4, epoch=lambda: 1))
    for (images, targets), (want_images, want_targets) in zip(resumed, expected, strict=True):
        assert torch.equal(targets, want_targets) and torch.equal(images, want_images)


def loaders(samples, train: bool, world_size: int) -> list[DALILoader]:
    preset = DALIPreset(SIZE, 77, 3, (0.5,) * 3, (0.5,) * 3, train=train)
    return [DALILoader(samples, preset, 2, rank, world_size) for rank in range(world_size)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_exact_for_evaluation_and_equal_for_training(data, world_size):
    dm = data_module(data)
    dm.setup("fit")
    samples = dm.datasets["val"].samples  # 9 images: no split is even
    shards = [loader.shard(0) for loader in loaders(samples, False, world_size)]
    seen = [path for shard in shards for path, _ in shard]
    assert sorted(seen) == sorted(str(path) for path, _ in samples)  # each exactly once
    counted = sum(
        len(targets) for loader in loaders(samples, False, world_size) for _, targets in loader
    )
    assert counted == len(samples)
    train = loaders(dm.datasets["train"].samples, True, world_size)
    sizes = {len(loader.shard(0)) for loader in train}
    assert len(sizes) == 1  # the same number of steps on every rank
    covered = {path for loader in train for path, _ in loader.shard(0)}
    assert covered == {str(path) for path, _ in dm.datasets["train"].samples}
    assert train[0].shard(0) != train[0].shard(1)  # reshuffled each epoch
    # More ranks than twice the images: the padding repeats the order as often as it takes.
    many = loaders(dm.datasets["train"].samples, True, 3 * len(dm.datasets["train"]))
    assert {len(loader.shard(0)) for loader in many} == {1}


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_fewer_evaluation_images_than_processes_is_one_line(backend, data):
    dm = data_module(data, backend=backend)
    dm.setup("validate")
    images = len(dm.datasets["val"])
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = SimpleNamespace(  # what the loaders read of a DDP trainer
        world_size=images + 1, global_rank=0, strategy=cpu, current_epoch=0
    )
    with pytest.raises(DataConfigError, match=f"{images} evaluation images cannot be split over"):
        dm.val_dataloader()


def test_an_image_dali_cannot_decode_is_skipped_and_recorded(data, tmp_path):
    bad = broken_jpeg(data / "val" / "bee" / "x_broken.jpg", data / "val" / "bee" / "img_0.jpg")
    broken_jpeg(data / "train" / "bee" / "x_broken.jpg", data / "train" / "bee" / "img_0.jpg")
    dm = data_module(data, backend="dali", batch_size=2)
    dm.setup("fit")
    assert str(bad) in {str(path) for path, _ in dm.datasets["val"].samples}  # passed the scan
    scored = sum(len(targets) for _, targets in dm.val_dataloader())
    assert scored == len(dm.datasets["val"]) - 1  # every other image once
    train = dm.train_dataloader()
    steps = len(train)
    assert sum(1 for _ in train) == steps  # the step count stays: DDP ranks keep in step
    assert set(dm.skipped.entries) == {str(bad), str(data / "train" / "bee" / "x_broken.jpg")}
    assert {when for _, when in dm.skipped.entries.values()} == {"load"}


def test_images_dali_cannot_open_are_left_out_at_the_scan_and_recorded(data):
    from PIL import Image

    gif = data / "val" / "bee" / "anim.gif"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(gif)
    latin1 = data / "val" / "bee" / "caf\udce9.jpg"  # b"caf\xe9.jpg": a Latin-1 name
    latin1.write_bytes((data / "val" / "bee" / "img_0.jpg").read_bytes())
    pil = data_module(data)
    pil.setup("validate")
    assert {str(gif), str(latin1)} <= {str(path) for path, _ in pil.datasets["val"].samples}

    dm = data_module(data, backend="dali")
    with pytest.warns(UserWarning, match="2 unreadable image"):
        dm.setup("validate")
    assert sum(len(targets) for _, targets in dm.val_dataloader()) == len(pil.datasets["val"]) - 2
    reasons = {path: reason for path, (reason, _) in dm.skipped.entries.items()}
    assert reasons[str(gif)].startswith("DALI cannot decode GIF")
    assert reasons[str(latin1)].startswith("DALI cannot open a file whose name is not UTF-8")


def test_cli_fit_on_dali_records_what_it_skipped(data, tmp_path, monkeypatch):
    broken_jpeg(data / "train" / "ant" / "x_broken.jpg", data / "train" / "ant" / "img_0.jpg")
    monkeypatch.chdir(tmp_path)
    overlay = str(Path(__file__).resolve().parents[1] / "configs" / "dali.yaml")
    cli = cli_main(
        fit_args(
            data, "--config", overlay, "--data.num_workers=1", "--data.batch_size=4",
            "--trainer.max_epochs=1",
        )
    )  # fmt: skip
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])
    assert 0.0 <= float(cli.trainer.callback_metrics["val/acc"]) <= 1.0
    rows = read_csv(tmp_path / "lightning_logs" / "version_0" / "skipped_images.csv")
    assert [(Path(row["path"]).name, row["when"]) for row in rows] == [("x_broken.jpg", "load")]


@pytest.mark.slow
def test_a_resumed_dali_fit_ends_with_the_uninterrupted_fits_weights(data, tmp_path, monkeypatch):
    overlay = str(Path(__file__).resolve().parents[1] / "configs" / "dali.yaml")
    common = ["--config", overlay, "--data.num_workers=1", "--trainer.deterministic=true"]
    (tmp_path / "full").mkdir()
    (tmp_path / "resumed").mkdir()
    monkeypatch.chdir(tmp_path / "full")
    full = cli_main(fit_args(data, *common, "--trainer.max_epochs=2"))
    monkeypatch.chdir(tmp_path / "resumed")
    cli_main(fit_args(data, *common, "--trainer.max_epochs=1"))
    resumed = cli_main(fit_args(data, *common, "--trainer.max_epochs=2", "--ckpt_path=last"))
    weights = resumed.model.state_dict()
    for key, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, weights[key]), key  # epoch 1's order and crops, not epoch 0's


def test_missing_dali_is_one_line_naming_the_extra(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now fails
    line = cli_error_line(capsys, fit_args(data, "--data.backend=dali"))
    assert line.startswith("error: data.backend: dali needs NVIDIA DALI")
    assert "pip install -e '.[dali]'" in line and "data.backend: pil" in line


def test_a_dali_for_another_cuda_names_the_wheel_to_install(monkeypatch):
    import nvidia.dali

    monkeypatch.setattr(nvidia.dali, "__cuda_version__", 12080)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(DataConfigError, match=r"built for CUDA 12 but this torch for CUDA 13; "):
        dali_backend.require_dali()
    with pytest.raises(DataConfigError, match=r"pip install nvidia-dali-cuda130"):
        dali_backend.require_dali()


def test_presets_the_dali_path_lacks_are_refused(data):
    with pytest.raises(DataConfigError, match=r"data\.augment: strong runs on the pil backend"):
        data_module(data, backend="dali", augment="strong")
