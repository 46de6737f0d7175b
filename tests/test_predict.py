"""scripts/predict.py and the CLI's predict subcommand: one CSV row per image, errors kept."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from alexnet_lit import LitAlexNet
from alexnet_lit.checkpoints import best_checkpoint, find_checkpoint
from alexnet_lit.data.folders import scan_split
from alexnet_lit.data.images import load_image
from alexnet_lit.data.presets import eval_transform
from alexnet_lit.errors import CheckpointError
from alexnet_lit.inference.export import export_main
from alexnet_lit.inference.predict import load_model, predict_main
from alexnet_lit.training.cli import cli_main
from tests.conftest import CLASSES, make_image_folder
from tests.helpers import DEFAULT_CONFIG, ROOT, TINY_WIDTH, cli_error_line, read_csv


@pytest.fixture
def new_images(tmp_path: Path) -> Path:
    """Unlabelled images in nested folders, plus a truncated JPEG and a text file named .png."""
    folder = make_image_folder(tmp_path / "new", splits={"a": 2}, seed=1)
    (folder / "a" / "ant" / "broken.jpg").write_bytes(
        (folder / "a" / "ant" / "img_0.jpg").read_bytes()[:200]
    )
    (folder / "a" / "bee" / "notes.png").write_text("not an image")
    (folder / "a" / "bee" / "readme.txt").write_text("not an image and not an image name")
    return folder


@pytest.mark.slow
def test_predict_writes_a_row_per_image_and_keeps_bad_files(tiny_ckpt, new_images, tmp_path):
    out = tmp_path / "out" / "predictions.csv"
    single = new_images / "a" / "cat" / "img_1.jpg"
    code = predict_main(
        ["--ckpt", str(tiny_ckpt), str(new_images), str(single), "--out", str(out),
         "--top-k", "2", "--batch-size", "3", "--num-workers", "2"]
    )  # fmt: skip
    assert code == 0
    rows = read_csv(out)
    assert list(rows[0]) == [
        "path", "predicted", "confidence", "top1", "top1_prob", "top2", "top2_prob", "error"
    ]  # fmt: skip
    # 6 good images + 2 unreadable in the folder (readme.txt is not an image name) + 1 file.
    assert len(rows) == 9
    assert [row["path"] for row in rows[-1:]] == [str(single)]
    bad = {Path(row["path"]).name: row for row in rows if row["error"]}
    assert sorted(bad) == ["broken.jpg", "notes.png"]
    assert all(row["predicted"] == "" for row in bad.values())

    model = load_model(tiny_ckpt)
    preprocess = eval_transform(**model.hparams["preprocessing"])
    for row in rows:
        if row["error"]:
            continue
        assert row["predicted"] == row["top1"] and row["confidence"] == row["top1_prob"]
        assert row["top1"] in CLASSES and row["top2"] in CLASSES and row["top1"] != row["top2"]
        assert float(row["top1_prob"]) >= float(row["top2_prob"])
        with torch.no_grad():
            probs = model(preprocess(load_image(row["path"])).unsqueeze(0)).softmax(1)[0]
        assert float(row["top1_prob"]) == pytest.approx(probs.max().item(), abs=1e-5)
        assert row["top1"] == CLASSES[probs.argmax()]


def test_missing_input_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "predict.py"), "--ckpt", str(tmp_path / "x.ckpt"),
         str(tmp_path / "nowhere")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: '{tmp_path / 'nowhere'}' does not exist; pass image files or folders."
    ]


def test_missing_checkpoint_names_it(tmp_path, capsys):
    image = make_image_folder(tmp_path / "img", splits={"x": 1}) / "x" / "ant" / "img_0.jpg"
    assert predict_main(["--ckpt", str(tmp_path / "none.ckpt"), str(image)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: checkpoint '{tmp_path / 'none.ckpt'}' does not exist; " + (
        "pass the path of a .ckpt file.\n"
    )
    assert predict_main(["--ckpt", str(tmp_path), str(image)]) == 2  # a run folder, say
    assert capsys.readouterr().err.startswith(f"error: checkpoint '{tmp_path}' is a folder;")


def test_a_device_or_an_out_path_that_cannot_be_used_is_one_line(tiny_ckpt, tmp_path, capsys):
    image = make_image_folder(tmp_path / "img", splits={"x": 1}) / "x" / "ant" / "img_0.jpg"
    args = ["--ckpt", str(tiny_ckpt), str(image)]
    assert predict_main([*args, "--device", "banana"]) == 2
    assert capsys.readouterr().err == (
        "error: --device 'banana' is not a device torch knows; use auto, cpu or cuda:N.\n"
    )
    (tmp_path / "taken").write_text("a file where --out wants a folder")
    assert predict_main([*args, "--out", str(tmp_path / "taken" / "p.csv")]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --out '{tmp_path / 'taken' / 'p.csv'}' cannot be written "
        f"('{tmp_path / 'taken'}' is a file, not a folder)"
    )
    # --explain's folder, before any prediction is written
    out = tmp_path / "p.csv"
    explain = ["--explain", str(tmp_path / "taken" / "cams"), "--out", str(out)]
    assert predict_main([*args, *explain]) == 2
    assert "error: --explain" in capsys.readouterr().err and not out.exists()
    # A device torch knows that this machine has not
    if not torch.backends.mps.is_available():
        assert predict_main([*args, "--device", "mps"]) == 2
        assert capsys.readouterr().err == (
            "error: --device 'mps' is not available on this machine; use auto or cpu.\n"
        )


def test_tutorial_state_dict_gets_a_hint(tmp_path, capsys):
    ckpt = tmp_path / "alexnet.pt"
    torch.save({"21.weight": torch.zeros(2, 4096)}, ckpt)
    image = make_image_folder(tmp_path / "img", splits={"x": 1}) / "x" / "ant" / "img_0.jpg"
    assert predict_main(["--ckpt", str(ckpt), str(image)]) == 2
    assert "import_tutorial_weights.py" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_predict_writes_the_same_csv(tiny_run, tiny_ckpt, tmp_path, monkeypatch):
    images = make_image_folder(tmp_path / "new", splits={"a": 2}, seed=2)
    expected = tmp_path / "expected.csv"
    assert predict_main(["--ckpt", str(tiny_ckpt), str(images), "--out", str(expected)]) == 0
    monkeypatch.chdir(tmp_path)
    cli_main(
        ["predict", "--config", DEFAULT_CONFIG, f"--data.data_dir={tiny_run / 'data'}",
         "--data.image_size=96", "--data.batch_size=4", "--data.num_workers=0",
         f"--model.hidden_features={TINY_WIDTH}", f"--data.predict_dir={images}",
         f"--ckpt_path={tiny_ckpt}"]
    )  # fmt: skip
    written = read_csv(tmp_path / "lightning_logs" / "version_0" / "predictions.csv")
    wanted = read_csv(expected)
    assert [row["path"] for row in written] == [row["path"] for row in wanted]
    assert list(written[0]) == list(wanted[0])
    for got, want in zip(written, wanted, strict=True):
        assert got["predicted"] == want["predicted"]
        assert float(got["confidence"]) == pytest.approx(float(want["confidence"]), abs=1e-5)


@pytest.mark.slow
def test_cli_predict_under_ddp_writes_each_image_once(tiny_run, tiny_ckpt, tmp_path):
    # 5 images on 2 ranks: a plain DistributedSampler would pad one rank with a duplicate.
    images = tmp_path / "new"
    images.mkdir()
    for path in sorted((tiny_run / "data" / "train").rglob("*.jpg"))[:5]:
        shutil.copy(path, images / f"{path.parent.name}_{path.name}")
    out = tmp_path / "ddp.csv"
    overlay = tmp_path / "writer.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: alexnet_lit.inference.predict.PredictionCSVWriter\n"
        f"      init_args: {{output_path: {out}, top_k: 2}}\n"
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "predict", "--config", DEFAULT_CONFIG,
         "--config", str(overlay), f"--data.data_dir={tiny_run / 'data'}", "--data.image_size=96",
         "--data.batch_size=2", "--data.num_workers=0", f"--data.predict_dir={images}",
         f"--model.hidden_features={TINY_WIDTH}",
         f"--ckpt_path={tiny_ckpt}", "--trainer.accelerator=cpu", "--trainer.devices=2",
         "--trainer.strategy=ddp", "--trainer.logger=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out)
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in images.iterdir())
    assert list(rows[0])[3:7] == ["top1", "top1_prob", "top2", "top2_prob"]
    assert not list(tmp_path.glob(".ddp.csv.rank*"))


def test_cli_predict_follows_the_checkpoints_preprocessing_unless_the_config_sets_other(
    tiny_run, tiny_ckpt, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = ["predict", "--config", DEFAULT_CONFIG, f"--data.data_dir={tiny_run / 'data'}",
            "--data.num_workers=0", f"--model.hidden_features={TINY_WIDTH}",
            f"--ckpt_path={tiny_ckpt}"]  # fmt: skip
    cli = cli_main(args)  # trained at 96 px: the data takes that, where the config sets nothing
    assert cli.datamodule.preprocessing["image_size"] == 96
    line = cli_error_line(capsys, [*args, "--data.image_size=224"])
    assert line.startswith(f"error: --ckpt_path '{tiny_ckpt}' was trained with preprocessing")
    assert "'image_size': 96" in line and "'image_size': 224" in line and "--config" in line


def test_one_finder_newest_run_then_its_best_by_score_or_its_last(tmp_path):
    logs = tmp_path / "lightning_logs"
    for version, mtime in (("version_0", 100), ("version_1", 300), ("version_2", 200)):
        folder = logs / version / "checkpoints"
        folder.mkdir(parents=True)
        names = [("best-epoch=01-val_acc=0.5000.ckpt", 0), ("last.ckpt", 50)]
        if version == "version_1":  # a better, older file beside a newer, worse one
            names.append(("best-epoch=00-val_acc=0.7500.ckpt", -10))
        for name, offset in names:
            (folder / name).touch()
            os.utime(folder / name, (mtime + offset, mtime + offset))
    newest = logs / "version_1" / "checkpoints"
    assert find_checkpoint([logs], "best") == newest / "best-epoch=00-val_acc=0.7500.ckpt"
    assert best_checkpoint(newest.parent) == newest / "best-epoch=00-val_acc=0.7500.ckpt"
    assert find_checkpoint([logs], "last") == newest / "last.ckpt"
    with pytest.raises(CheckpointError, match=r"no \*/checkpoints/best\*\.ckpt under"):
        find_checkpoint([tmp_path / "elsewhere"], "best")


def test_predict_and_export_take_best_or_last_as_train_py_does(
    tiny_run, tiny_ckpt, tmp_path, monkeypatch, capsys
):
    images = make_image_folder(tmp_path / "new", splits={"a": 1}, seed=1)
    monkeypatch.chdir(tmp_path)  # no lightning_logs/ here
    assert predict_main(["--ckpt", "best", str(images)]) == 2
    assert "no */checkpoints/best*.ckpt under 'lightning_logs'" in capsys.readouterr().err

    monkeypatch.chdir(tiny_run)  # its lightning_logs/version_0 has one best file
    expected, out = tmp_path / "expected.csv", tmp_path / "best.csv"
    quick = [str(images), "--num-workers", "0", "--top-k", "1"]
    assert predict_main(["--ckpt", str(tiny_ckpt), *quick, "--out", str(expected)]) == 0
    assert predict_main(["--ckpt", "best", *quick, "--out", str(out)]) == 0
    assert out.read_text() == expected.read_text()
    named = f"--ckpt best: {tiny_ckpt.relative_to(tiny_run)}"
    assert named in capsys.readouterr().out
    exported = tmp_path / "model.pt"
    assert export_main(["--ckpt", "best", "--format", "torchscript", "--out", str(exported)]) == 0
    assert named in capsys.readouterr().out and exported.is_file()


def test_a_checkpoint_of_another_shape_is_one_sentence(tmp_path):
    ckpt = tmp_path / "other.ckpt"
    hparams = dict(LitAlexNet(num_classes=2).hparams)
    torch.save({"state_dict": {"model.extra": torch.zeros(1)}, "hyper_parameters": hparams}, ckpt)
    with pytest.raises(CheckpointError, match="does not fit the AlexNet its hyperparameters"):
        load_model(ckpt)


@pytest.mark.slow
def test_cli_predict_gives_unreadable_images_an_error_row(
    tiny_run, tiny_ckpt, new_images, tmp_path, monkeypatch
):
    expected = tmp_path / "script.csv"
    assert predict_main(["--ckpt", str(tiny_ckpt), str(new_images), "--out", str(expected)]) == 0
    monkeypatch.chdir(tmp_path)
    cli_main(
        ["predict", "--config", DEFAULT_CONFIG, f"--data.data_dir={tiny_run / 'data'}",
         "--data.image_size=96", "--data.batch_size=3", "--data.num_workers=1",
         f"--model.hidden_features={TINY_WIDTH}",
         f"--data.predict_dir={new_images}", f"--ckpt_path={tiny_ckpt}"]
    )  # fmt: skip
    run = tmp_path / "lightning_logs" / "version_0"
    written, wanted = read_csv(run / "predictions.csv"), read_csv(expected)
    assert [row["path"] for row in written] == [row["path"] for row in wanted]
    for got, want in zip(written, wanted, strict=True):
        assert got["error"] == want["error"]
        assert got["predicted"] == want["predicted"]
    assert sorted(Path(row["path"]).name for row in written if row["error"]) == [
        "broken.jpg", "notes.png"
    ]  # fmt: skip
    skipped = read_csv(run / "skipped_images.csv")  # recorded like any unreadable image
    assert sorted(Path(row["path"]).name for row in skipped) == ["broken.jpg", "notes.png"]


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_gets_its_row(tiny_ckpt, tmp_path):
    folder = make_image_folder(tmp_path / "new", splits={"a": 1}, seed=3) / "a" / "ant"
    odd = os.fsdecode(b"caf\xe9-\xff.jpg")  # Latin-1 bytes, as an old camera or zip names it
    (folder / "img_0.jpg").rename(folder / odd)
    out = tmp_path / "predictions.csv"
    assert predict_main(["--ckpt", str(tiny_ckpt), str(folder), "--out", str(out)]) == 0
    (row,) = read_csv(out)
    assert Path(row["path"]) == folder / odd and row["predicted"] in CLASSES
    assert os.fsencode(row["path"]).endswith(b"caf\xe9-\xff.jpg")  # the name's bytes, exactly


def write_mixed_folder(folder: Path) -> dict[str, Path]:
    """Files training's scan tells apart by content: images without an image name, a HEIC, and
    files that are not images; the dict names them."""
    folder.mkdir(parents=True)
    files = {
        "animated": folder / "anim.gif",
        "pixel": folder / "pixel.gif",
        "no_extension": folder / "photo",
        "heic": folder / "IMG_0001.HEIC",
        "text": folder / "notes.txt",
        "csv": folder / "sizes.csv",
        "hidden": folder / ".DS_Store",
    }
    frames = [Image.new("RGB", (20, 20), colour) for colour in ("red", "blue")]
    frames[0].save(files["animated"], save_all=True, append_images=frames[1:], duration=100)
    Image.new("P", (1, 1)).save(files["pixel"])
    Image.new("RGB", (30, 30), "green").save(files["no_extension"], format="JPEG")
    # An iPhone photo's first bytes: an ftyp box with the "heic" brand.
    files["heic"].write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64))
    files["text"].write_text("not an image")
    files["csv"].write_text("w,h\n1,1\n")
    files["hidden"].write_bytes(b"\0\0\0\x01Bud1")
    return files


def test_training_scan_sees_gifs_and_extensionless_jpegs_and_heic_as_unreadable(tmp_path):
    files = write_mixed_folder(tmp_path / "train" / "ant")
    scan = scan_split(tmp_path / "train")
    names = {"animated", "pixel", "no_extension"}
    # The scan gives paths as strings (a million Paths cost seconds).
    assert scan.images == {"ant": sorted(str(files[name]) for name in names)}
    reason = "HEIC is not supported; convert it to JPEG or PNG"
    assert scan.unreadable == [(str(files["heic"]), reason)]
    assert [path for path, _ in scan.not_images] == [str(files["text"]), str(files["csv"])]
    assert scan.hidden == [files["hidden"]]


def test_predict_recognises_images_by_content_as_training_does(tiny_ckpt, tmp_path, capsys):
    files = write_mixed_folder(tmp_path / "new" / "sub")
    out = tmp_path / "predictions.csv"
    code = predict_main(
        ["--ckpt", str(tiny_ckpt), str(tmp_path / "new"), str(files["text"]), "--out", str(out),
         "--num-workers", "0"]
    )  # fmt: skip
    assert code == 0
    rows = read_csv(out)
    # Every image of the folder, readable or not, in order, then the file named directly.
    scan = scan_split(tmp_path / "new")
    in_the_folder = sorted(map(Path, [*scan.images["sub"], *(p for p, _ in scan.unreadable)]))
    assert [Path(row["path"]) for row in rows] == [*in_the_folder, files["text"]]
    errors = {Path(row["path"]): row["error"] for row in rows if row["error"]}
    assert errors[files["heic"]] == "HEIC is not supported; convert it to JPEG or PNG"
    assert errors[files["text"]].startswith("not an image")  # named directly: still a row
    assert sorted(errors) == sorted([files["heic"], files["text"]])
    assert all(row["predicted"] in CLASSES for row in rows if not row["error"])
    printed = capsys.readouterr().out.splitlines()
    # sizes.csv and notes.txt; the hidden .DS_Store is neither counted nor predicted.
    assert f"ignored 2 file(s) that are not images, e.g. '{files['text']}'." in printed
    assert f"wrote 5 predictions to {out} (2 unreadable, see the error column)" in printed


def test_out_folder_gets_predictions_csv_and_a_large_top_k_is_said(tiny_ckpt, tmp_path, capsys):
    image = make_image_folder(tmp_path / "img", splits={"x": 1}) / "x" / "ant" / "img_0.jpg"
    folder = tmp_path / "results"
    folder.mkdir()
    assert predict_main(["--ckpt", str(tiny_ckpt), str(image), "--out", str(folder),
                         "--top-k", "5", "--num-workers", "0"]) == 0  # fmt: skip
    (row,) = read_csv(folder / "predictions.csv")
    assert row["top3"] in CLASSES and "top4" not in row
    printed = capsys.readouterr().out.splitlines()
    assert "--top-k 5 is more than the checkpoint's 3 classes; listing 3." in printed
    assert f"wrote 1 predictions to {folder / 'predictions.csv'}" in printed
    with pytest.raises(SystemExit):
        predict_main(["--help"])
    assert "gets predictions.csv inside it" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_cli_predict_dir_recognises_images_by_content(tiny_run, tiny_ckpt, tmp_path, monkeypatch):
    files = write_mixed_folder(tmp_path / "new")
    expected = tmp_path / "script.csv"
    assert predict_main(["--ckpt", str(tiny_ckpt), str(tmp_path / "new"), "--out", str(expected),
                         "--num-workers", "0"]) == 0  # fmt: skip
    monkeypatch.chdir(tmp_path)
    cli_main(
        ["predict", "--config", DEFAULT_CONFIG, f"--data.data_dir={tiny_run / 'data'}",
         "--data.image_size=96", "--data.batch_size=2", "--data.num_workers=0",
         f"--model.hidden_features={TINY_WIDTH}", f"--data.predict_dir={tmp_path / 'new'}",
         f"--ckpt_path={tiny_ckpt}"]
    )  # fmt: skip
    run = tmp_path / "lightning_logs" / "version_0"
    written, wanted = read_csv(run / "predictions.csv"), read_csv(expected)
    assert [row["path"] for row in written] == [row["path"] for row in wanted]
    assert [row["error"] for row in written] == [row["error"] for row in wanted]
    assert {Path(row["path"]) for row in written} == {
        files[name] for name in ("animated", "pixel", "no_extension", "heic")
    }
    (skipped,) = read_csv(run / "skipped_images.csv")
    assert Path(skipped["path"]) == files["heic"] and skipped["reason"].startswith("HEIC")
