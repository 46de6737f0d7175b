"""Scan benchmark: a folder of many small JPEGs, scanned cold and warm, to the first step.

``python scripts/bench/scan.py --files 200000 [--root DIR] [--json FILE]`` writes (once) a
folder of that many small valid JPEGs in 1,000 classes (``train/`` only: val is split off), and
measures, each in a fresh process:

- the first scan of ``train/``, serial and parallel (files/s), each with an empty cache;
- the same scan with the cache warm;
- the time from the command to the first training step of ``train.py fit``, cache cold and warm;
- the memory the index keeps in the main process after ``setup("fit")`` (tracemalloc), per file;
- each of 4 DataLoader workers' private memory (USS, ``/proc/self/smaps_rollup``: Linux) after
  it has read every sample of its share of the index once, against its first.

The files are written just before, so they are read from the page cache: a cold disk or a
network filesystem makes the first scans slower and the cached one no slower.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLASSES = 1000


def write_dataset(root: Path, files: int) -> Path:
    """``root/train/class_NNNN/img_K.jpg``: ``files`` small JPEGs, a few hundred distinct."""
    import numpy as np
    from PIL import Image

    marker = root / f".complete-{files}"
    if marker.is_file():
        return root
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(256):
        buffer = BytesIO()
        pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
        blobs.append(buffer.getvalue())
    per_class = -(-files // CLASSES)
    written = 0
    for label in range(CLASSES):
        folder = root / "train" / f"class_{label:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(min(per_class, files - written)):
            (folder / f"img_{k:05d}.jpg").write_bytes(blobs[(label + k) % len(blobs)])
            written += 1
    marker.touch()
    return root


def run_python(code: str, env: dict[str, str]) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"a measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


SCAN = """
    import json, sys, time
    from pathlib import Path
    from alexnet_lit.data.folders import scan_split
    from alexnet_lit.data.scan_cache import ScanCache
    split = Path({split!r})
    start = time.perf_counter()
    scan = scan_split(split, cache=ScanCache(split), workers={workers})
    seconds = time.perf_counter() - start
    files = sum(len(v) for v in scan.images.values())
    print(json.dumps({{"seconds": seconds, "files": files}}))
"""

FIRST_STEP = """
    import json, subprocess, sys, time
    start = time.time()
    process = subprocess.run(
        [sys.executable, {train!r}, "fit", "--config", {config!r}, "--data.data_dir", {data!r},
         "--data.image_size=67", "--data.batch_size=8", "--data.num_workers=0",
         "--trainer.accelerator=cpu", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
         "--trainer.callbacks=null", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
         "--trainer.num_sanity_val_steps=0",
         "--trainer.callbacks+=first_step.PrintFirstStep"],
        capture_output=True, text=True, cwd={workdir!r})  # logger=false writes into the cwd
    lines = [l for l in process.stdout.splitlines() if l.startswith("FIRST_STEP ")]
    if process.returncode != 0 or not lines:
        sys.exit(process.stderr[-3000:])
    print(json.dumps({{"seconds": float(lines[-1].split()[1]) - start}}))
"""

INDEX_MEMORY = """
    import gc, json, tracemalloc
    from alexnet_lit.data import ImageFolderDataModule
    data = ImageFolderDataModule({data!r}, num_workers=0)
    tracemalloc.start()
    data.setup("fit")
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    files = len(data.datasets["train"]) + len(data.datasets["val"])
    print(json.dumps({{"bytes": held, "files": files}}))
"""

WORKER_MEMORY = """
    import json, os
    import torch
    from torch.utils.data import DataLoader, Dataset, get_worker_info
    from alexnet_lit.data import ImageFolderDataModule

    def private_bytes():
        fields = {{}}
        for line in open("/proc/self/smaps_rollup"):
            name, _, rest = line.partition(":")
            fields[name] = rest.split()[0] if rest.split() else "0"
        return 1024 * (int(fields["Private_Clean"]) + int(fields["Private_Dirty"]))

    class TouchEverySample(Dataset):
        # Each item reads one sample of the real index (its path and label), nothing more.
        def __init__(self, samples):
            self.samples = samples
            self.start = self.now = None
        def __len__(self):
            return len(self.samples)
        def __getitem__(self, index):
            path, target = self.samples[index]
            if self.start is None:  # this worker's first item
                self.start = self.now = private_bytes()
            elif index % 1024 == 0 or index >= len(self.samples) - 1024:
                self.now = private_bytes()
            return torch.tensor([get_worker_info().id, self.start, self.now, len(str(path))])

    data = ImageFolderDataModule({data!r}, num_workers=0)
    data.setup("fit")
    samples = data.datasets["train"].samples
    loader = DataLoader(TouchEverySample(samples), batch_size=64, num_workers=4)
    growth = {{}}
    for batch in loader:
        for worker, start, now, _ in batch.tolist():
            growth[worker] = now - start
    print(json.dumps({{"files": len(samples), "growth": growth}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--root", type=Path, help="where the dataset goes (kept for reuse)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--repeats", type=int, default=1, help="medians over this many runs")
    args = parser.parse_args()
    root = args.root or Path(tempfile.gettempdir(), f"alexnet-lit-scan-{args.files}")
    print(f"writing {args.files} JPEGs in {CLASSES} classes to {root} (once)...", flush=True)
    data = write_dataset(root, args.files)
    split = str(data / "train")
    bench = str(Path(__file__).resolve().parent)
    results: dict[str, float] = {}

    def measure(name: str, code: str, fresh_cache: bool, field: str = "seconds") -> float:
        values = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                cache_dir = cache if fresh_cache else str(root / "cache")
                env = {"ALEXNET_LIT_CACHE": cache_dir, "PYTHONPATH": f"{REPO}:{bench}"}
                values.append(run_python(code, env)[field])
        results[name] = statistics.median(values)
        print(f"  {name}: {results[name]:.2f} s", flush=True)
        return results[name]

    serial = measure("first scan, serial", SCAN.format(split=split, workers=1), True)
    parallel = measure("first scan, parallel", SCAN.format(split=split, workers=None), True)
    measure("warm-up of the kept cache", SCAN.format(split=split, workers=None), False)
    warm = measure("scan, cache warm", SCAN.format(split=split, workers=None), False)
    workdir = tempfile.mkdtemp(prefix="scan-bench-")
    first = dict(train=str(REPO / "scripts" / "train.py"), data=str(data), workdir=workdir)
    first["config"] = str(REPO / "configs" / "default.yaml")
    cold_step = measure("command to first step, cache cold", FIRST_STEP.format(**first), True)
    warm_step = measure("command to first step, cache warm", FIRST_STEP.format(**first), False)
    env = {"ALEXNET_LIT_CACHE": str(root / "cache")}
    index = run_python(INDEX_MEMORY.format(data=str(data)), env)
    workers = run_python(WORKER_MEMORY.format(data=str(data)), env)
    files = args.files
    rows = [
        ("files", f"{files}"),
        ("first scan, serial", f"{serial:.1f} s ({files / serial:,.0f} files/s)"),
        ("first scan, parallel", f"{parallel:.1f} s ({files / parallel:,.0f} files/s), "
         f"{serial / parallel:.2f}x serial"),
        ("scan, cache warm", f"{warm:.2f} s, {parallel / warm:.1f}x faster than the first"),
        ("command to first step", f"{cold_step:.1f} s cache cold, {warm_step:.1f} s warm"),
        ("index in the main process", f"{index['bytes'] / index['files']:.0f} bytes per file "
         f"({index['bytes'] / 2**20:.1f} MiB for {index['files']} files)"),
        ("worker private memory growth", ", ".join(
            f"{v / 2**20:.1f} MiB" for _, v in sorted(workers["growth"].items()))
         + f" (4 workers, {workers['files']} samples read once)"),
        ("1.28 M files, extrapolated linearly", f"first scan {1.28e6 / files * parallel:.0f} s, "
         f"warm {1.28e6 / files * warm:.1f} s"),
    ]  # fmt: skip
    print()
    print("| what | figure |\n| --- | --- |")
    for what, figure in rows:
        print(f"| {what} | {figure} |")
    if args.json:
        args.json.write_text(json.dumps({**results, "index": index, "workers": workers}, indent=2))


if __name__ == "__main__":
    main()
