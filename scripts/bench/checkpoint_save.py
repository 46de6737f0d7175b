"""How long an improving epoch's two checkpoint files take to write from a GPU: torch's default
copy of each tensor into fresh pageable host memory against pinned staging buffers, which torch's
caching host allocator keeps from one save to the next (what ``AtomicCheckpointIO`` asks for).

    python scripts/bench/checkpoint_save.py [--rounds 6] [--folder DIR]

It saves the default fit's ``last.ckpt`` (weights and Adam's moments, 561 MB) and best file
(weights, 187 MB) with ``torch.save``, alternating the two ways, each file renamed over the
previous one as a fit does (in a temporary folder unless ``--folder`` names one), and prints each
round, with the process's memory and the pinned memory torch holds, and the medians after each
way's first round (which pays first-use costs). On a CPU both ways are the same: there is nothing
to copy.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.serialization import config

from alexnet_lit.model import AlexNet
from alexnet_lit.module import tutorial_adam


def checkpoints(device: str) -> tuple[dict, dict]:
    """The default fit's last (full state) and best (weights) checkpoints, after one step."""
    model = AlexNet(num_classes=2).to(device, memory_format=torch.channels_last)
    optimizer = tutorial_adam(model.parameters())
    images = torch.randn(32, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    targets = torch.randint(0, 2, (32,), device=device)
    torch.nn.functional.cross_entropy(model(images), targets).backward()
    optimizer.step()  # Adam's moments exist from here on
    weights = {"state_dict": model.state_dict()}
    return {**weights, "optimizer_states": [optimizer.state_dict()]}, weights


def timed_save(checkpoint: dict, path: Path, pinned: bool) -> float:
    temporary = path.with_name(path.name + ".tmp")
    start = time.perf_counter()
    with config.patch({"save.use_pinned_memory_for_d2h": pinned}), open(temporary, "wb") as file:
        torch.save(checkpoint, file)
        file.flush()
    seconds = time.perf_counter() - start
    os.replace(temporary, path)
    return seconds


def memory() -> str:
    """The process's resident memory now and the pinned host memory torch's allocator holds."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])  # Linux
    text = f"RSS {pages * os.sysconf('SC_PAGE_SIZE') / 2**30:.2f} GB"
    if torch.cuda.is_available():
        pinned = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
        text += f", pinned {pinned / 2**30:.2f} GB"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each way")
    parser.add_argument("--folder", type=Path, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    last, best = checkpoints(device)
    print(f"{device}: before any save, {memory()}")
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="checkpoint-save-", dir=args.folder) as folder:
        for round_ in range(2 * args.rounds):
            pinned = bool(round_ % 2)
            pair = (
                timed_save(last, Path(folder, "last.ckpt"), pinned),
                timed_save(best, Path(folder, "best.ckpt"), pinned),
            )
            times[pinned].append(pair)
            print(f"round {round_}: {'pinned  ' if pinned else 'pageable'} last {pair[0]:.3f} s, "
                  f"best {pair[1]:.3f} s; {memory()}")  # fmt: skip
    for pinned, pairs in times.items():
        later = pairs[1:] or pairs
        print(
            f"{'pinned' if pinned else 'pageable'}: first round {sum(pairs[0]):.3f} s; median of "
            f"the others: last {statistics.median(a for a, _ in later):.3f} s, best "
            f"{statistics.median(b for _, b in later):.3f} s, both "
            f"{statistics.median(a + b for a, b in later):.3f} s"
        )


if __name__ == "__main__":
    main()
