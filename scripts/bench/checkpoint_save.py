"""How long an improving epoch's two checkpoint files take to write from a GPU: torch's default
copy of each tensor into fresh pageable host memory against pinned staging buffers, which torch's
caching host allocator keeps from one save to the next (what ``AtomicCheckpointIO`` asks for).

    python scripts/bench/checkpoint_save.py [--rounds 6] [--folder /tmp/checkpoint-save]

It saves the default fit's ``last.ckpt`` (weights and Adam's moments, 561 MB) and best file
(weights, 187 MB) with ``torch.save``, alternating the two ways, each file renamed over the
previous one as a fit does, and prints each round and the medians after each way's first round
(which pays first-use costs). On a CPU both ways are the same: there is nothing to copy.
"""

import argparse
import os
import resource
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each way")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/checkpoint-save"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    last, best = checkpoints(device)
    args.folder.mkdir(parents=True, exist_ok=True)
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for round_ in range(2 * args.rounds):
        pinned = bool(round_ % 2)
        pair = (
            timed_save(last, args.folder / "last.ckpt", pinned),
            timed_save(best, args.folder / "best.ckpt", pinned),
        )
        times[pinned].append(pair)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{device} round {round_}: {'pinned  ' if pinned else 'pageable'} "
              f"last {pair[0]:.3f} s, best {pair[1]:.3f} s, peak RSS {peak:.2f} GB")  # fmt: skip
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
