"""Trust the model: calibration, Grad-CAM, suspicious labels and the learning curve."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_lit import LitAlexNet
from alexnet_lit.checkpoints import load_checkpoint
from alexnet_lit.evaluation.calibration import fit_temperature
from alexnet_lit.evaluation.gradcam import grad_cam
from alexnet_lit.inference.predict import load_model, predict_main
from alexnet_lit.metrics import expected_calibration_error
from alexnet_lit.preprocessing import preprocessing_record
from alexnet_lit.training.audits import (
    chance_warning,
    find_label_issues_main,
    fold_accuracy,
    learning_curve_main,
    nested_subsets,
    reading,
)
from tests.helpers import TINY_WIDTH, fit_args, read_csv

# --- calibration ---------------------------------------------------------------------------


def test_temperature_scaling_undoes_overconfidence():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=generator) * 2
    targets = torch.multinomial(true_logits.softmax(1), 1, generator=generator).view(-1)
    overconfident = 3.0 * true_logits  # the same ranking, three times too sure
    temperature = fit_temperature(overconfident, targets)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(overconfident, targets)
    after = expected_calibration_error(overconfident, targets, temperature)
    assert after < before / 3
    assert torch.equal((overconfident / temperature).argmax(1), overconfident.argmax(1))


def test_a_validation_set_without_mistakes_keeps_the_model_confidences():
    # Every image right: the cross-entropy only falls as T -> 0, which would make every later
    # prediction (noise included) 100% sure.
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    targets = torch.tensor([0, 1, 0])
    assert fit_temperature(logits, targets) == 1.0
    with_a_mistake = torch.tensor([0, 1, 1])
    assert 0.1 < fit_temperature(logits, with_a_mistake) != 1.0


@pytest.mark.slow
def test_predictions_are_calibrated_unless_asked_not_to(tiny_ckpt, tiny_run, tmp_path):
    ckpt = tmp_path / "scaled.ckpt"
    checkpoint = load_checkpoint(tiny_ckpt)
    checkpoint["hyper_parameters"]["temperature"] = 2.5
    torch.save(checkpoint, ckpt)
    model = load_model(ckpt)
    assert model.hparams.temperature == 2.5  # loading adopts the stored temperature
    images = tiny_run / "data" / "val"
    for flag, temperature in (([], 2.5), (["--no-calibration"], 1.0)):
        out = tmp_path / f"t{temperature}.csv"
        assert predict_main(["--ckpt", str(ckpt), str(images), "--out", str(out), *flag]) == 0
        rows = read_csv(out)
        from alexnet_lit.data.images import load_image
        from alexnet_lit.data.presets import eval_transform

        preprocess = eval_transform(**model.hparams.preprocessing)
        x = preprocess(load_image(rows[0]["path"])).unsqueeze(0)
        with torch.no_grad():
            expected = (model(x) / temperature).softmax(1).max().item()
        assert float(rows[0]["confidence"]) == pytest.approx(expected, abs=1e-5)


# --- Grad-CAM ------------------------------------------------------------------------------

SIZE = 128
PATCH = 48  # a PATCH x PATCH square, somewhere on a grey image, is all that tells the classes apart


def patch_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grey images with one textured square at a random place, reddish (class 0) or bluish
    (class 1); returns the images, the classes and the squares' masks ``[N, H, W]``."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 3, SIZE, SIZE), np.float32)  # 0: mid-grey once normalized
    masks = np.zeros((count, SIZE, SIZE), bool)
    targets = rng.integers(0, 2, size=count)
    for image, mask, target in zip(images, masks, targets, strict=True):
        top, left = rng.integers(0, SIZE - PATCH, size=2)
        patch = rng.uniform(-1, -0.3, size=(3, PATCH, PATCH))
        patch[0 if target == 0 else 2] += 1.3
        image[:, top : top + PATCH, left : left + PATCH] = patch
        mask[top : top + PATCH, left : left + PATCH] = True
    return torch.from_numpy(images), torch.from_numpy(targets), torch.from_numpy(masks)


@pytest.fixture(scope="module")
def patch_model() -> LitAlexNet:
    torch.manual_seed(0)
    model = LitAlexNet(2, hidden_features=TINY_WIDTH, preprocessing=preprocessing_record(SIZE))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    model.train()
    for step in range(20):  # enough: it classifies the test images without a mistake
        images, targets, _ = patch_images(8, seed=step)
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.slow
def test_grad_cam_looks_at_the_region_that_tells_the_classes_apart(patch_model):
    images, targets, masks = patch_images(16, seed=1000)
    with torch.no_grad():
        assert (patch_model(images).argmax(1) == targets).float().mean() > 0.9  # it learned
    heat = grad_cam(patch_model.model, images, targets)
    assert heat.shape == (16, SIZE, SIZE) and heat.min() >= 0 and heat.max() <= 1
    assert (heat.flatten(1).std(1) > 0.01).all()  # not constant
    # The map is coarse (6x6 cells for a 128 px input), so its hot part, at least 0.7 of its
    # peak, is what counts: most of it falls in the square, which covers 14% of the image,
    # and the peak does for nearly every image, wherever the square is.
    hot = heat >= 0.7
    inside = (hot & masks).sum((1, 2)).float() / hot.sum((1, 2)).float()
    assert inside.median() > 0.5, inside
    peak_inside = masks.flatten(1).gather(1, heat.flatten(1).argmax(1, keepdim=True))
    assert peak_inside.float().mean() >= 0.85
    assert all(p.grad is None for p in patch_model.parameters())  # no gradients left behind


@pytest.mark.slow
def test_grad_cam_works_inside_inference_mode(patch_model):
    images, targets, _ = patch_images(2, seed=7)
    with torch.inference_mode():
        heat = grad_cam(patch_model.model, images, targets)
    assert heat.shape == (2, SIZE, SIZE) and heat.max() == pytest.approx(1.0)


@pytest.mark.slow
def test_predict_explain_writes_an_overlay_per_image(tiny_ckpt, tiny_run, tmp_path):
    images = tiny_run / "data" / "val"
    out = tmp_path / "cams"
    code = predict_main(["--ckpt", str(tiny_ckpt), str(images), "--out",
                         str(tmp_path / "p.csv"), "--explain", str(out)])  # fmt: skip
    assert code == 0
    written = sorted(out.iterdir())
    assert len(written) == len(list(images.rglob("*.jpg"))) == 6
    with Image.open(written[0]) as picture:
        assert picture.width == 96 and picture.height > 96  # the input's size, plus a caption
        pixels = np.asarray(picture.convert("RGB"))[:96]
        assert pixels.std() > 5


# --- suspicious labels ---------------------------------------------------------------------


def colour_folder(root: Path, per_class: int, flipped_per_class: int) -> list[Path]:
    """Two classes told apart by colour (red, blue), with some images put in the other class's
    folder; returns the flipped images' paths."""
    rng = np.random.default_rng(0)
    flipped = []
    for label, name in enumerate(("red", "blue")):
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(48, 48, 3))
            pixels[..., 0 if label == 0 else 2] += 180
            wrong = i < flipped_per_class
            folder = root / "train" / (("blue", "red")[label] if wrong else name)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}_{i}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            if wrong:
                flipped.append(path)
        val = root / "val" / name
        val.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((48, 48, 3), (200, 30, 30) if label == 0 else (30, 30, 200),
                                np.uint8)).save(val / "v.png")  # fmt: skip
    return flipped


AUDIT_FIT = ("--model.optimizer.init_args.lr=0.0005", "--data.batch_size=4",
             "--trainer.max_epochs=6", "--trainer.num_sanity_val_steps=0")  # fmt: skip


@pytest.mark.slow
def test_flipped_labels_rank_above_the_clean_ones(tmp_path, monkeypatch, capsys):
    pytest.importorskip("cleanlab")
    flipped = colour_folder(tmp_path / "data", per_class=12, flipped_per_class=2)
    monkeypatch.chdir(tmp_path)
    # Each fold's model is validated on its held-out fold once, after its last epoch. With the
    # tests' 64-wide classifier, 12 epochs at lr 1e-3 learn the colours (out-of-sample accuracy
    # 0.83, all but the flips) and rank the flips first with seeds 0-3; 6 epochs did not.
    fold_fit = fit_args(
        tmp_path / "data", *AUDIT_FIT, "--model.optimizer.init_args.lr=0.001",
        "--trainer.max_epochs=12", "--trainer.check_val_every_n_epoch=12",
    )  # fmt: skip
    args = ["--folds", "3", *fold_fit[1:]]
    assert find_label_issues_main(args) == 0
    run = tmp_path / "lightning_logs" / "version_0"
    rows = read_csv(run / "label_issues.csv")
    ranked = [Path(row["path"]) for row in rows]
    k = len(flipped)
    precision_at_k = len(set(ranked[:k]) & set(flipped)) / k
    assert precision_at_k >= 0.75, (precision_at_k, rows)
    top = rows[0]
    assert Path(top["path"]) in flipped and top["given"] != top["suggested"]
    assert float(top["suggested_prob"]) > float(top["given_prob"])
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == [
        "fold_accuracy.csv", "label_issues.csv", "label_issues.png"
    ]  # fmt: skip
    # The fold models' out-of-sample accuracy, per class and overall, printed and recorded.
    accuracy = read_csv(run / "fold_accuracy.csv")
    assert [(r["class"], r["images"]) for r in accuracy] == [
        ("blue", "12"), ("red", "12"), ("all", "24")
    ]  # fmt: skip
    overall = float(accuracy[-1]["accuracy"])
    per_class = [float(r["accuracy"]) for r in accuracy[:2]]
    assert overall == pytest.approx(sum(per_class) / 2, abs=1e-4)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["fold_0", "fold_1", "fold_2"]
    assert not list(run.rglob("*.ckpt"))  # the fold models are not kept
    out = capsys.readouterr().out
    assert "likely label issue(s)" in out and "lightning_logs/version_0/label_issues.csv" in out
    assert f"fold models' out-of-sample accuracy {overall:.2f} (chance 0.50); per class: " in out
    assert "close to chance" not in out  # these fold models learned the colours


def test_fold_accuracy_near_chance_says_the_ranking_means_little():
    samples = [(Path(f"{c}_{i}"), c) for c in range(3) for i in range(10)]
    probs = np.full((30, 3), 0.2)
    probs[np.arange(30), [0, 1, 2] * 10] = 0.6  # argmax right for 12 of 30: near chance
    probs[0] = np.nan  # an image that could not be scored (one of the 12) is left out
    rows = fold_accuracy(samples, probs, ["a", "b", "c"])
    assert rows[0] == {"class": "a", "images": 9, "accuracy": f"{3 / 9:.4f}"}
    assert rows[-1] == {"class": "all", "images": 29, "accuracy": f"{11 / 29:.4f}"}
    warning = chance_warning(rows, 3)
    assert warning.startswith("warning: the fold models are close to chance (0.38 out of sample")
    assert "--config configs/finetune.yaml" in warning
    probs[np.arange(30), [0] * 10 + [1] * 10 + [2] * 10] = 0.9  # now right for all 29
    assert chance_warning(fold_accuracy(samples, probs, ["a", "b", "c"]), 3) is None


def test_more_folds_than_images_per_class_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("cleanlab")
    colour_folder(tmp_path / "data", per_class=3, flipped_per_class=0)
    monkeypatch.chdir(tmp_path)
    code = find_label_issues_main(["--folds", "5", *fit_args(tmp_path / "data")[1:]])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --folds 5: class(es) 'blue' (3), 'red' (3) have fewer")


def test_missing_cleanlab_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    colour_folder(tmp_path / "data", per_class=3, flipped_per_class=0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)  # import cleanlab.filter fails
    assert find_label_issues_main(fit_args(tmp_path / "data")[1:]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: finding label issues needs cleanlab")
    assert "pip install -e '.[audit]'" in line
    assert not (tmp_path / "lightning_logs").exists()  # refused before any training


# --- the learning curve --------------------------------------------------------------------


def test_subsets_are_stratified_and_nested():
    samples = [(Path(f"{c}_{i}"), c) for c in range(3) for i in range(20 if c else 7)]
    subsets = nested_subsets(samples, [0.1, 0.5, 1.0], seed=0)
    assert [sum(t == 0 for _, t in subsets[f]) for f in (0.1, 0.5, 1.0)] == [1, 4, 7]
    assert [sum(t == 1 for _, t in subsets[f]) for f in (0.1, 0.5, 1.0)] == [2, 10, 20]
    assert set(subsets[0.1]) <= set(subsets[0.5]) <= set(subsets[1.0]) == set(samples)
    assert nested_subsets(samples, [0.5], seed=1)[0.5] != subsets[0.5]


def test_the_reading_says_whether_more_data_helps():
    assert "still rising" in reading({100: [0.70, 0.72], 200: [0.80, 0.81]})
    assert "about flat" in reading({100: [0.90, 0.91], 200: [0.905, 0.91]})


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_a_fraction_outside_zero_to_one_is_one_line(fraction, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = learning_curve_main(["--fractions", fraction, "1.0", *fit_args(tmp_path)[1:]])
    assert code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: --fractions must lie in (0, 1], got ")
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.slow
def test_learning_curve_compares_a_start_from_known_weights(
    tiny_ckpt, tmp_path, monkeypatch, capsys
):
    colour_folder(tmp_path / "data", per_class=8, flipped_per_class=0)
    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "from_ckpt.yaml"  # a 3-class checkpoint fine-tuned on these 2 classes
    overlay.write_text(f"model:\n  weights: {tiny_ckpt}\n")
    args = ["--fractions", "0.5", "1.0", "--seeds", "0", "--compare", str(overlay),
            *fit_args(tmp_path / "data", *AUDIT_FIT, "--trainer.max_epochs=2")[1:]]  # fmt: skip
    assert learning_curve_main(args) == 0
    run = tmp_path / "lightning_logs" / "version_0"
    rows = read_csv(run / "learning_curve.csv")
    assert [(r["config"], r["fraction"], r["train_images"]) for r in rows] == [
        ("baseline", "0.5", "8"), ("from_ckpt", "0.5", "8"),
        ("baseline", "1.0", "16"), ("from_ckpt", "1.0", "16"),
    ]  # fmt: skip
    for base, other in (rows[0:2], rows[2:4]):  # the gap is paired: same subset, same seed
        gap = float(other["best_val_acc"]) - float(base["best_val_acc"])
        assert float(other["gap_vs_baseline"]) == pytest.approx(gap)
        assert base["gap_vs_baseline"] == ""
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "baseline_f0.5_s0", "baseline_f1_s0", "from_ckpt_f0.5_s0", "from_ckpt_f1_s0"
    ]  # fmt: skip
    with Image.open(run / "learning_curve.png") as picture:
        assert picture.width > 300
    out = capsys.readouterr().out
    assert "points per doubling of the training images (8 to 16)" in out
    gaps = [100 * float(r["gap_vs_baseline"]) for r in rows if r["config"] == "from_ckpt"]
    assert (
        f"Starting from from_ckpt adds {gaps[0]:+.1f} points (± 0.0) at 4 images per class, "
        f"{gaps[1]:+.1f} points (± 0.0) at the largest set (8 per class)."
    ) in out


@pytest.mark.slow
def test_learning_curve_without_compare_writes_one_curve(tmp_path, monkeypatch, capsys):
    colour_folder(tmp_path / "data", per_class=8, flipped_per_class=0)
    monkeypatch.chdir(tmp_path)
    args = ["--fractions", "0.5", "1.0", "--seeds", "0",
            *fit_args(tmp_path / "data", *AUDIT_FIT, "--trainer.max_epochs=1")[1:]]  # fmt: skip
    assert learning_curve_main(args) == 0
    run = tmp_path / "lightning_logs" / "version_0"
    rows = read_csv(run / "learning_curve.csv")
    assert [(r["fraction"], r["seed"], r["train_images"]) for r in rows] == [
        ("0.5", "0", "8"), ("1.0", "0", "16")
    ]  # fmt: skip
    assert list(rows[0]) == ["fraction", "seed", "train_images", "best_val_acc"]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["f0.5_s0", "f1_s0"]
    out = capsys.readouterr().out
    assert "points per doubling of the training images (8 to 16)" in out
    assert "Starting from" not in out


def test_a_missing_compare_overlay_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--compare", "nope.yaml", *fit_args(tmp_path)[1:]]
    assert learning_curve_main(args) == 2
    line = capsys.readouterr().err.strip()
    assert line == "error: --compare 'nope.yaml' does not exist; pass a YAML overlay."
    assert not (tmp_path / "lightning_logs").exists()


def test_a_mistake_in_the_fit_arguments_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("cleanlab")
    monkeypatch.chdir(tmp_path)
    missing = fit_args(tmp_path / "nowhere")[1:]
    for main, args in ((learning_curve_main, missing), (find_label_issues_main, missing)):
        with pytest.raises(SystemExit) as exit_info:  # as train.py ends on a fit's mistake
            main(args)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("data.data_dir: " in line for line in err), err
    assert list((tmp_path / "lightning_logs").iterdir()) == []  # no version_N left empty
