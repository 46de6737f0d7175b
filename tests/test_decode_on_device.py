"""data.decode_on_device: workers read JPEG bytes, the main process decodes and augments them."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2.functional import pil_to_tensor

from alexnet_lit.cli import cli_main
from alexnet_lit.data import DataConfigError, EncodedCollate, ImageFolderDataModule
from alexnet_lit.device_decode import DeviceAugment, crop_box, decode_batch, decode_jpegs
from alexnet_lit.images import load_image
from alexnet_lit.transforms import eval_transform
from tests.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "default.yaml")
SIZE = 48
# Normal and device paths differ only by their JPEG decoders: on CPU both are libjpeg-turbo and
# agree exactly (measured: 0.0); nvJPEG may round and upsample chroma differently (not measured
# here). 0.02 in normalized units ([-1, 1]) is 2.5 levels of 255 on average; one EXIF-rotated
# image left unrotated moves its batch of 4 by 0.074 (measured), a wrong normalization by more.
MEAN_ABS_TOLERANCE = 0.02


def broken_jpeg(path: Path) -> None:
    """A JPEG whose header reads fine (it passes the scan) but whose Huffman table is garbage."""
    pixels = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    table = data.index(b"\xff\xc4")
    data[table + 5 : table + 21] = b"\xff" * 16
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    """3 classes of plain JPEGs, plus in train/bee and val/bee: a PNG, a CMYK JPEG, an
    EXIF-rotated JPEG (40x20 stored, 20x40 shown) and a broken JPEG."""
    root = make_image_folder(tmp_path_factory.mktemp("odd") / "data", splits={"train": 3, "val": 3})
    for split in ("train", "val"):
        folder = root / split / "bee"
        Image.new("RGB", (30, 20), (20, 200, 60)).save(folder / "x_png.png")
        Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(folder / "x_cmyk.jpg")
        gradient = np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None].repeat(20, 0)
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        Image.fromarray(gradient.repeat(3, 2)).save(folder / "x_rotated.jpg", exif=exif)
        broken_jpeg(folder / "x_broken.jpg")
    return root


def data_module(root: Path, **kwargs) -> ImageFolderDataModule:
    kwargs = {"batch_size": 4, "num_workers": 0, "image_size": SIZE, **kwargs}
    return ImageFolderDataModule(root, **kwargs)


def batches(dm: ImageFolderDataModule, loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [dm.on_before_batch_transfer(batch, 0) for batch in loader]


def sample(dm: ImageFolderDataModule, split: str, name: str):
    """The dataset item of ``split/name`` (name: ``class/file``)."""
    dataset = dm.datasets[split]
    (index,) = [i for i, (path, _) in enumerate(dataset.samples) if path.match(name)]
    return dataset[index]


def test_workers_send_plain_jpeg_bytes_and_decode_the_rest(odd_data):
    dm = data_module(odd_data, decode_on_device=True)
    dm.setup("validate")
    plain, _, _ = sample(dm, "val", "ant/img_0.jpg")
    assert plain.dtype == torch.uint8 and plain.ndim == 1  # encoded bytes
    assert bytes(plain.numpy()) == (odd_data / "val" / "ant" / "img_0.jpg").read_bytes()
    assert sample(dm, "val", "bee/x_broken.jpg")[0].ndim == 1  # its header is plain: bytes too
    for name in ("bee/x_png.png", "bee/x_cmyk.jpg", "bee/x_rotated.jpg"):
        image, _, path = sample(dm, "val", name)
        assert torch.equal(image, pil_to_tensor(load_image(path)))  # uint8 [C,H,W]
    assert sample(dm, "val", "bee/x_rotated.jpg")[0].shape == (3, 40, 20)  # EXIF applied
    dm.setup("predict")  # predict keeps the normal path: whole decoded, transformed batches
    images, _ = dm.on_before_batch_transfer(next(iter(dm.predict_dataloader())), 0)
    assert images.shape == (4, 3, SIZE, SIZE)
    gray = data_module(odd_data, decode_on_device=True, in_channels=1)
    gray.setup("validate")
    assert sample(gray, "val", "ant/img_0.jpg")[0].shape[0] == 1  # grayscale: decoded by workers


def test_eval_batches_match_the_normal_path(odd_data):
    normal, device = data_module(odd_data), data_module(odd_data, decode_on_device=True)
    normal.setup("validate")
    device.setup("validate")
    expected = batches(normal, normal.val_dataloader())
    got = batches(device, device.val_dataloader())
    assert len(got) == len(expected)
    for (images, targets), (want_images, want_targets) in zip(got, expected, strict=True):
        assert images.shape == want_images.shape and images.dtype == want_images.dtype
        assert torch.equal(targets, want_targets) and targets.dtype == torch.long
        assert (images - want_images).abs().mean() < MEAN_ABS_TOLERANCE
    # One bad file fails decode_jpeg's batched call; the others of its batch still arrive.
    names = [path.name for path, _ in device.datasets["val"].samples if path.name != "x_broken.jpg"]
    rotated = torch.cat([images for images, _ in got])[names.index("x_rotated.jpg")]
    # Stored dark (left) to bright (right), shown rotated clockwise: dark top, bright bottom.
    assert rotated[:, -1].mean() - rotated[:, 0].mean() > 0.5
    assert (rotated[:, :, -1].mean() - rotated[:, :, 0].mean()).abs() < 0.1
    broken = str(odd_data / "val" / "bee" / "x_broken.jpg")
    assert list(device.skipped) == list(normal.skipped) == [broken]
    assert device.skipped[broken][0] == normal.skipped[broken][0]  # the same reason


def test_all_bad_batch_is_the_normal_empty_batch(odd_data):
    dm = data_module(odd_data, decode_on_device=True)
    dm.setup("validate")
    batch = EncodedCollate(train=False)([sample(dm, "val", "bee/x_broken.jpg")])
    images, targets = dm.on_before_batch_transfer(batch, 0)
    assert images.shape == (0, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert targets.shape == (0,) and targets.dtype == torch.long


@pytest.mark.parametrize("augment", ["tutorial", "strong"])
def test_training_batches_are_augmented_and_seeded(odd_data, augment):
    dm = data_module(odd_data, decode_on_device=True, augment=augment, crop_scale=(0.2, 0.5))
    dm.setup("fit")
    torch.manual_seed(0)
    first = batches(dm, dm.train_dataloader())
    images = torch.cat([images for images, _ in first])
    targets = torch.cat([targets for _, targets in first])
    assert images.shape == (len(dm.datasets["train"]) - 1, 3, SIZE, SIZE)  # less the broken one
    assert images.dtype == torch.float32 and targets.dtype == torch.long
    assert images.min() >= -1.0 and images.max() <= 1.0  # RandomErasing writes zeros
    assert images.std() > 0.1  # not all erased or blank
    torch.manual_seed(0)
    again = batches(dm, dm.train_dataloader())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    # The same four images through the eval preset are center crops; random crops of at most
    # half the area are not.
    samples = [dm.datasets["val"][i] for i in range(4)]
    cropped, _ = dm.on_before_batch_transfer(EncodedCollate(train=True)(samples), 0)
    centered, _ = dm.on_before_batch_transfer(EncodedCollate(train=False)(samples), 0)
    assert (cropped - centered).abs().mean() > 0.05


@pytest.mark.parametrize("size", [(30, 40), (10, 200)])  # (10, 200) often needs the fallback
def test_crop_box_samples_like_torchvision(size):
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    torch.manual_seed(0)
    ours = torch.tensor([crop_box(size, scale, ratio) for _ in range(3000)], dtype=torch.float)
    image = torch.zeros(1, *size)
    theirs = torch.tensor(
        [RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(3000)],
        dtype=torch.float,
    )
    top, left, height, width = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
    assert (top + height <= size[0]).all() and (left + width <= size[1]).all()
    # Same distribution: means of top, left, height and width within 4% of the image side.
    sides = torch.tensor([size[0], size[1], size[0], size[1]], dtype=torch.float)
    assert ((ours.mean(0) - theirs.mean(0)).abs() / sides < 0.04).all()


def test_encoded_batch_survives_pin_memory(odd_data, monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory

    # On CUDA the loader pins each batch; pinning needs CUDA, the rebuilt structure is checked.
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args: self)
    dm = data_module(odd_data, decode_on_device=True)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    pinned = pin_memory(batch)
    assert type(pinned) is type(batch) and pinned.paths == batch.paths and pinned.train is False
    assert all(torch.equal(a, b) for a, b in zip(pinned.images, batch.images, strict=True))
    images, _ = dm.on_before_batch_transfer(pinned, 0)
    assert images.shape == (4, 3, SIZE, SIZE)


def test_broken_jpeg_with_on_bad_image_error_names_the_file(odd_data):
    dm = data_module(odd_data, decode_on_device=True, on_bad_image="error")
    dm.setup("validate")
    with pytest.raises(DataConfigError, match=r"unreadable image '.*x_broken\.jpg'"):
        batches(dm, dm.val_dataloader())


def test_cli_fit_decodes_on_device(odd_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        ["fit", "--config", DEFAULT_CONFIG, f"--data.data_dir={odd_data}",
         "--config", str(ROOT / "configs" / "decode_on_device.yaml"),
         "--data.image_size=96", "--data.batch_size=4",
         "--data.num_workers=1", "--trainer.fast_dev_run=1"]
    )  # fmt: skip
    assert cli.datamodule.hparams.decode_on_device is True
    assert type(cli.datamodule.datasets["train"]).__name__ == "EncodedImageDataset"
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])


# On a GPU machine (skipped here): the nvJPEG path itself. ------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def smooth_jpegs(folder: Path, count: int, size: int = 256) -> list[Path]:
    """Photo-like JPEGs (smooth gradients): decoders then differ by rounding, not by how they
    upsample the chroma of noise."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        pixels = np.stack([x, y, (x + y + i / count) % 1.0], axis=-1) * 255
        paths.append(folder / f"smooth_{i}.jpg")
        Image.fromarray(pixels.astype(np.uint8)).save(paths[-1], quality=95)
    return paths


@cuda_only
def test_gpu_decode_matches_the_cpu_decode(tmp_path):
    paths = [str(p) for p in smooth_jpegs(tmp_path, 6)]
    encoded = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    augment = DeviceAugment(eval_transform(SIZE))
    cpu, _ = decode_batch(encoded, paths, torch.device("cpu"))
    gpu, failures = decode_batch(encoded, paths, torch.device("cuda"))
    assert not failures and all(image.is_cuda for image in gpu)
    difference = (augment(gpu).cpu() - augment(cpu)).abs().mean()
    assert difference < MEAN_ABS_TOLERANCE


@cuda_only
def test_gpu_decode_never_writes_memory_queued_kernels_still_read(tmp_path):
    """torchvision's decoder writes from its own stream; it must never be handed a block that
    kernels queued on the training stream still read (pytorch/vision PR 9606)."""
    device = torch.device("cuda")
    paths = smooth_jpegs(tmp_path, 8)
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    for _ in range(10):
        # Blocks of exactly the decoded size, filled, then read by kernels queued behind a
        # ~0.1 s spin, and freed before those kernels run.
        blocks = [torch.full((3, 256, 256), 7, dtype=torch.uint8, device=device) for _ in paths]
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)
        sums = [block.sum(dtype=torch.int64) for block in blocks]
        del blocks
        decoded = decode_jpegs(encoded, device)
        torch.cuda.synchronize()
        assert all(image is not None for image in decoded)
        assert torch.stack(sums).eq(7 * 3 * 256 * 256).all()


@cuda_only
def test_cli_fit_on_gpu_decodes_on_device(odd_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        ["fit", "--config", DEFAULT_CONFIG, "--config", str(ROOT / "configs" / "fast.yaml"),
         "--config", str(ROOT / "configs" / "decode_on_device.yaml"),
         f"--data.data_dir={odd_data}", "--data.image_size=96", "--data.batch_size=4",
         "--data.num_workers=1", "--trainer.accelerator=gpu", "--trainer.devices=1",
         "--trainer.fast_dev_run=2"]
    )  # fmt: skip
    assert cli.trainer.strategy.root_device.type == "cuda"
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])
