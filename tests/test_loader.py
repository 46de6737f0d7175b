"""The uint8 loader: presets that decode only what the crop needs, normalization on the device."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms import functional as TF

from alexnet_lit import ImageFolderDataModule
from alexnet_lit.data import presets
from alexnet_lit.data.images import load_image
from alexnet_lit.data.presets import EvalPreset, TrainPreset
from alexnet_lit.preprocessing import normalize
from alexnet_lit.training.cli import cli_main
from tests.conftest import make_image_folder
from tests.dirty_data import mode_images
from tests.helpers import fit_args


def photo(path: Path, size: tuple[int, int], exif_orientation: int = 1) -> Path:
    """A smooth photo-like JPEG: gradients decoders agree on, with a little texture."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 230
    pixels += 12 * np.sin(x / 7.0)[..., None]
    exif = Image.Exif()
    if exif_orientation != 1:
        exif[0x0112] = exif_orientation
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image.save(path, quality=92, exif=exif)
    return path


class DecodedSizes:
    """Records the size each image is decoded at (what the presets convert after ``load``)."""

    def __init__(self, monkeypatch) -> None:
        self.sizes: list[tuple[int, int]] = []
        convert = presets.to_rgb_or_l

        def spy(image, in_channels=3):
            self.sizes.append(image.size)
            return convert(image, in_channels)

        monkeypatch.setattr(presets, "to_rgb_or_l", spy)


def test_random_crops_are_torchvisions_own(tmp_path):
    # The same seed gives the same boxes as torchvision's RandomResizedCrop, and the flip after
    # it draws as RandomHorizontalFlip does: the RNG stream is left where torchvision leaves it.
    path = photo(tmp_path / "a.jpg", (500, 375))
    image = load_image(path)
    preset = TrainPreset(224)
    tutorial = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip()])
    for seed in range(20):
        torch.manual_seed(seed)
        box = preset.crop_box(*image.size)
        torch.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        assert box == (left, top, left + w, top + h)
        torch.manual_seed(seed)
        preset.read(path)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        tutorial(image)
        assert torch.rand(1) == after_ours  # crop and flip drew the same numbers


@pytest.mark.parametrize("size", [(500, 375), (10, 200), (4000, 3000)])
def test_the_crop_distribution_matches_torchvision(size):
    # Independent draws: the boxes' statistics agree with get_params on an image of that size.
    width, height = size
    torch.manual_seed(0)
    ours = torch.tensor([TrainPreset(224).crop_box(width, height) for _ in range(3000)]).float()
    image = torch.empty(()).expand(1, height, width)
    theirs = []
    for _ in range(3000):
        top, left, h, w = RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        theirs.append((left, top, left + w, top + h))
    theirs = torch.tensor(theirs, dtype=torch.float)
    sides = torch.tensor([width, height, width, height], dtype=torch.float)
    assert ((ours.mean(0) - theirs.mean(0)).abs() / sides < 0.03).all()
    assert ((ours.std(0) - theirs.std(0)).abs() / sides < 0.03).all()
    assert (ours[:, 0] >= 0).all() and (ours[:, 2] <= width).all() and (ours[:, 3] <= height).all()


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    path = photo(tmp_path / "big.jpg", (2400, 1800))
    decoded = DecodedSizes(monkeypatch)
    # Eval: the short side goes to 256, so a 1/4 decode (600x450) still covers the crop.
    read = EvalPreset(224).read(path)
    assert decoded.sizes == [(600, 450)]
    full = EvalPreset(224)(load_image(path))
    assert read.shape == full.shape == (224, 224, 3) and read.dtype == torch.uint8
    assert (read.float() - full.float()).abs().mean() < 2.0  # levels of 255: the same picture
    # Train: each crop is decoded at the largest scale that leaves it at least 224 px.
    boxes = []
    for seed in range(50):
        torch.manual_seed(seed)
        boxes.append(TrainPreset(224).crop_box(2400, 1800))
        torch.manual_seed(seed)
        TrainPreset(224).read(path)
    for (left, top, right, bottom), decoded_size in zip(boxes, decoded.sizes[1:], strict=True):
        scale = 2400 // decoded_size[0]
        assert scale in (1, 2, 4, 8)
        assert min(right - left, bottom - top) / scale >= 224  # never below the output size
        assert min(right - left, bottom - top) / (2 * scale) < 224 or scale == 8  # the largest


def test_a_reduced_decode_gives_the_full_decodes_crop(tmp_path):
    path = photo(tmp_path / "big.jpg", (2400, 1800))
    image = load_image(path)
    for seed in range(5):
        torch.manual_seed(seed)
        fast = TrainPreset(224).read(path)
        torch.manual_seed(seed)
        slow = TrainPreset(224)(image)
        assert (fast.float() - slow.float()).abs().mean() < 3.0


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_before_the_crop(orientation, tmp_path, monkeypatch):
    path = photo(tmp_path / "rotated.jpg", (2400, 1600), exif_orientation=orientation)
    shown = load_image(path)
    assert shown.size == ((1600, 2400) if orientation in (6, 8) else (2400, 1600))
    decoded = DecodedSizes(monkeypatch)
    read = EvalPreset(224).read(path)
    assert decoded.sizes and decoded.sizes[0][0] < 2400  # reduced, and still right side up:
    assert (read.float() - EvalPreset(224)(shown).float()).abs().mean() < 2.0


def test_every_mode_reads_as_load_image_converts_it(tmp_path):
    for path in mode_images(tmp_path):
        for in_channels in (3, 1):
            read = EvalPreset(48, in_channels=in_channels).read(path)
            expected = EvalPreset(48, in_channels=in_channels)(load_image(path, in_channels))
            assert read.shape == (48, 48, in_channels) and torch.equal(read, expected), path


def test_eval_preset_is_torchvisions_resize_and_center_crop(tmp_path):
    image = load_image(photo(tmp_path / "a.jpg", (500, 375)))
    ours = EvalPreset(224)(image)
    theirs = TF.pil_to_tensor(TF.center_crop(TF.resize(image, 256), 224)).permute(1, 2, 0)
    assert (ours.int() - theirs.int()).abs().max() <= 1  # the same sampling, rounding aside


def test_normalize_matches_torchvisions_to_float_and_normalize():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    expected = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(images))
    got = normalize(images.permute(0, 2, 3, 1), mean, std)  # the presets' [B, H, W, C]
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected)


def test_workers_send_uint8_and_the_device_gets_normalized_floats(tmp_path):
    data = make_image_folder(tmp_path / "data")
    dm = ImageFolderDataModule(data, batch_size=4, num_workers=0, image_size=67)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 67, 67, 3)
    images, targets = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
    assert images.dtype == torch.float32 and images.shape == (4, 3, 67, 67)
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0.1
    torch.testing.assert_close(images, normalize(batch.images, [0.5] * 3, [0.5] * 3))
    assert torch.equal(targets, batch.targets)


@pytest.mark.slow
def test_the_number_of_loader_workers_does_not_change_what_a_fit_learns(image_folder, tmp_path):
    # Each image's crop and flip come from the seed its sampler index carries, not from the
    # random stream of whichever process reads it.
    weights = []
    for workers in (0, 2):
        folder = tmp_path / f"workers_{workers}"
        folder.mkdir()
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(folder)
            cli = cli_main(
                fit_args(image_folder, f"--data.num_workers={workers}",
                         "--trainer.deterministic=true", "--trainer.max_epochs=2")
            )  # fmt: skip
        weights.append(cli.model.state_dict())
    for key, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][key]), key
