"""DDP with 2 CPU processes (gloo): validation metrics equal the single-process values."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet_lit.data import ImageFolderDataModule, default_num_workers
from alexnet_lit.data.samplers import UnpaddedDistributedSampler
from alexnet_lit.training.cli import cli_main
from tests.conftest import make_image_folder
from tests.helpers import TINY, cli_args, read_csv, tiny_fit

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("size", [1, 2, 9, 10])
def test_unpadded_sampler_gives_each_sample_to_exactly_one_rank(size):
    parts = [list(UnpaddedDistributedSampler(range(size), 2, rank)) for rank in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(size))
    assert [len(UnpaddedDistributedSampler(range(size), 2, r)) for r in range(2)] == [
        len(p) for p in parts
    ]


def validate_in_subprocess(
    data: Path, ckpt: Path, out: Path, devices: int, *extra: str
) -> dict[str, float]:
    """Run ``scripts/train.py validate`` on ``devices`` CPU processes; return the logged metrics."""
    args = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "validate",
        "--config", str(ROOT / "configs" / "default.yaml"),
        f"--data.data_dir={data}", *TINY, f"--ckpt_path={ckpt}", f"--trainer.devices={devices}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={out}",
    ]  # fmt: skip
    if devices > 1:
        args.append("--trainer.strategy=ddp")
    args += extra
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        args, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = out.glob("**/metrics.csv")
    (row,) = [r for r in read_csv(metrics_file) if r.get("val/acc")]
    return {key: float(row[key]) for key in ("val/acc", "val/loss")}


def test_loader_workers_share_the_usable_cpus_among_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))  # 16 usable CPUs
    assert default_num_workers() == 15  # one CPU kept for the training process
    assert default_num_workers(processes=4) == 3  # 4 CPUs each, one for each process
    assert default_num_workers(processes=32) == 0  # fewer CPUs than processes: load in-process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)))
    assert default_num_workers() == 16  # capped: more workers only cost memory


@pytest.fixture(scope="module")
def nine_val_images(tmp_path_factory) -> tuple[Path, Path]:
    """A dataset with 9 validation images and a weights-only checkpoint trained one step on it."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_image_folder(tmp / "data", splits={"train": 1, "val": 3})
    datamodule = ImageFolderDataModule(str(data), batch_size=2, num_workers=0, image_size=67)
    trainer = tiny_fit(datamodule, max_steps=1, limit_val_batches=0)
    ckpt = tmp / "model.ckpt"
    trainer.save_checkpoint(ckpt, weights_only=True)
    return data, ckpt


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_ddp_validation_equals_single_process(backend, nine_val_images, tmp_path):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is a Linux-only extra")
    data, ckpt = nine_val_images
    extra = [f"--data.backend={backend}"]
    # 9 validation images: torch's DistributedSampler would score one of them twice on 2 ranks.
    with pytest.MonkeyPatch.context() as mp:  # one process, in this one
        mp.chdir(tmp_path)
        cli = cli_main(cli_args("validate", data, f"--ckpt_path={ckpt}", *extra))
    single = {key: float(cli.trainer.callback_metrics[key]) for key in ("val/acc", "val/loss")}
    ddp = validate_in_subprocess(data, ckpt, tmp_path / "two", 2, *extra)
    # Exact only if every image counts once; 0 < acc < 1 so a repeated image would change it.
    assert 0.0 < single["val/acc"] < 1.0
    assert ddp["val/acc"] == single["val/acc"]
    assert ddp["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)
