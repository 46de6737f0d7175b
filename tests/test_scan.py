"""Large folders: the scan cache (a second scan opens no unchanged file), the compact sample
list, one scan per machine under DDP, and the data doctor's fast start."""

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import alexnet_lit.data.images as images_module
from alexnet_lit.data import ImageFolderDataModule
from alexnet_lit.data.doctor import diagnose
from alexnet_lit.data.folders import scan_split
from alexnet_lit.data.images import IMG_EXTENSIONS
from alexnet_lit.data.samples import SampleList
from alexnet_lit.data.scan_cache import ScanCache
from tests.conftest import make_image_folder
from tests.helpers import ROOT, TINY_WIDTH, tiny_fit

real_read = Path.read_bytes


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Each test's own scan cache, never the user's."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("ALEXNET_LIT_CACHE", str(folder))
    return folder


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    """The files the scan opens from now on (probe opens each file it checks)."""
    paths: list[Path] = []

    def counting_open(path, *args, **kwargs):
        paths.append(Path(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(images_module, "open", counting_open, raising=False)
    return paths


def scan(split: Path):
    return scan_split(split, cache=ScanCache(split))


def verdicts(result) -> tuple:
    return result.images, sorted(result.unreadable), sorted(result.not_images)


def test_a_second_setup_reads_the_cache_and_opens_no_image(tmp_path, opened):
    data = make_image_folder(tmp_path / "data")
    first = ImageFolderDataModule(str(data), num_workers=0)
    first.setup("fit")
    assert opened  # the first scan read the headers
    opened.clear()
    second = ImageFolderDataModule(str(data), num_workers=0)
    second.setup("fit")
    assert opened == []
    assert list(second.datasets["train"].samples) == list(first.datasets["train"].samples)
    assert list(second.datasets["val"].samples) == list(first.datasets["val"].samples)


def test_a_relative_data_dir_gives_the_same_samples_and_split(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", splits={"train": 5})  # val split off train
    absolute = ImageFolderDataModule(str(data), num_workers=0)
    absolute.setup("fit")
    monkeypatch.chdir(data)
    here = ImageFolderDataModule(".", num_workers=0)
    here.setup("fit")
    for split in ("train", "val"):
        expected = [(p.relative_to(data), t) for p, t in absolute.datasets[split].samples]
        assert list(here.datasets[split].samples) == expected


def test_the_parallel_scan_gives_the_serial_verdicts(tmp_path, monkeypatch):
    from alexnet_lit.data import folders
    from tests.dirty_data import make_dirty_folder

    root = make_dirty_folder(tmp_path / "dirty").root
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    serial = folders.check_files(files, decode=True, workers=1)
    monkeypatch.setattr(folders, "PARALLEL_MIN_FILES", 1)  # the forked pool on a few files
    monkeypatch.setattr(folders, "PROBE_CHUNK", 3)  # several chunks, back in order
    assert folders.check_files(files, decode=True, workers=2) == serial
    assert any(verdict.info is None for _, verdict in serial)  # dirty: some verdicts are not images


def test_rescan_ignores_the_cache(tmp_path, opened):
    data = make_image_folder(tmp_path / "data")
    ImageFolderDataModule(str(data), num_workers=0).setup("fit")
    opened.clear()
    ImageFolderDataModule(str(data), num_workers=0, rescan=True).setup("fit")
    assert len(opened) == len(list(data.rglob("*.jpg")))


def test_added_changed_removed_and_renamed_files_are_seen(tmp_path, opened):
    data = make_image_folder(tmp_path / "data")
    split = data / "train"
    scan(split)
    files = sorted(split.rglob("*.jpg"))
    added = split / "cat" / "new.png"
    Image.new("RGB", (40, 30), "red").save(added)
    changed = files[0]
    changed.write_bytes(b"no longer an image")  # a new size, so seen even within one mtime tick
    files[1].unlink()
    renamed = files[2].with_name("renamed.jpg")
    files[2].rename(renamed)
    opened.clear()
    again = scan(split)
    assert sorted(opened) == sorted([added, changed, renamed])  # the others come from the cache
    assert verdicts(again) == verdicts(scan_split(split))  # as a scan without a cache sees it
    assert str(changed) in dict(again.unreadable)  # paths as strings: see walk_stats
    assert str(files[1]) not in again.infos
    assert str(renamed) in again.infos and str(added) in again.infos


def test_a_rename_that_keeps_every_size_and_place_is_seen(tmp_path, opened):
    # img_1.jpg -> img_1.png (same length) and img_2.jpg -> img_2b.jpg: the sizes, mtimes and
    # order of the files are as cached; only their names tell the change.
    split = make_image_folder(tmp_path / "data") / "train"
    scan(split)
    same_length = split / "cat" / "img_1.png"
    longer = split / "cat" / "img_2b.jpg"
    (split / "cat" / "img_1.jpg").rename(same_length)
    (split / "cat" / "img_2.jpg").rename(longer)
    opened.clear()
    again = scan(split)
    assert sorted(opened) == [same_length, longer]
    assert verdicts(again) == verdicts(scan_split(split))


def test_a_read_only_dataset_folder_works_and_gets_no_file(tmp_path, opened):
    data = make_image_folder(tmp_path / "data")
    before = sorted(data.rglob("*"))
    for path in [data, *before]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        ImageFolderDataModule(str(data), num_workers=0).setup("fit")
        opened.clear()
        ImageFolderDataModule(str(data), num_workers=0).setup("fit")
    finally:
        for path in [data, *before]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert opened == []  # the cache worked
    assert sorted(data.rglob("*")) == before  # and lives outside the dataset


def test_a_damaged_cache_is_ignored_with_one_warning_and_rebuilt(tmp_path, opened):
    split = make_image_folder(tmp_path / "data") / "train"
    first = scan(split)
    cache = ScanCache(split)
    cache.path.write_bytes(b"PK\x03\x04 not a zip any more")
    with pytest.warns(UserWarning, match="damaged scan cache") as warned:
        again = scan(split)
    assert len([w for w in warned if "scan cache" in str(w.message)]) == 1
    assert verdicts(again) == verdicts(first)
    opened.clear()
    assert verdicts(scan(split)) == verdicts(first) and opened == []  # rewritten whole


def test_the_doctor_hashes_each_file_once_per_change(tmp_path, opened, monkeypatch):
    data = make_image_folder(tmp_path / "data")
    leak = data / "val" / "cat" / "copy_of_train.jpg"
    leak.write_bytes(next((data / "train" / "cat").iterdir()).read_bytes())
    read: list[Path] = []
    real_open = open

    def counting_open(path, *args, **kwargs):  # the duplicate search's reads
        read.append(Path(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self) or real_read(self))
    first = diagnose(data)
    assert first["duplicates_across_splits"] and leak in read  # hashed the copies
    read.clear()
    opened.clear()
    again = diagnose(data)
    assert again["duplicates_across_splits"] == first["duplicates_across_splits"]
    assert [p for p in read if p.suffix == ".jpg"] == [] and opened == []  # nothing read again


def test_the_sample_list_is_a_few_arrays_whatever_its_length():
    """What keeps forked workers' memory flat: a worker reading samples writes to no object
    per sample, because there is none (docs/speed.md measures the workers' private memory)."""
    root = Path("/data/imagenet/train")

    def samples(n: int) -> list[tuple[Path, int]]:
        return [(root / f"n{i % 1000:08d}" / f"img_{i:07d}.JPEG", i % 1000) for i in range(n)]

    big, small = SampleList(samples(200_000), root), SampleList(samples(2_000), root)
    assert len(gc.get_referents(big)) == len(gc.get_referents(small))
    assert all(isinstance(v, np.ndarray | Path) for v in vars(big).values())
    assert big[123_456] == (root / "n00000456" / "img_0123456.JPEG", 456)
    assert big[-1] == samples(200_000)[-1] and len(big) == 200_000
    assert big.nbytes / len(big) < 100  # the index costs under ~100 bytes per file


def test_non_utf8_names_round_trip_through_the_sample_list(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes, not UTF-8
    samples = [(tmp_path / "cat" / name, 0), (tmp_path / "dog" / "x.jpg", 1)]
    assert list(SampleList(samples, tmp_path)) == samples


def test_the_doctor_imports_no_torch_and_warns_about_case_only_class_names(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=["Cat", "cat", "dog"])
    code = textwrap.dedent(f"""
        import sys
        from alexnet_lit.data.doctor import check_data_main
        check_data_main([{str(data)!r}])
        print("torch imported:", "torch" in sys.modules, "lightning" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert "torch imported: False False" in result.stdout, result.stderr[-2000:]
    assert "differ only in case" in result.stdout and "'Cat'" in result.stdout
    report = diagnose(data)
    assert any("differ only in case" in w for w in report["warnings"])


def test_extensions_match_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS as TORCHVISION

    assert IMG_EXTENSIONS == TORCHVISION


SCAN_COUNTER = """
import atexit, os, sys
DATA = os.environ["COUNT_OPENS_UNDER"]
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].startswith(DATA):
        if args[0].endswith(".jpg"):
            opened.append(args[0])
sys.addaudithook(hook)
def report():
    rank = os.environ.get("LOCAL_RANK", "0")
    with open(os.path.join(os.environ["COUNT_OPENS_TO"], f"rank{rank}.txt"), "w") as file:
        file.write(" ".join([str(len(opened)), *opened]))
atexit.register(report)
"""


@pytest.mark.slow
def test_two_ddp_processes_scan_once(tmp_path, cache_dir):
    """Two CPU processes of one DDP validate: the headers are read by one of them (in
    prepare_data), the other reads the cache (an audit hook counts each process's opens)."""
    data = make_image_folder(tmp_path / "data", splits={"train": 2, "val": 3})
    ckpt = tmp_path / "model.ckpt"
    datamodule = ImageFolderDataModule(str(data), batch_size=2, num_workers=0, image_size=67)
    tiny_fit(datamodule, max_steps=1, limit_val_batches=0).save_checkpoint(ckpt, weights_only=True)
    fresh_cache = tmp_path / "ddp-cache"
    hooks, counts = tmp_path / "hooks", tmp_path / "counts"
    hooks.mkdir()
    counts.mkdir()
    (hooks / "sitecustomize.py").write_text(SCAN_COUNTER)
    env = {
        **os.environ,
        "PYTHONPATH": f"{hooks}:{ROOT}",
        "ALEXNET_LIT_CACHE": str(fresh_cache),
        "COUNT_OPENS_UNDER": str(data),
        "COUNT_OPENS_TO": str(counts),
    }
    args = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "validate",
        "--config", str(ROOT / "configs" / "default.yaml"), f"--data.data_dir={data}",
        "--data.image_size=67", "--data.batch_size=2", "--data.num_workers=0",
        f"--model.hidden_features={TINY_WIDTH}", f"--ckpt_path={ckpt}",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]  # fmt: skip
    result = subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    opens = {path.stem: int(path.read_text().split()[0]) for path in counts.glob("rank*.txt")}
    assert set(opens) == {"rank0", "rank1"}
    # Rank 0 scanned train/ and val/ (15 headers) and read its share of val/ to validate it;
    # rank 1 read only its share: no scan of its own.
    val_images = len(list((data / "val").rglob("*.jpg")))
    assert opens["rank1"] <= val_images // 2 + 1
    assert opens["rank0"] >= len(list(data.rglob("*.jpg")))
