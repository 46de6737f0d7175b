"""The tutorial's training script, reproduced from its recipe as the benchmark's baseline.

It keeps the tutorial's behaviour on purpose, flaws included: a random crop at validation, 8
loader workers whatever the machine, validation batches of 5, and a ``loss.item()`` plus a print
every step. Do not use it to train; use ``scripts/train.py``.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


def tutorial_alexnet(input_channel: int, class_num: int) -> nn.Sequential:
    """The tutorial's ``AlexNet(input_channel, class_num)``: an ``nn.Sequential`` (22 layers)."""
    return nn.Sequential(
        nn.Conv2d(input_channel, 96, kernel_size=11, stride=4, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.ReLU(),
        nn.Conv2d(256, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Flatten(),
        nn.Linear(6400, 4096),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(4096, class_num),
    )


def tutorial_transforms() -> tuple[transforms.Compose, transforms.Compose]:
    """The tutorial's train and val transforms: a random crop at validation too."""
    normalize = transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    val_tf = transforms.Compose(
        [transforms.RandomResizedCrop(224), transforms.ToTensor(), normalize]
    )
    return train_tf, val_tf


def run_tutorial(
    data_dir: str | Path,
    epochs: int = 10,
    out: str | Path = "alexnet.pt",
    train_seconds: list[float] | None = None,
    marks: dict | None = None,
) -> float:
    """Train as the tutorial does and return the best validation accuracy.

    ``train_seconds``, when given, receives each epoch's training time (the benchmark's
    measurement, not the tutorial's): from the epoch's start to its last step. ``marks``
    receives the Unix times of the loops' edges, as ``phases.PhaseTimer`` records them.
    """
    marks = {"first_step": None, "epochs": []} if marks is None else marks
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    print(device)
    train_tf, val_tf = tutorial_transforms()
    train_root, val_root = Path(data_dir, "train"), Path(data_dir, "val")
    assert train_root.exists() and val_root.exists(), f"{data_dir} path does not exist."
    train_set = datasets.ImageFolder(train_root, transform=train_tf)
    val_set = datasets.ImageFolder(val_root, transform=val_tf)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True, num_workers=8)
    val_loader = DataLoader(val_set, batch_size=5, shuffle=False, num_workers=8)

    model = tutorial_alexnet(3, len(train_set.classes)).to(device)
    loss_function = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    best_acc = 0.0
    for epoch in range(epochs):
        model.train()
        running_loss = 0.0
        start = time.perf_counter()
        edges = {"start": time.time()}
        marks["epochs"].append(edges)
        for step, (images, labels) in enumerate(train_loader):
            marks["first_step"] = marks["first_step"] or time.time()
            optimizer.zero_grad()
            outputs = model(images.to(device))
            loss = loss_function(outputs, labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            print(f"train epoch[{epoch + 1}/{epochs}] step[{step + 1}/{len(train_loader)}] {loss}")
        edges["train_end"] = time.time()
        if train_seconds is not None:  # loss.item() every step has waited for the device
            train_seconds.append(time.perf_counter() - start)
        model.eval()
        correct = 0
        edges["val_start"] = time.time()
        with torch.no_grad():
            for images, labels in val_loader:
                predicted = model(images.to(device)).argmax(dim=1)
                correct += (predicted == labels.to(device)).sum().item()
        edges["val_end"] = time.time()
        acc = correct / len(val_set)
        mean_loss = running_loss / len(train_loader)
        print(f"[epoch {epoch + 1}] train_loss: {mean_loss:.3f}  val_acc: {acc:.3f}")
        if acc > best_acc:
            best_acc = acc
            torch.save(model.state_dict(), out)
    marks["train_end"] = time.time()
    return best_acc


def main(argv: list[str] | None = None) -> None:
    """The benchmark's baseline process: run the loop, write its report as JSON.

    Run as a file (``python scripts/bench/tutorial_loop.py``), not through the package, so
    that the process imports what the tutorial's script imports (torch and torchvision) and not
    Lightning and the rest, whose import time, exit time and memory are not the tutorial's.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an ImageFolder root")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--report", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    train_seconds: list[float] = []
    marks: dict = {"first_step": None, "epochs": []}
    val_acc = run_tutorial(args.data, args.epochs, train_seconds=train_seconds, marks=marks)
    report = {"val_acc": val_acc, "train_seconds": train_seconds, "marks": marks}
    args.report.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
