"""The training loader alone: the project's against torchvision's ImageFolder with the tutorial's
transforms, one worker each, on the same files, in one process, alternating.

    python scripts/bench/loaders.py [--photos 500x375|12mp] [--images N] [--rounds R] [--json F]

The baseline is what the tutorial's script feeds its model: ``datasets.ImageFolder`` with
``RandomResizedCrop(224)``, ``RandomHorizontalFlip()``, ``ToTensor()`` and ``Normalize`` (PIL,
float tensors from the worker). The project's loader is ``ImageFolderDataModule``'s training
loader with the same augmentation, and each batch then goes through the DataModule's hooks (the
float conversion and normalization happen there, in this process, and are timed too). Both get
one worker, batches of 32 and persistent workers; each is warmed up once, then they alternate.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's package

from alexnet_lit import ImageFolderDataModule
from scripts.bench.benchmark import cpu_description, make_photo_folder
from scripts.bench.tutorial_loop import tutorial_transforms

BATCH = 32


def tutorial_loader(root: Path) -> DataLoader:
    """The tutorial's training ImageFolder and transforms, with one persistent worker."""
    dataset = datasets.ImageFolder(root / "train", transform=tutorial_transforms()[0])
    return DataLoader(dataset, BATCH, shuffle=True, num_workers=1, persistent_workers=True)


def project_loader(root: Path) -> tuple[ImageFolderDataModule, DataLoader]:
    """The DataModule's training loader (default preset), with one persistent worker."""
    dm = ImageFolderDataModule(root, batch_size=BATCH, num_workers=1, image_size=224)
    dm.setup("fit")
    return dm, dm.train_dataloader()


def one_pass(loader: DataLoader, dm: ImageFolderDataModule | None = None) -> float:
    """Images per second over one pass through ``loader``."""
    images = 0
    start = time.perf_counter()
    for batch in loader:
        if dm is not None:  # what Lightning does around the transfer (the device is the CPU)
            batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
        images += len(batch[0])
    return images / (time.perf_counter() - start)


def compare(root: Path, rounds: int) -> dict:
    torch.manual_seed(0)
    baseline = tutorial_loader(root)
    dm, ours = project_loader(root)
    one_pass(baseline), one_pass(ours, dm)  # start the workers, fill the page cache
    speeds: dict[str, list[float]] = {"tutorial": [], "project": []}
    for _ in range(rounds):
        speeds["tutorial"].append(one_pass(baseline))
        speeds["project"].append(one_pass(ours, dm))
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    return {
        "images": len(baseline.dataset),
        "rounds": rounds,
        "images_per_s": medians,
        "all_images_per_s": speeds,
        "ratio": medians["project"] / medians["tutorial"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default="500x375", choices=["500x375", "12mp"])
    parser.add_argument("--images", type=int, help="training images (default 320, 64 for 12mp)")
    parser.add_argument("--rounds", type=int, default=3, help="passes of each loader")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    images = args.images or (64 if args.photos == "12mp" else 320)
    with tempfile.TemporaryDirectory(prefix="alexnet-loaders-") as tmp:
        root = Path(tmp, "data")
        workers = min(4, len(os.sched_getaffinity(0)))
        make_photo_folder(root, images, 2, workers=workers, photos=args.photos)
        result = compare(root, args.rounds)
    result.update(photos=args.photos, cpu=cpu_description(), torch=torch.__version__)
    speeds = result["images_per_s"]
    print(
        f"{args.photos} JPEGs, {result['images']} images, 1 worker, batch {BATCH}, median of "
        f"{args.rounds} passes; CPU: {result['cpu']}\n"
        f"torchvision ImageFolder + the tutorial's transforms: {speeds['tutorial']:.1f} images/s\n"
        f"the project's training loader: {speeds['project']:.1f} images/s "
        f"({result['ratio']:.2f}x)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
