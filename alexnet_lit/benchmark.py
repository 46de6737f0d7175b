"""Speed benchmark: the tutorial's own loop against ``scripts/train.py`` and the compute ceiling.

Every contender runs as its own process on the same generated JPEG ImageFolder, in alternating
order and repeated, and the table reports medians. ``scripts/benchmark.py`` is the entry point.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"

# name -> (what it is, which ceiling it is compared with)
CONTENDERS = {
    "tutorial": ("the tutorial's loop (baseline)", "ceiling_fp32"),
    "default": ("train.py fit, configs/default.yaml", "ceiling_fp32"),
    "plain": ("plain PyTorch loop, same model/loader/checkpoints", "ceiling_fp32"),
    "fast": ("train.py fit, default.yaml + fast.yaml", "ceiling_bf16"),
    "ceiling_fp32": ("compute ceiling: in-memory tensors, fp32", None),
    "ceiling_bf16": ("compute ceiling: in-memory tensors, bf16 + channels_last", None),
}


def make_photo_folder(root: Path, n_train: int, n_val: int, classes: int = 2, seed: int = 0):
    """Write a photo-like JPEG ImageFolder: smooth colour fields with noise, ~500x375 each."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count // classes):
                width, height = int(rng.integers(440, 560)), int(rng.integers(330, 420))
                coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
                coarse[..., c % 3] = np.maximum(coarse[..., c % 3], 160)
                image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
                noise = rng.normal(0, 12, size=(height, width, 3))
                pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)


def run_contender(
    name: str, data: Path, epochs: int, device: str, workdir: Path, ceiling_steps: int = 12
) -> dict:
    """Run one contender as its own process; return wall time, peak RSS and its own report."""
    report = workdir / f"{name}.json"
    if name in ("default", "fast"):
        command = [sys.executable, str(TRAIN_SCRIPT), "fit", "--config", "configs/default.yaml"]
        if name == "fast":
            command += ["--config", "configs/fast.yaml"]
        command += [
            f"--data.data_dir={data}",
            f"--trainer.max_epochs={epochs}",
            f"--trainer.logger.init_args.save_dir={workdir}",
        ]
        if device == "cuda":
            command += ["--trainer.accelerator=gpu", "--data.num_workers=16"]
        cwd = REPO
    else:
        command = [sys.executable, "-m", "alexnet_lit.benchmark", "--worker", name]
        command += [f"--data={data}", f"--epochs={epochs}", f"--device={device}"]
        command += [f"--steps={ceiling_steps}"]
        command += [f"--report={report}"]
        cwd = workdir
    # The checkout under test, not whatever copy of the package is installed.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    log = workdir / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{name} failed; its last output:\n{log.read_text()[-3000:]}")
    result = json.loads(report.read_text()) if report.exists() else {}
    result["wall_s"] = wall
    result["peak_rss_gb"] = usage.ru_maxrss / 2**20  # KiB on Linux; the largest process
    if name in ("default", "fast"):
        result["val_acc"] = _best_val_acc(workdir)
    return result


def _best_val_acc(log_root: Path) -> float | None:
    """Best val/acc of the newest run under ``log_root``, read from its best checkpoint's name."""
    runs = sorted(log_root.glob("lightning_logs/version_*"), key=lambda p: p.stat().st_mtime)
    names = [p.name for p in runs[-1].glob("checkpoints/best-*.ckpt")] if runs else []
    found = [float(m.group(1)) for n in names if (m := re.search(r"val_acc=([\d.]+)\.ckpt", n))]
    return max(found) if found else None


# --- the contenders that are not scripts/train.py, run as ``--worker NAME`` ---------------------


def _worker_tutorial(data: Path, epochs: int, device: str, steps: int) -> dict:
    from alexnet_lit.tutorial_loop import run_tutorial

    return {"val_acc": run_tutorial(data, epochs)}


def _worker_plain(data: Path, epochs: int, device: str, steps: int) -> dict:
    """The project's model, DataModule loaders and checkpoints in a hand-written loop."""
    from alexnet_lit import ImageFolderDataModule, LitAlexNet

    torch.manual_seed(0)
    dm = ImageFolderDataModule(data_dir=data)
    dm.setup("fit")
    module = LitAlexNet(num_classes=dm.num_classes, class_names=dm.class_names).to(device)
    model, optimizer = module.model, module.optimizer(module.parameters())
    train_loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
    best = -1.0
    for epoch in range(epochs):
        model.train()
        for batch in train_loader:  # a LoadedBatch: images, targets, skipped files
            loss = module.loss_fn(model(batch.images.to(device)), batch.targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = torch.zeros((), dtype=torch.long, device=device)
        with torch.inference_mode():
            for batch in val_loader:
                predicted = model(batch.images.to(device)).argmax(1)
                correct += (predicted == batch.targets.to(device)).sum()
        acc = correct.item() / len(dm.datasets["val"])
        state = {"state_dict": module.state_dict(), "optimizer": optimizer.state_dict()}
        if acc > best:
            best = acc
            torch.save({**state, "epoch": epoch}, "best.ckpt")
        torch.save({**state, "epoch": epoch}, "last.ckpt")
    return {"val_acc": best}


def _ceiling(device: str, bf16: bool, steps: int, batch: int = 32) -> dict:
    """Training images/s of AlexNet + Adam on in-memory tensors: no data loading at all."""
    from alexnet_lit.model import AlexNet
    from alexnet_lit.module import tutorial_adam

    torch.manual_seed(0)
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    model = AlexNet(num_classes=2).to(device, memory_format=memory_format)
    optimizer = tutorial_adam(model.parameters())  # the project's Adam, as in default.yaml
    images = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=memory_format)
    targets = torch.randint(0, 2, (batch,), device=device)
    warmup = min(3, steps)  # the first steps allocate memory and pick kernels
    dtype = torch.bfloat16 if bf16 else torch.float32
    for step in range(warmup + steps):
        if step == warmup:
            _synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _synchronize(device)
    return {"images_per_s": steps * batch / (time.perf_counter() - start)}


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


WORKERS = {
    "tutorial": _worker_tutorial,
    "plain": _worker_plain,
    "ceiling_fp32": lambda data, epochs, device, steps: _ceiling(device, False, steps),
    "ceiling_bf16": lambda data, epochs, device, steps: _ceiling(device, True, steps),
}


# --- the driver ------------------------------------------------------------------------------


def benchmark(
    n_train: int = 320,
    n_val: int = 80,
    epochs: int = 3,
    repeats: int = 3,
    device: str = "cpu",
    only: list[str] | None = None,
    ceiling_steps: int = 12,
) -> dict:
    """Run every contender ``repeats`` times in rotating order and return the medians."""
    names = only or list(CONTENDERS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="alexnet-bench-") as tmp:
        data = Path(tmp, "data")
        make_photo_folder(data, n_train, n_val)
        for repeat in range(repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                workdir = Path(tmp, f"{name}-{repeat}")
                workdir.mkdir()
                print(f"[{repeat + 1}/{repeats}] {name} ...", file=sys.stderr, flush=True)
                runs[name].append(run_contender(name, data, epochs, device, workdir, ceiling_steps))
    rows = {}
    for name, results in runs.items():
        wall = statistics.median(r["wall_s"] for r in results)
        if name.startswith("ceiling"):
            per_s = statistics.median(r["images_per_s"] for r in results)
        else:
            per_s = epochs * n_train / wall
        rows[name] = {
            "what": CONTENDERS[name][0],
            "images_per_s": per_s,
            "wall_s": wall,
            "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in results),
            "val_acc": statistics.median(r["val_acc"] for r in results)
            if all(r.get("val_acc") is not None for r in results)
            else None,
        }
    for name, row in rows.items():
        ceiling = CONTENDERS[name][1]
        if "tutorial" in rows:
            row["ratio_to_tutorial"] = row["images_per_s"] / rows["tutorial"]["images_per_s"]
        if ceiling in rows:
            row["percent_of_ceiling"] = 100 * row["images_per_s"] / rows[ceiling]["images_per_s"]
    return {
        "device": device,
        "torch": torch.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "train_images": n_train,
        "val_images": n_val,
        "epochs": epochs,
        "repeats": repeats,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    """The result as a Markdown table."""
    lines = [
        f"{result['epochs']} epochs of {result['train_images']} train + {result['val_images']} "
        f"val JPEGs, median of {result['repeats']}, device {result['device']}, "
        f"{result['cpus']} CPUs, torch {result['torch']}",
        "",
        "| run | images/s | x tutorial | % of ceiling | wall s | peak RSS GB | val/acc |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"].values():
        ratio = row.get("ratio_to_tutorial")
        ceiling = row.get("percent_of_ceiling")
        acc = row["val_acc"]
        lines.append(
            f"| {row['what']} | {row['images_per_s']:.1f} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | "
            f"{'' if ceiling is None else f'{ceiling:.0f}%'} | {row['wall_s']:.1f} | "
            f"{row['peak_rss_gb']:.2f} | {'' if acc is None else f'{acc:.3f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer images, 2 epochs, 1 repeat (< 3 min)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, help="runs per contender (default 3, quick 1)")
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), help="run only these")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=12, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.report.write_text(
            json.dumps(WORKERS[args.worker](args.data, args.epochs, args.device, args.steps))
        )
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; run on a GPU machine or use cpu.")
    # quick: half the images, 2 epochs, one repeat, a shorter ceiling (< 3 min on 2 CPU cores)
    size = {"n_train": 160, "n_val": 40, "epochs": 2, "repeats": 1, "ceiling_steps": 6}
    if not args.quick:
        size = {"n_train": 320, "n_val": 80, "epochs": 3, "repeats": 3, "ceiling_steps": 12}
    if args.repeats:
        size["repeats"] = args.repeats
    result = benchmark(**size, device=args.device, only=args.only)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
