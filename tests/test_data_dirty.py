"""Dirty data: hidden entries, non-images, broken and odd-mode images, splits, imbalance, doctor."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from alexnet_lit import LitAlexNet
from alexnet_lit.data import DataConfigError, ImageFolderDataModule, index
from alexnet_lit.data.datasets import BadImage, SkippingCollate
from alexnet_lit.data.doctor import check_data_main
from alexnet_lit.data.folders import identical_files, scan_split, split_train_val
from alexnet_lit.data.images import load_image
from alexnet_lit.data.presets import EvalPreset, TrainPreset
from alexnet_lit.data.samplers import BalancedSampler, ShuffledSampler
from alexnet_lit.preprocessing import normalize
from alexnet_lit.training.cli import cli_main
from tests.conftest import make_image_folder
from tests.dirty_data import CLASSES, make_dirty_folder
from tests.helpers import ROOT, cli_error_line, fit_args, read_csv, tiny_fit


@pytest.fixture
def dirty(tmp_path):
    return make_dirty_folder(tmp_path / "data")


def doctor(capsys, *args: str) -> tuple[int, str]:
    code = check_data_main([str(arg) for arg in args])
    return code, capsys.readouterr().out


# The data doctor ------------------------------------------------------------------------------


def test_doctor_json_reports_every_case(dirty, capsys):
    train, val = dirty.root / "train", dirty.root / "val"
    shutil.copy(train / "ant" / "img_0.jpg", val / "ant" / "leak.jpg")  # train/val leak
    shutil.copy(train / "bee" / "img_1.jpg", train / "bee" / "copy.jpg")  # duplicate in train
    code, out = doctor(capsys, dirty.root, "--json")
    report = json.loads(out)
    assert code == 1

    train_counts = Counter(p.relative_to(train).parts[0] for p in dirty.healthy["train"])
    train_counts["bee"] += 1  # copy.jpg
    train_counts["cat"] += 1  # corrupt_pixels.png passes the cheap checks
    assert report["splits"]["train"]["classes"] == dict(train_counts)
    assert report["splits"]["val"]["classes"] == {"ant": 3, "bee": 2, "cat": 2}
    assert report["splits"]["train"]["imbalance_ratio"] == pytest.approx(14 / 4)
    assert report["splits"]["train"]["width"]["min"] == 5  # tiny.png
    assert report["splits"]["train"]["width"]["max"] == 40
    assert {"L", "P", "RGBA", "LA", "CMYK", "I;16", "1", "RGB"} <= set(
        report["splits"]["train"]["modes"]
    )

    unreadable = {Path(d["path"]): d["reason"] for d in report["unreadable"]}
    assert set(unreadable) == set(dirty.unreadable)
    for path, word in dirty.unreadable.items():
        assert word in unreadable[path], (path, unreadable[path])
    assert {Path(d["path"]) for d in report["not_images"]} == set(dirty.not_images)
    assert {Path(p) for p in report["hidden"]} == set(dirty.hidden)
    assert report["empty_classes"] == {"train": [], "val": []}
    assert report["duplicates_across_splits"] == [
        {"hash": report["duplicates_across_splits"][0]["hash"],
         "paths": [str(train / "ant" / "img_0.jpg"), str(val / "ant" / "leak.jpg")]}
    ]  # fmt: skip
    assert report["duplicates_within_split"]["train"] == [
        [str(train / "bee" / "copy.jpg"), str(train / "bee" / "img_1.jpg")]
    ]
    assert any("5 unreadable" in e for e in report["errors"])
    assert any("more than one split" in e for e in report["errors"])
    assert any("2 file(s) that are not images" in w for w in report["warnings"])


def test_files_shared_between_splits_are_found_reading_only_likely_copies(tmp_path, monkeypatch):
    def write(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    leak_train, leak_val = write("t_leak", b"AAAA"), write("v_leak", b"AAAA")
    same_size_train, same_size_val = write("t_other", b"BBBB"), write("v_other", b"CCCC")
    within = [write("t_copy1", b"DDDDDD"), write("t_copy2", b"DDDDDD")]  # one split only
    unique = write("v_unique", b"E" * 9)
    read = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self) or real_read_bytes(self))
    files = {
        "train": [leak_train, same_size_train, *within],
        "val": [leak_val, same_size_val, unique],
    }
    across = identical_files(files, across_splits=True)
    assert [[path for _, path in group] for _, group in across] == [[leak_train, leak_val]]
    # Read whole: only the files whose size and first bytes another split shares.
    assert set(read) == {leak_train, leak_val}
    # Without across_splits, the copies within one split are found too (the doctor's search).
    every = [[path for _, path in group] for _, group in identical_files(files)]
    assert every == [within, [leak_train, leak_val]]  # sorted by their first path


def test_doctor_text_report_and_exit_codes(dirty, tmp_path, capsys):
    code, out = doctor(capsys, dirty.root)
    assert code == 1 and "Verdict: NOT usable as is." in out
    for path in [*dirty.unreadable, *dirty.not_images]:
        assert str(path) in out
    assert "ERROR: 5 unreadable image(s)" in out

    clean = make_image_folder(tmp_path / "clean")
    code, out = doctor(capsys, clean)
    assert code == 0 and "Verdict: usable as is." in out
    assert "train/: 12 images, 3 classes, imbalance 1.00:1" in out

    assert check_data_main([str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_doctor_decode_finds_images_that_only_fail_to_decode(dirty, capsys):
    code, out = doctor(capsys, dirty.root, "--json", "--decode")
    assert code == 1
    unreadable = {Path(d["path"]): d["reason"] for d in json.loads(out)["unreadable"]}
    assert set(unreadable) == set(dirty.unreadable) | set(dirty.load_fails)
    assert unreadable[dirty.load_fails[0]].startswith("fails to decode (OSError")


def test_doctor_names_empty_and_unknown_classes(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    for path in (data / "train" / "cat").iterdir():
        path.write_bytes(b"")
    (data / "val" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(data / "val" / "dog" / "d.png")
    shutil.rmtree(data / "val" / "bee")
    code, out = doctor(capsys, data)
    assert code == 1
    assert "ERROR: train class 'cat' has no usable image." in out
    assert f"ERROR: '{data / 'val'}' has classes that train/ does not: dog;" in out
    assert "warning: val/ has no images of train classes: bee." in out


@pytest.mark.parametrize("case", ["one class", "val without images"])
def test_the_doctor_refuses_what_training_refuses_in_the_same_words(case, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    if case == "one class":
        for split in ("train", "val"):
            for name in ("bee", "cat"):
                shutil.rmtree(data / split / name)
    else:
        for path in (data / "val").rglob("*.jpg"):
            path.rename(path.with_suffix(".txt"))
            path.with_suffix(".txt").write_text("notes, not an image")
    with pytest.raises(DataConfigError) as refused:
        ImageFolderDataModule(data, image_size=96).setup("fit")
    code, out = doctor(capsys, data)
    assert code == 1 and "Verdict: NOT usable as is." in out
    assert f"ERROR: {refused.value}" in out


def test_check_data_script_runs(dirty):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_data.py"), str(dirty.root), "--json"],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert len(json.loads(result.stdout)["unreadable"]) == 5


# Image modes ----------------------------------------------------------------------------------


def test_modes_become_the_expected_rgb_and_gray_pixels(tmp_path):
    def saved(image: Image.Image, name: str, **kwargs) -> Path:
        image.save(tmp_path / name, **kwargs)
        return tmp_path / name

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 128))
    rgba.putpixel((2, 2), (0, 0, 255, 255))
    pixels = np.asarray(load_image(saved(rgba, "rgba.png")))
    assert pixels[0, 0].tolist() == [255, 255, 255]  # transparent: white, not black
    assert pixels[1, 1].tolist() == [127, 127, 127]  # half-transparent black over white
    assert pixels[2, 2].tolist() == [0, 0, 255]

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((3, 3), 1)
    pixels = np.asarray(load_image(saved(palette, "p.png", transparency=0)))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[3, 3].tolist() == [0, 255, 0]

    assert np.asarray(load_image(saved(Image.new("LA", (4, 4), (0, 0)), "la.png"), 1))[0, 0] == 255

    sixteen = np.array([[0, 257, 30000, 65535]], dtype=np.uint16)
    path = saved(Image.fromarray(sixteen), "sixteen.png")
    assert np.asarray(load_image(path, 1))[0].tolist() == [0, 1, 117, 255]
    assert np.asarray(load_image(path))[0, 2].tolist() == [117, 117, 117]

    cmyk = np.asarray(load_image(saved(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "c.tif")))
    assert cmyk[0, 0].tolist() == [255, 0, 0]

    gray = load_image(saved(Image.new("RGB", (4, 4), (255, 0, 0)), "red.png"), in_channels=1)
    assert gray.mode == "L" and np.asarray(gray)[0, 0] == 76  # ITU-R 601 luma of red

    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = load_image(saved(Image.new("RGB", (40, 20)), "r.jpg", exif=exif))
    assert rotated.size == (20, 40)


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (1, 60)])
def test_images_smaller_than_the_crop_work(size, tmp_path):
    Image.new("RGB", size, (0, 0, 255)).save(tmp_path / "tiny.png")
    image = load_image(tmp_path / "tiny.png")
    assert TrainPreset(96)(image).shape == (96, 96, 3)
    assert TrainPreset(96).read(tmp_path / "tiny.png").shape == (96, 96, 3)
    assert EvalPreset(96, in_channels=1).read(tmp_path / "tiny.png").shape == (96, 96, 1)


# Training on dirty data -----------------------------------------------------------------------


class CountImages(L.Callback):
    def __init__(self):
        self.seen = Counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen["train"] += len(batch[1])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
        self.seen["val"] += len(batch[1])


def short_fit(dm: ImageFolderDataModule, log_root: Path, **overrides) -> L.Trainer:
    """A one-epoch fit that logs to ``log_root/lightning_logs/version_N`` (its run folder)."""
    return tiny_fit(dm, logger=TensorBoardLogger(log_root, name="lightning_logs"), **overrides)


@pytest.mark.slow
def test_fit_uses_exactly_the_healthy_images_and_records_the_rest(dirty, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    dm = ImageFolderDataModule(dirty.root, batch_size=4, num_workers=1, image_size=96)
    counter = CountImages()
    with pytest.warns(UserWarning) as warned:
        trainer = short_fit(dm, tmp_path, callbacks=[counter])
    assert counter.seen == {"train": len(dirty.healthy["train"]), "val": len(dirty.healthy["val"])}

    record = Path(trainer.log_dir) / "skipped_images.csv"
    recorded = {Path(row["path"]): row for row in read_csv(record)}
    assert set(recorded) == set(dirty.unreadable) | set(dirty.load_fails)
    for path in dirty.unreadable:
        assert recorded[path]["when"] == "scan"
    for path in dirty.load_fails:
        assert recorded[path]["when"] == "load" and "OSError" in recorded[path]["reason"]

    messages = [str(w.message) for w in warned]
    assert sum("unreadable image(s) left out before training" in m for m in messages) == 1
    assert any("ignored 2 file(s) that are not images" in m for m in messages)
    assert any(f"skipped image '{dirty.load_fails[0]}'" in m for m in messages)
    log = caplog.text
    assert "6 image(s) left out (1 at load time)" in log
    assert "images per class (train imbalance 3.25:1" in log
    assert re.search(r"\nbee +13 +2\n", log)  # the class-count table: class, train, val


def test_on_bad_image_error_names_the_file_found_by_the_scan(dirty):
    dm = ImageFolderDataModule(dirty.root, image_size=96, on_bad_image="error")
    with pytest.raises(DataConfigError, match=r"unreadable image '.*bad_header\.png'"):
        dm.setup("fit")


def test_on_bad_image_error_at_load_time_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", splits={"train": 2, "val": 1})
    from tests.dirty_data import png_with_corrupt_pixels

    broken = data / "train" / "ant" / "broken.png"
    png_with_corrupt_pixels(broken, np.random.default_rng(0))
    args = fit_args(
        data, "--data.batch_size=8", "--data.on_bad_image=error", "--trainer.fast_dev_run=1"
    )
    line = cli_error_line(capsys, args)
    assert line.startswith(f"error: unreadable image '{broken}' (OSError: broken data stream")
    assert line.endswith("or set data.on_bad_image=skip to leave unreadable images out.")


def test_train_class_without_usable_image_is_an_error(tmp_path):
    data = make_image_folder(tmp_path / "data")
    for path in (data / "train" / "bee").iterdir():
        path.write_text("not an image")
    with pytest.raises(DataConfigError, match=r"train class 'bee' in '.*train' has no usable"):
        ImageFolderDataModule(data, image_size=96).setup("fit")
    for path in (data / "train" / "cat").iterdir():
        path.write_bytes(b"")
    with pytest.raises(DataConfigError, match=r"train classes 'bee', 'cat' in .* have no usable"):
        ImageFolderDataModule(data, image_size=96).setup("fit")


def test_a_folder_that_cannot_be_listed_is_recorded_not_lost(tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / "data")
    locked = data / "train" / "cat" / "locked"
    locked.mkdir()
    shutil.copy(data / "train" / "cat" / "img_0.jpg", locked / "img_9.jpg")
    scandir = os.scandir

    def refusing_scandir(path="."):  # what a folder without read permission does (not as root)
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    dm = ImageFolderDataModule(data, image_size=96)
    with pytest.warns(UserWarning, match=f"unreadable image.*'{locked}' \\(cannot list the"):
        dm.setup("fit")
    assert str(locked) in dm.skipped
    code, out = doctor(capsys, data, "--rescan")
    assert code == 1 and f"{locked}" in out and "cannot list the folder" in out


def test_hidden_folders_are_never_classes(dirty):
    assert ImageFolderDataModule(dirty.root).class_names == CLASSES


def test_val_classes_missing_from_train_are_named_and_missing_ones_warn(tmp_path):
    data = make_image_folder(tmp_path / "data")
    shutil.rmtree(data / "val" / "cat")
    dm = ImageFolderDataModule(data, image_size=96)
    with pytest.warns(UserWarning, match="has no images of train classes: cat"):
        dm.setup("fit")
    assert {target for _, target in dm.datasets["val"].samples} == {0, 1}  # train's indices

    (data / "val" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(data / "val" / "dog" / "d.png")
    with pytest.raises(DataConfigError, match="has classes that train/ does not: dog"):
        ImageFolderDataModule(data, image_size=96).setup("validate")


# No val/: a seeded, stratified split ----------------------------------------------------------


def test_split_is_stratified_seeded_and_order_independent(tmp_path):
    root = tmp_path / "data"
    images = {name: [root / "train" / name / f"{i}.jpg" for i in range(n)]
              for name, n in (("a", 30), ("b", 7), ("c", 1))}  # fmt: skip
    train, val = split_train_val(images, 0.1, seed=0, root=root)
    assert {k: len(v) for k, v in val.items()} == {"a": 3, "b": 1, "c": 0}
    for name in images:
        assert sorted(train[name] + val[name]) == sorted(images[name])
    shuffled = {name: list(reversed(paths)) for name, paths in reversed(images.items())}
    assert split_train_val(shuffled, 0.1, seed=0, root=root) == (train, val)
    assert split_train_val(images, 0.1, seed=1, root=root)[1] != val


@pytest.mark.slow
def test_fit_without_val_splits_train_and_saves_the_lists(tmp_path):
    dirty = make_dirty_folder(tmp_path / "data", with_val=False)
    dm = ImageFolderDataModule(
        dirty.root, batch_size=4, num_workers=0, image_size=96, balance="loss"
    )
    assert len(dm.class_weights) == 3  # splits train/ before the trainer (the CLI link does)
    trainer = short_fit(dm, tmp_path, limit_train_batches=1, limit_val_batches=1)
    run = Path(trainer.log_dir)
    train_list = (run / "split_train.txt").read_text().split()
    val_list = (run / "split_val.txt").read_text().split()
    assert not set(train_list) & set(val_list)
    usable = {p.relative_to(dirty.root).as_posix() for p in dirty.healthy["train"]}
    usable.add("train/cat/corrupt_pixels.png")  # only found at load time
    assert set(train_list) | set(val_list) == usable
    assert [len([p for p in val_list if p.startswith(f"train/{c}/")]) for c in CLASSES] == [1, 2, 1]
    again = ImageFolderDataModule(dirty.root, image_size=96)
    again.setup("validate")
    assert [str(p.relative_to(dirty.root)) for p, _ in again.datasets["val"].samples] == val_list


# Imbalance ------------------------------------------------------------------------------------


def test_class_weights_are_linked_into_the_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", splits={"train": 2, "val": 1})
    for i in range(2, 6):
        shutil.copy(data / "train" / "ant" / "img_0.jpg", data / "train" / "ant" / f"x{i}.jpg")
    scanned = []

    def counted_scan(folder, *args, **kwargs):
        scanned.append(Path(folder).name)
        return scan_split(folder, *args, **kwargs)

    monkeypatch.setattr(index, "scan_split", counted_scan)
    cli = cli_main(fit_args(data, "--data.balance=loss", "--trainer.fast_dev_run=1"))
    expected = [10 / (3 * 6), 10 / (3 * 2), 10 / (3 * 2)]
    assert cli.model.hparams.class_weights == pytest.approx(expected)
    assert cli.model.loss_fn.weight.tolist() == pytest.approx(expected)
    # The weights need the train scan before the fit; prepare_data does not scan again.
    assert sorted(scanned) == ["train", "val"]


def test_balanced_sampler_is_balanced_disjoint_per_rank_and_seeded_by_epoch():
    targets = [0] * 90 + [1] * 9 + [2] * 1
    ranks = [BalancedSampler(targets, num_replicas=2, rank=r, seed=3) for r in range(2)]
    draws = [list(sampler) for sampler in ranks]
    assert [len(d) for d in draws] == [50, 50] == [len(s) for s in ranks]
    whole = BalancedSampler(targets, num_replicas=1, rank=0, seed=3)
    assert sorted(draws[0] + draws[1]) == sorted(whole)  # one draw, shared out
    assert draws[0] == list(whole)[0::2]
    for sampler in ranks:
        sampler.set_epoch(1)
    assert [list(s) for s in ranks] != draws
    many = BalancedSampler(targets * 30, seed=0)
    counts = Counter(targets[i % 100] for i, _ in many)
    assert all(800 <= counts[c] <= 1200 for c in range(3)), counts
    # An image drawn twice gets two augmentation seeds (two crops), not one.
    seeds = [seed for i, seed in whole if i == 99]  # the class of one image, drawn ~33 times
    assert len(seeds) > 1 and len(set(seeds)) == len(seeds)


def test_training_shuffle_is_one_permutation_per_epoch_shared_out_with_augmentation_seeds():
    # Several processes: DistributedSampler's order, from seed + epoch.
    ranks = [ShuffledSampler(10, num_replicas=3, rank=r, seed=5) for r in range(3)]
    shares = [list(sampler) for sampler in ranks]
    assert [len(share) for share in shares] == [4, 4, 4] == [len(s) for s in ranks]  # padded
    assert {i for share in shares for i, _ in share} == set(range(10))
    assert shares == [list(s) for s in ranks]  # the same on every process, every time
    for sampler in ranks:
        sampler.set_epoch(1)
    assert [list(s) for s in ranks] != shares  # another order and other crops each epoch
    # One process: RandomSampler's, from the process's random stream, which checkpoints keep.
    torch.manual_seed(0)
    alone = list(ShuffledSampler(10))
    assert sorted(i for i, _ in alone) == list(range(10))  # each image once
    assert list(ShuffledSampler(10)) != alone
    torch.manual_seed(0)
    assert list(ShuffledSampler(10)) == alone


def test_sampler_is_used_by_the_train_loader(image_folder):
    dm = ImageFolderDataModule(image_folder, num_workers=0, image_size=96, balance="sampler")
    dm.setup("fit")
    assert isinstance(dm.train_dataloader().sampler, BalancedSampler)


def test_a_batch_of_only_bad_images_is_empty_and_skipped():
    batch = SkippingCollate((96, 96, 3))([BadImage(4, "a.jpg", "OSError: x")] * 2)
    assert batch.images.shape == (0, 96, 96, 3) and batch.skipped[0].path == "a.jpg"
    model = LitAlexNet(3)
    images = normalize(batch.images, [0.5] * 3, [0.5] * 3)  # as on the device
    # A zero loss that still reaches every parameter, so DDP ranks stay in step.
    loss = model.training_step((images, batch.targets), 0)["loss"]
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None for p in model.parameters())


# File names that are not valid UTF-8 ----------------------------------------------------------

ODD = os.fsdecode(b"caf\xe9-\xff")  # Latin-1 bytes, as an old camera or zip names a file


@pytest.mark.slow
def test_names_that_are_not_utf8_get_their_rows_in_the_run_files(tmp_path):
    data = make_image_folder(tmp_path / "data", splits={"train": 4})  # no val/: lists are saved
    good = data / "train" / "ant" / f"{ODD}.jpg"
    (data / "train" / "ant" / "img_0.jpg").rename(good)
    broken = data / "train" / "bee" / f"{ODD}.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8)
    dm = ImageFolderDataModule(data, batch_size=4, num_workers=0, image_size=67)
    trainer = short_fit(dm, tmp_path, limit_train_batches=1, limit_val_batches=1)
    run = Path(trainer.log_dir)
    rows = read_csv(run / "skipped_images.csv")
    assert [Path(row["path"]) for row in rows] == [broken]
    assert os.fsencode(rows[0]["path"]).endswith(b"caf\xe9-\xff.png")  # the bytes, recovered
    listed = [
        line
        for split in ("train", "val")
        for line in (run / f"split_{split}.txt").read_text("utf-8", "surrogateescape").splitlines()
    ]
    assert good.relative_to(data).as_posix() in listed


def test_the_doctor_reports_names_that_are_not_utf8(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    broken = data / "val" / "cat" / f"{ODD}.jpg"
    broken.write_bytes(b"")
    code, out = doctor(capsys, data, "--json")
    assert code == 1
    (entry,) = json.loads(out)["unreadable"]  # JSON escapes the bytes; loads gives them back
    assert Path(entry["path"]) == broken and os.fsencode(entry["path"]).endswith(b"\xe9-\xff.jpg")
    code, out = doctor(capsys, data)
    assert code == 1 and "caf\\xe9-\\xff.jpg: empty file" in out  # readable in a terminal
