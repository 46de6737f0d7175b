"""Speed benchmark: the tutorial's own loop against ``scripts/train.py`` and the compute ceiling.

Every contender runs as its own process on the same generated JPEG ImageFolder, in alternating
order and repeated, and the table reports medians. Two speeds are reported for each fit:

- whole run: training images over the process's wall time (start-up, validation, checkpoints);
- training: images per second of the training loop itself, from each epoch's start to its last
  optimizer step, over the epochs after the first (which pays for worker start-up and warm-up).
  This is what the compute ceiling measures, so "% of ceiling" uses it.

Run it as ``python scripts/bench/benchmark.py [--quick] [--json FILE] [--device cpu|cuda]``.
Each contender inherits the environment, so allocator settings (``LD_PRELOAD``,
``MALLOC_*_``) are measured by setting them for the whole benchmark (docs/speed.md).
"""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
BENCHMARK_SCRIPT = Path(__file__).resolve()
# Run as a file, the baseline imports only torch and torchvision, as the tutorial's script does.
TUTORIAL_SCRIPT = BENCHMARK_SCRIPT.with_name("tutorial_loop.py")
if str(REPO) not in sys.path:  # run as a script: import the checkout under test
    sys.path.insert(0, str(REPO))

from alexnet_lit.checkpoints import best_checkpoint, checkpoint_score, find_checkpoint  # noqa: E402
from alexnet_lit.runs import read_scalars  # noqa: E402
from alexnet_lit.training.precision import cpu_bf16_flags, native_mixed_precision  # noqa: E402
from scripts.bench.phases import summarize_phases  # noqa: E402


@dataclass(frozen=True)
class Contender:
    what: str
    ceiling: str | None = None  # the ceiling row it is compared with
    cuda_only: bool = False  # left out of CPU runs unless named with --only
    reference: bool = False  # a ceiling: measures one part, compared with nothing
    on_request: bool = False  # run only when named with --only


CONTENDERS = {
    "tutorial": Contender("the tutorial's loop (baseline)", "ceiling_fp32"),
    "default": Contender("train.py fit, configs/default.yaml", "ceiling_fp32"),
    "plain": Contender("plain PyTorch loop, same model/loader/checkpoints", "ceiling_fp32"),
    "fast": Contender("train.py fit, default.yaml + fast.yaml", "ceiling_fast"),
    # What the checkpoint writers are worth: every step of a save on the training thread, and
    # the background writer of configs/background_checkpoints.yaml.
    "default_synchronous": Contender(
        "train.py fit, default.yaml, checkpoints synced on the training thread",
        "ceiling_fp32",
        on_request=True,
    ),
    "default_background": Contender(
        "train.py fit, default.yaml + background_checkpoints.yaml",
        "ceiling_fp32",
        on_request=True,
    ),
    "data_ceiling": Contender(
        "data ceiling: the training loader alone, to the device", reference=True
    ),
    "ceiling_fp32": Contender(
        "compute ceiling: in-memory tensors, fp32 + channels_last", reference=True
    ),
    "ceiling_fast": Contender(
        "compute ceiling: in-memory tensors, fast.yaml's precision + channels_last",
        reference=True,
    ),
    # The DALI backend and batches of 256, for GPUs (run on a CPU only when named with --only).
    "dali": Contender("train.py fit, default.yaml, data.backend: dali", "ceiling_fp32", True),
    "fast_dali": Contender("train.py fit, fast.yaml, data.backend: dali", "ceiling_fast", True),
    "default_b256": Contender("train.py fit, default.yaml, batch 256", "ceiling_fp32_b256", True),
    "fast_dali_b256": Contender(
        "train.py fit, fast.yaml, data.backend: dali, batch 256", "ceiling_fast_b256", True
    ),
    "data_ceiling_dali": Contender(
        "data ceiling: the DALI training loader alone", cuda_only=True, reference=True
    ),
    "ceiling_fp32_b256": Contender(
        "compute ceiling: fp32 + channels_last, batch 256", cuda_only=True, reference=True
    ),
    "ceiling_fast_b256": Contender(
        "compute ceiling: fast.yaml's precision, batch 256", cuda_only=True, reference=True
    ),
    "ceiling_bf16_nchw": Contender(
        "compute ceiling: in-memory tensors, bf16, default layout", cuda_only=True, reference=True
    ),
    "ceiling_compiled": Contender(
        "compute ceiling: bf16 + channels_last + torch.compile", cuda_only=True, reference=True
    ),
}
# Each fit: its configs, then other command-line arguments.
DALI = "--data.backend=dali"
FITS = {
    "default": (["configs/default.yaml"], []),
    "fast": (["configs/default.yaml", "configs/fast.yaml"], []),
    "default_synchronous": (
        ["configs/default.yaml"],
        ["--trainer.plugins=alexnet_lit.checkpoints.AtomicCheckpointIO"],
    ),
    "default_background": (["configs/default.yaml", "configs/background_checkpoints.yaml"], []),
    "dali": (["configs/default.yaml"], [DALI]),
    "fast_dali": (["configs/default.yaml", "configs/fast.yaml"], [DALI]),
    "default_b256": (["configs/default.yaml"], ["--data.batch_size=256"]),
    "fast_dali_b256": (
        ["configs/default.yaml", "configs/fast.yaml"],
        [DALI, "--data.batch_size=256"],
    ),
}
# Sizes by (device, --quick): images, epochs, runs per contender, timed steps of the ceilings.
SIZES = {
    ("cpu", False): dict(n_train=320, n_val=80, epochs=3, repeats=3, ceiling_steps=12),
    ("cpu", True): dict(n_train=160, n_val=40, epochs=2, repeats=1, ceiling_steps=6),
    ("cuda", False): dict(n_train=4096, n_val=512, epochs=3, repeats=2, ceiling_steps=100),
    ("cuda", True): dict(n_train=2048, n_val=256, epochs=2, repeats=1, ceiling_steps=50),
}
GPU_WORKERS = 16


# --- the data ----------------------------------------------------------------------------------


# Photo sizes the benchmark writes: ranges of (width, height).
PHOTOS = {"500x375": ((440, 560), (330, 420)), "12mp": ((4000, 4001), (3000, 3001))}


def make_photo_folder(
    root: Path,
    n_train: int,
    n_val: int,
    classes: int = 2,
    seed: int = 0,
    workers: int = 1,
    photos: str = "500x375",
) -> None:
    """Write a photo-like JPEG ImageFolder: smooth colour fields with noise, one dominant
    colour per class; every tenth image of a class has the next class's colour (a mislabelled
    image), so no model gets every image right and the mistake pictures are drawn.

    ``photos`` is ``500x375`` (~500x375 each, like the tutorial's dog photos) or ``12mp``
    (4000x3000, a phone camera's). Each image depends only on ``seed`` and its place (split,
    class, index), so ``workers`` processes write the same folder as one.
    """
    jobs = []
    for split_index, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [
                (folder / f"{i:05d}.jpg", (seed, split_index, c, i), looks, photos)
                for i in range(count // classes)
                for looks in [(c + 1) % classes if i % 10 == 9 else c]
            ]
    if workers <= 1:
        for job in jobs:
            _write_photo(*job)
        return
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_photo, *zip(*jobs, strict=True), chunksize=64))


def _write_photo(path: Path, key: tuple[int, ...], c: int, photos: str = "500x375") -> None:
    rng = np.random.default_rng(key)
    widths, heights = PHOTOS[photos]
    width, height = int(rng.integers(*widths)), int(rng.integers(*heights))
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    coarse[..., c % 3] = np.maximum(coarse[..., c % 3], 160)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 12, size=(height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)


# --- one contender, as its own process ---------------------------------------------------------


def contender_command(
    name: str, data: Path, epochs: int, device: str, workdir: Path, ceiling_steps: int
) -> list[str]:
    """The command line that runs one contender; the others write ``workdir/<name>.json``."""
    report = workdir / f"{name}.json"
    if name in FITS:
        command = [sys.executable, str(TRAIN_SCRIPT), "fit"]
        configs, extra = FITS[name]
        for config in configs:
            command += ["--config", config]
        command += [
            f"--data.data_dir={data}",
            f"--trainer.max_epochs={epochs}",
            f"--trainer.logger.init_args.save_dir={workdir}",
            "--trainer.callbacks+=phases.PhaseTimer",
            f"--trainer.callbacks.report={workdir / 'phases.json'}",
            *extra,
        ]
        if device == "cuda":
            command += ["--trainer.accelerator=gpu", f"--data.num_workers={GPU_WORKERS}"]
        return command
    if name == "tutorial":
        return [
            sys.executable, str(TUTORIAL_SCRIPT), f"--data={data}", f"--epochs={epochs}",
            f"--report={report}",
        ]  # fmt: skip
    # Through scripts/benchmark.py, which starts up as scripts/train.py does.
    return [
        sys.executable, str(BENCHMARK_SCRIPT), "--worker", name, f"--data={data}",
        f"--epochs={epochs}", f"--device={device}", f"--steps={ceiling_steps}",
        f"--report={report}",
    ]  # fmt: skip


def run_contender(
    name: str,
    data: Path,
    epochs: int,
    device: str,
    workdir: Path,
    ceiling_steps: int,
    timeout: float,
) -> dict:
    """Run one contender as its own process; return wall time, peak RSS and its own report.

    A contender that fails or runs past ``timeout`` seconds returns ``{"error": ...}`` instead,
    so that one broken run does not cost the others.
    """
    report = workdir / f"{name}.json"
    command = contender_command(name, data, epochs, device, workdir, ceiling_steps)
    cwd = REPO if name in FITS else workdir
    # The checkout under test, not whatever copy of the package is installed.
    # (scripts/bench for phases.PhaseTimer).
    path = [str(REPO), str(BENCHMARK_SCRIPT.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    log = workdir / f"{name}.log"
    launched, start = time.time(), time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout stops its workers too
        )
        while True:  # wait4, not wait: its resource usage holds the peak RSS
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                os.killpg(process.pid, signal.SIGKILL)
                os.wait4(process.pid, 0)
                return {"error": f"ran past {timeout:.0f} s"}
            time.sleep(0.05)
    wall, exited = time.perf_counter() - start, time.time()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text()[-3000:]
        print(f"{name} failed; its last output:\n{tail}", file=sys.stderr, flush=True)
        last = tail.strip().splitlines()[-1] if tail.strip() else ""
        return {"error": f"exit status {code}: {last}"}
    result = json.loads(report.read_text()) if report.exists() else {}
    result["wall_s"] = wall
    result["peak_rss_gb"] = usage.ru_maxrss / 2**20  # KiB on Linux; the largest process
    if name in FITS:
        run = _newest_run(workdir)
        result["val_acc"] = _best_val_acc(run)
        result["train_seconds"] = _epoch_times(run)
        result["marks"] = json.loads((workdir / "phases.json").read_text())
    if "marks" in result:
        result.update(summarize_phases(launched, exited, result.pop("marks")))
    return result


def _newest_run(log_root: Path) -> Path:
    """The run folder of the fit under ``log_root`` (its newest last.ckpt's)."""
    return find_checkpoint([log_root / "lightning_logs"], "last").parent.parent


def _best_val_acc(run: Path) -> float | None:
    """A run's best val/acc, read from its best checkpoint's name."""
    best = best_checkpoint(run)
    return None if best is None else checkpoint_score(best)


def _epoch_times(run: Path) -> list[float]:
    """A fit's ``train/epoch_time_s`` per epoch (EpochTimer), from its logged scalars."""
    return [value for _, value in read_scalars(run).get("train/epoch_time_s", [])]


# --- the contenders run as ``scripts/benchmark.py --worker NAME`` -----------------------------


def _worker_plain(data: Path, epochs: int, device: str, steps: int) -> dict:
    """The project's model, DataModule loaders and checkpoints in a hand-written loop."""
    from alexnet_lit import ImageFolderDataModule, LitAlexNet
    from alexnet_lit.checkpoints import AtomicCheckpointIO

    torch.manual_seed(0)
    workers = GPU_WORKERS if device == "cuda" else None
    dm = ImageFolderDataModule(data_dir=data, num_workers=workers)
    dm.setup("fit")
    module = LitAlexNet(
        num_classes=dm.num_classes, class_names=dm.class_names, channels_last=True
    ).to(device)  # as configs/default.yaml
    optimizer, writer = module.optimizer(module.parameters()), AtomicCheckpointIO()
    train_loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
    best, train_seconds = -1.0, []
    marks: dict = {"first_step": None, "epochs": []}  # as phases.PhaseTimer records them
    for epoch in range(epochs):
        module.train()
        start = time.perf_counter()
        edges = {"start": time.time()}
        marks["epochs"].append(edges)
        for batch in train_loader:  # a LoadedBatch: uint8 images, targets, indices, skipped
            marks["first_step"] = marks["first_step"] or time.time()
            images, targets = _to_device(dm, batch, device)
            loss = module.loss_fn(module(images), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # freed once applied, as LitAlexNet does
        _synchronize(device)
        train_seconds.append(time.perf_counter() - start)
        edges["train_end"] = edges["val_start"] = time.time()
        module.eval()
        correct = torch.zeros((), dtype=torch.long, device=device)
        with torch.inference_mode():
            for batch in val_loader:
                images, targets = _to_device(dm, batch, device)
                correct += (module(images).argmax(1) == targets).sum()
        acc = correct.item() / len(dm.datasets["val"])
        edges["val_end"] = time.time()
        # The files configs/default.yaml writes, with the project's atomic writer (temporary
        # file, fsync, rename) on this thread: the weights when val/acc improves, and the full
        # state in last.ckpt every epoch.
        weights = {"state_dict": module.state_dict(), "epoch": epoch}
        if acc > best:
            best = acc
            writer.save_checkpoint(weights, "best.ckpt")
        writer.save_checkpoint({**weights, "optimizer": optimizer.state_dict()}, "last.ckpt")
    marks["train_end"] = time.time()
    return {"val_acc": best, "train_seconds": train_seconds, "marks": marks}


def _data_ceiling(data: Path, epochs: int, device: str, backend: str = "pil") -> dict:
    """The project's training loader alone, batches handed to the device, no model: how many
    images/s the data pipeline can deliver (same workers, presets and hooks as a fit)."""
    import lightning as L

    from alexnet_lit import ImageFolderDataModule

    workers = GPU_WORKERS if device == "cuda" else None
    dm = ImageFolderDataModule(data, num_workers=workers, backend=backend)
    # A trainer only to tell the DataModule its device (pinning).
    dm.trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    dm.setup("fit")
    loader, train_seconds = dm.train_dataloader(), []
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in loader:
            _to_device(dm, batch, device)
        _synchronize(device)
        train_seconds.append(time.perf_counter() - start)
    return {"train_seconds": train_seconds}


def _to_device(dm, batch, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What Lightning does with a loader's batch: the DataModule's hooks around the transfer
    (a DALI batch is on the device, and normalized, already)."""
    images, targets = dm.on_before_batch_transfer(batch, 0)
    batch = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    return dm.on_after_batch_transfer(batch, 0)


def _ceiling(
    device: str,
    precision: str,
    steps: int,
    channels_last: bool = True,
    compiled: bool = False,
    batch: int = 32,
) -> dict:
    """Training images/s of AlexNet + Adam on in-memory tensors: no data loading at all.

    ``precision`` is a Lightning precision: ``32-true``, ``bf16-mixed`` or ``16-mixed``.
    """
    from alexnet_lit.model import AlexNet
    from alexnet_lit.module import tutorial_adam

    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = AlexNet(num_classes=2).to(device, memory_format=memory_format)
    optimizer = tutorial_adam(model.parameters())  # the project's Adam, as in default.yaml
    forward = torch.compile(model) if compiled else model
    images = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=memory_format)
    targets = torch.randint(0, 2, (batch,), device=device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device, enabled=precision == "16-mixed")
    warmup = min(3, steps)  # the first steps allocate memory, pick kernels (and compile)
    for step in range(warmup + steps):
        if step == warmup:
            _synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(forward(images), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)  # freed once applied, as LitAlexNet does
    _synchronize(device)
    return {"images_per_s": steps * batch / (time.perf_counter() - start)}


def fast_precision(device: str) -> str:
    """The precision ``configs/fast.yaml`` trains in on ``device``."""
    return native_mixed_precision("gpu" if device == "cuda" else "cpu")[0]


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


WORKERS = {
    "plain": _worker_plain,
    "data_ceiling": lambda data, epochs, device, steps: _data_ceiling(data, epochs, device),
    "ceiling_fp32": lambda data, epochs, device, steps: _ceiling(device, "32-true", steps),
    "ceiling_fast": lambda data, epochs, device, steps: _ceiling(
        device, fast_precision(device), steps
    ),
    "data_ceiling_dali": lambda data, epochs, device, steps: _data_ceiling(
        data, epochs, device, backend="dali"
    ),
    "ceiling_fp32_b256": lambda data, epochs, device, steps: _ceiling(
        device, "32-true", steps, batch=256
    ),
    "ceiling_fast_b256": lambda data, epochs, device, steps: _ceiling(
        device, fast_precision(device), steps, batch=256
    ),
    "ceiling_bf16_nchw": lambda data, epochs, device, steps: _ceiling(
        device, "bf16-mixed", steps, channels_last=False
    ),
    "ceiling_compiled": lambda data, epochs, device, steps: _ceiling(
        device, "bf16-mixed", steps, compiled=True
    ),
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
    timeout: float = 1800.0,
    time_budget: float | None = None,
    json_path: Path | None = None,
) -> dict:
    """Run every contender ``repeats`` times in rotating order and return the medians.

    With ``time_budget`` (seconds), no new round starts once the rounds so far suggest it would
    end past the budget. With ``json_path`` the summary is rewritten after every run, so an
    interrupted benchmark still leaves what it measured.
    """
    names = only or [
        n
        for n, c in CONTENDERS.items()
        if not c.on_request and (device == "cuda" or not c.cuda_only)
    ]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    size = {"n_train": n_train, "n_val": n_val, "epochs": epochs, "device": device}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alexnet-bench-") as tmp:
        data = Path(tmp, "data")
        make_photo_folder(data, n_train, n_val, workers=min(16, len(os.sched_getaffinity(0))))
        print(f"data written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        for repeat in range(repeats):
            elapsed = time.perf_counter() - started
            if time_budget is not None and repeat and elapsed * (repeat + 1) / repeat > time_budget:
                print(f"stopping after {repeat} round(s): the time budget", file=sys.stderr)
                break
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                if time_budget is not None and time.perf_counter() - started > time_budget:
                    print(f"{name} not run: the time budget", file=sys.stderr)
                    continue
                workdir = Path(tmp, f"{name}-{repeat}")
                workdir.mkdir()
                print(f"[{repeat + 1}/{repeats}] {name} ...", file=sys.stderr, flush=True)
                result = run_contender(name, data, epochs, device, workdir, ceiling_steps, timeout)
                runs[name].append(result)
                if "error" not in result:
                    # Its checkpoints (~1 GB) would otherwise fill the page cache and the disk
                    # and slow the runs after it.
                    shutil.rmtree(workdir)
                if json_path is not None:
                    json_path.write_text(json.dumps(summarize(runs, **size), indent=2))
    return summarize(runs, **size)


def summarize(
    runs: dict[str, list[dict]], n_train: int, n_val: int, epochs: int, device: str
) -> dict:
    """Medians per contender, ratios to the tutorial and percentages of the matching ceiling."""
    rows = {}
    for name, results in runs.items():
        good = [r for r in results if "error" not in r]
        row = {"what": CONTENDERS[name].what, "runs": len(good)}
        if not good:
            row["error"] = results[-1]["error"] if results else "not run"
            rows[name] = row
            continue
        if "images_per_s" in good[0]:  # a compute ceiling reports its own speed
            row["train_images_per_s"] = statistics.median(r["images_per_s"] for r in good)
        elif CONTENDERS[name].reference:  # the data ceiling: its loop is all that counts
            row["train_images_per_s"] = statistics.median(
                _steady(r["train_seconds"], n_train) for r in good
            )
        else:
            wall = statistics.median(r["wall_s"] for r in good)
            row["wall_s"] = wall
            row["images_per_s"] = epochs * n_train / wall
            row["train_images_per_s"] = statistics.median(
                _steady(r["train_seconds"], n_train) for r in good
            )
            accs = [r["val_acc"] for r in good if r.get("val_acc") is not None]
            row["val_acc"] = statistics.median(accs) if accs else None
            for key in ("startup_s", "outside_later_s", "exit_s"):
                if all(key in r for r in good):
                    row[key] = statistics.median(r[key] for r in good)
        row["peak_rss_gb"] = statistics.median(r["peak_rss_gb"] for r in good)
        rows[name] = row
    baseline = rows.get("tutorial", {})
    for name, row in rows.items():
        for key, ratio in (
            ("images_per_s", "ratio_to_tutorial"),
            ("train_images_per_s", "train_ratio_to_tutorial"),
        ):
            if key in row and key in baseline and not CONTENDERS[name].reference:
                row[ratio] = row[key] / baseline[key]
        ceiling = rows.get(CONTENDERS[name].ceiling or "", {})
        if "train_images_per_s" in row and "train_images_per_s" in ceiling:
            row["percent_of_ceiling"] = (
                100 * row["train_images_per_s"] / ceiling["train_images_per_s"]
            )
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu_description(),
        "fast_precision": fast_precision(device),
        "train_images": n_train,
        "val_images": n_val,
        "epochs": epochs,
        "rows": rows,
    }


def _steady(train_seconds: list[float], n_train: int) -> float:
    """Training images/s over the epochs after the first (all of them if there is only one)."""
    later = train_seconds[1:] or train_seconds
    return n_train * len(later) / sum(later)


def cpu_description() -> str:
    """The CPU's model name, torch's kernel capability and whether it has bf16 instructions."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            models = (line.split(":", 1)[1] for line in cpuinfo if line.startswith("model name"))
            name = next(models, name).strip()
    except OSError:
        pass
    flags = cpu_bf16_flags()
    bf16 = f"native bf16 ({', '.join(flags)})" if flags else "no native bf16"
    return f"{name}, capability {torch.backends.cpu.get_cpu_capability()}, {bf16}"


def format_table(result: dict) -> str:
    """The result as a Markdown table."""
    lines = [
        f"CPU: {result.get('cpu', 'unknown')}; fast.yaml trains in "
        f"{result.get('fast_precision', 'unknown')}",
        f"{result['epochs']} epochs of {result['train_images']} train + {result['val_images']} "
        f"val JPEGs, medians, device {result['device']}, {result['cpus']} CPUs, "
        f"torch {result['torch']}",
        "",
        "| run | runs | whole run img/s | x tutorial | training img/s | x tutorial | % of ceiling "
        "| wall s | start-up s | outside loops s/epoch | end to exit s | peak RSS GB | val/acc |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]

    def cell(row: dict, key: str, spec: str, suffix: str = "") -> str:
        value = row.get(key)
        return "" if value is None else f"{value:{spec}}{suffix}"

    for row in result["rows"].values():
        if "error" in row:
            lines.append(f"| {row['what']} | 0 | failed: {row['error']} |" + "  |" * 10)
            continue
        lines.append(
            f"| {row['what']} | {row['runs']} | {cell(row, 'images_per_s', '.1f')} | "
            f"{cell(row, 'ratio_to_tutorial', '.2f')} | {cell(row, 'train_images_per_s', '.1f')} | "
            f"{cell(row, 'train_ratio_to_tutorial', '.2f')} | "
            f"{cell(row, 'percent_of_ceiling', '.0f', '%')} | {cell(row, 'wall_s', '.1f')} | "
            f"{cell(row, 'startup_s', '.1f')} | {cell(row, 'outside_later_s', '.2f')} | "
            f"{cell(row, 'exit_s', '.1f')} | "
            f"{cell(row, 'peak_rss_gb', '.2f')} | {cell(row, 'val_acc', '.3f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, help="runs per contender (default: by size)")
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), help="run only these")
    parser.add_argument(
        "--time-budget", type=float, help="seconds; start no round that would end past it"
    )
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
    size = dict(SIZES[args.device, args.quick])
    if args.repeats:
        size["repeats"] = args.repeats
    timeout = 1800.0 if args.device == "cpu" else 180.0  # a GPU run is a lease: stop a hang
    result = benchmark(
        **size,
        device=args.device,
        only=args.only,
        timeout=timeout,
        time_budget=args.time_budget,
        json_path=args.json,
    )
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
