"""The benchmark's CPU paths, on a few images: every contender runs and the table adds up."""

import json
import subprocess
import sys

import pytest
import torch

from scripts.bench.benchmark import (
    TUTORIAL_SCRIPT,
    benchmark,
    contender_command,
    format_table,
    main,
    make_photo_folder,
    summarize,
)
from scripts.bench.phases import summarize_phases


def test_photo_folder_is_a_jpeg_image_folder(tmp_path):
    make_photo_folder(tmp_path / "one", n_train=4, n_val=2)
    assert len(list(tmp_path.glob("one/train/class_*/*.jpg"))) == 4
    assert len(list(tmp_path.glob("one/val/class_*/*.jpg"))) == 2
    # Written by 2 processes, the folder is the same, byte for byte.
    make_photo_folder(tmp_path / "two", n_train=4, n_val=2, workers=2)
    one = sorted((tmp_path / "one").rglob("*.jpg"))
    two = sorted((tmp_path / "two").rglob("*.jpg"))
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]


def test_a_failed_contender_is_reported_and_the_others_still_compared():
    runs = {
        "tutorial": [{"wall_s": 10.0, "peak_rss_gb": 1.0, "train_seconds": [5.0, 4.0]}],
        "default": [{"wall_s": 8.0, "peak_rss_gb": 1.0, "train_seconds": [4.0, 2.0]}],
        "fast": [{"error": "exit status 1: boom"}],
        "ceiling_fp32": [{"images_per_s": 50.0, "peak_rss_gb": 1.0}],
    }
    result = summarize(runs, n_train=100, n_val=10, epochs=2, device="cpu")
    rows = result["rows"]
    # Whole run: 200 images in 8 s against 10 s. Training: the second epoch only, 2 s against 4.
    assert rows["default"]["images_per_s"] == 25.0 and rows["default"]["ratio_to_tutorial"] == 1.25
    assert rows["default"]["train_images_per_s"] == 50.0
    assert rows["default"]["train_ratio_to_tutorial"] == 2.0
    assert rows["default"]["percent_of_ceiling"] == 100.0
    assert rows["fast"] == {"what": rows["fast"]["what"], "runs": 0, "error": "exit status 1: boom"}
    assert "failed: exit status 1: boom" in format_table(result)


@pytest.fixture
def no_gpu(monkeypatch):
    """A CPU-only machine, here and in every process the benchmark starts: the tutorial's loop
    and configs/default.yaml (accelerator: auto) would otherwise pick a GPU that is there."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.slow
def test_every_contender_runs_and_is_compared(no_gpu, tmp_path):
    # One contender of each kind: the tutorial's file, a fit, a worker loop and both ceilings.
    only = ["tutorial", "default", "plain", "data_ceiling", "ceiling_fp32"]
    result = benchmark(
        n_train=8, n_val=4, epochs=1, repeats=1, ceiling_steps=1, only=only, device="cpu"
    )
    rows = result["rows"]
    assert list(rows) == only
    assert not [name for name, row in rows.items() if "error" in row]
    for name in ("default", "plain"):  # each fit was measured and compared
        assert {"wall_s", "ratio_to_tutorial", "percent_of_ceiling"} <= set(rows[name])
        assert 0.0 <= rows[name]["val_acc"] <= 1.0
    for name in ("tutorial", "default", "plain"):  # and its fixed costs, from its loop marks
        row = rows[name]
        assert row["startup_s"] > 0 and row["exit_s"] > 0 and row["outside_later_s"] >= 0
        assert row["startup_s"] + row["outside_later_s"] + row["exit_s"] < row["wall_s"]
    assert "ratio_to_tutorial" not in rows["data_ceiling"]  # a ceiling is compared with nothing
    table = format_table(result)
    assert table.startswith(f"CPU: {result['cpu']}; fast.yaml trains in ")
    assert result["fast_precision"] in ("32-true", "bf16-mixed")
    assert table.count("\n| ") == 7  # header, separator and 5 rows
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result))
    assert json.loads(path.read_text())["rows"].keys() == rows.keys()


def test_the_fixed_costs_are_read_from_the_loop_marks():
    # Launched at 100; two epochs: 10 s of training, 3 s of validation batches, 2 s of the rest.
    marks = {
        "first_step": 105.0,
        "epochs": [
            {"start": 104.0, "train_end": 114.0, "val_start": 114.5, "val_end": 117.5},
            {"start": 119.5, "train_end": 129.5, "val_start": 130.0, "val_end": 133.0},
        ],
        "train_end": 134.5,
    }
    phases = summarize_phases(100.0, 140.0, marks)
    assert phases["startup_s"] == 5.0 and phases["exit_s"] == 5.5
    assert phases["outside_s"] == [2.5, 2.0]
    assert phases["outside_later_s"] == 2.0  # the epochs after the first


def test_cuda_without_a_gpu_is_a_clear_error(no_gpu, capsys):
    # On a machine with a GPU this would start the whole CUDA benchmark, were the GPU not hidden.
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_the_baseline_process_imports_only_what_the_tutorial_imports(tmp_path):
    command = contender_command("tutorial", tmp_path, 1, "cpu", tmp_path, 1)
    assert command[:2] == [sys.executable, str(TUTORIAL_SCRIPT)]  # a file, not the package
    # -X importtime lists every module the process imports, on stderr.
    command = [sys.executable, "-X", "importtime", str(TUTORIAL_SCRIPT), "--help"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert {"torch", "torchvision"} <= imported
    assert not {"lightning", "torchmetrics", "alexnet_lit"} & imported
