"""The benchmark's CPU paths, on a few images: every contender runs and the table adds up."""

import json

import pytest

from alexnet_lit.benchmark import benchmark, format_table, main, make_photo_folder


def test_photo_folder_is_a_jpeg_image_folder(tmp_path):
    make_photo_folder(tmp_path, n_train=4, n_val=2)
    assert len(list(tmp_path.glob("train/class_*/*.jpg"))) == 4
    assert len(list(tmp_path.glob("val/class_*/*.jpg"))) == 2


@pytest.mark.slow
def test_every_contender_runs_and_is_compared(tmp_path):
    result = benchmark(n_train=8, n_val=4, epochs=1, repeats=1, ceiling_steps=1)
    rows = result["rows"]
    assert set(rows) == {"tutorial", "default", "plain", "fast", "ceiling_fp32", "ceiling_bf16"}
    for name in ("default", "plain", "fast"):
        assert rows[name]["images_per_s"] > 0 and rows[name]["peak_rss_gb"] > 0.1
        assert rows[name]["percent_of_ceiling"] > 0
        assert 0.0 <= rows[name]["val_acc"] <= 1.0
    table = format_table(result)
    assert table.count("\n| ") == 8  # header, separator and 6 rows
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result))
    assert json.loads(path.read_text())["rows"]["default"]["wall_s"] > 0


def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
