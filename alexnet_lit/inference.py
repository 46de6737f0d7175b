"""Use a trained checkpoint: load it safely, predict image files in batches, write CSV rows."""

import csv
import inspect
import os
import pickle
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from alexnet_lit.images import load_image
from alexnet_lit.module import LitAlexNet
from alexnet_lit.scan import image_files
from alexnet_lit.transforms import eval_transform


class InferenceError(ValueError):
    """A checkpoint, path or option the user gave cannot be used, explained in one sentence."""


def load_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a file as data only (``weights_only=True``), with one-sentence errors.

    Raises:
        InferenceError: The file is missing, unreadable, or holds objects that could run code.
    """
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"checkpoint '{path}' does not exist; pass the path of a .ckpt file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InferenceError(
            f"'{path}' was refused: it holds Python objects that could run code when loaded "
            "(only tensors and plain data load, weights_only=True); re-save it as a state_dict "
            "from a source you trust."
        ) from err
    # torch.load raises many types for files that are not checkpoints (KeyError, EOFError, ...).
    except Exception as err:
        raise InferenceError(
            f"'{path}' is not a readable PyTorch checkpoint ({type(err).__name__}: {err}); "
            "check the file."
        ) from err


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> LitAlexNet:
    """Load a :class:`LitAlexNet` checkpoint (tensors and plain data only) in eval mode.

    Raises:
        InferenceError: The file is missing, unsafe, or not a LitAlexNet checkpoint.
    """
    checkpoint = load_checkpoint_dict(path)
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(
        checkpoint
    ):
        hint = (
            " it looks like the tutorial's alexnet.pt: convert it with "
            "scripts/import_seed_checkpoint.py first"
            if isinstance(checkpoint, dict) and "21.weight" in checkpoint
            else " pass a checkpoint written by scripts/train.py"
        )
        raise InferenceError(f"'{path}' is not a LitAlexNet checkpoint;{hint}.")
    accepted = inspect.signature(LitAlexNet.__init__).parameters
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    model = LitAlexNet(**hparams)
    given, own = set(checkpoint["state_dict"]), set(model.state_dict())
    problem = ""
    if given != own:
        missing, unexpected = sorted(own - given), sorted(given - own)
        problem = (
            f"{len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    else:
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as err:  # "Error(s) in loading ...:\n\tsize mismatch for ..."
            problem = str(err).splitlines()[-1].strip()
    if problem:
        raise InferenceError(
            f"'{path}' does not fit the AlexNet its hyperparameters describe ({problem}); "
            "pass a checkpoint written by scripts/train.py."
        )
    return model.eval().to(map_location)


def find_best_checkpoint(roots: Iterable[str | Path] = ("lightning_logs",)) -> Path:
    """The newest ``best-*.ckpt`` (by modification time) under any of ``roots``.

    Raises:
        InferenceError: No best checkpoint exists there.
    """
    roots = [Path(root) for root in roots]
    found = [ckpt for root in roots for ckpt in root.glob("*/checkpoints/best*.ckpt")]
    if not found:
        searched = ", ".join(f"'{root}'" for root in roots)
        raise InferenceError(
            f"no best-*.ckpt under {searched}; train first or set the checkpoint path."
        )
    return max(found, key=lambda ckpt: ckpt.stat().st_mtime)


def collect_image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand images and folders (searched recursively) into a list of image files.

    A file named directly is kept whatever its extension, so that a broken or unsupported file
    gets a row with its error instead of silently disappearing.

    Raises:
        InferenceError: A path does not exist.
    """
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += image_files(item)
        elif item.is_file():
            paths.append(item)
        else:
            raise InferenceError(f"'{item}' does not exist; pass image files or folders.")
    return paths


class ImagePathDataset(Dataset):
    """Image files as ``(index, image, error)``: an unreadable file yields ``(index, None, msg)``.

    Args:
        paths: Image files.
        transform: The eval transform from the checkpoint's preprocessing.
        in_channels: 3 for RGB or 1 for grayscale.
    """

    def __init__(self, paths: Sequence[Path], transform, in_channels: int = 3) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform(load_image(self.paths[index], self.in_channels)), ""
        # Any failure on one file (truncated, not an image, too large) becomes that file's row.
        except Exception as err:
            return index, None, f"{type(err).__name__}: {err}".replace("\n", " ")


def collate_readable(
    items: list[tuple[int, torch.Tensor | None, str]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Stack the images that loaded; return ``(indices, images, [(index, error), ...])``."""
    loaded = [(index, image) for index, image, _ in items if image is not None]
    failed = [(index, error) for index, image, error in items if image is None]
    images = torch.stack([image for _, image in loaded]) if loaded else None
    return [index for index, _ in loaded], images, failed


def csv_fieldnames(top_k: int) -> list[str]:
    """Columns: path, predicted, confidence, top1..topK names and probabilities, error."""
    columns = ["path", "predicted", "confidence"]
    for rank in range(1, top_k + 1):
        columns += [f"top{rank}", f"top{rank}_prob"]
    return [*columns, "error"]


def prediction_row(
    path: str | Path, probs: torch.Tensor, class_names: Sequence[str], top_k: int
) -> dict[str, str]:
    """One CSV row for an image's class probabilities (a 1-D tensor)."""
    values, indices = probs.float().topk(min(top_k, len(class_names)))
    row = {"path": str(path), "predicted": class_names[indices[0]]}
    row["confidence"] = f"{values[0].item():.6f}"
    for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist(), strict=True), 1):
        row[f"top{rank}"] = class_names[index]
        row[f"top{rank}_prob"] = f"{value:.6f}"
    row["error"] = ""
    return row


def error_row(path: str | Path, error: str) -> dict[str, str]:
    """The row of a file that could not be read: only its path and the error."""
    return {"path": str(path), "error": error}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU.

    Raises:
        InferenceError: CUDA was asked for but is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InferenceError("--device cuda was given but no CUDA GPU is available; use cpu.")
    return torch.device(device)


def iter_predictions(
    model: LitAlexNet,
    paths: Sequence[Path],
    top_k: int = 3,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> Iterator[dict[str, str]]:
    """Yield one CSV row per path, in order, streaming images through a DataLoader in batches."""
    hparams = model.hparams
    device = next(model.parameters()).device
    dataset = ImagePathDataset(
        paths, eval_transform(**hparams["preprocessing"]), hparams["in_channels"]
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_readable,
        pin_memory=device.type == "cuda",
    )
    model.eval()
    with torch.inference_mode(), tqdm(total=len(dataset), unit="img", disable=not progress) as bar:
        for indices, images, failed in loader:
            rows = {index: error_row(paths[index], error) for index, error in failed}
            if images is not None:
                probs = model(images.to(device, non_blocking=True)).softmax(dim=1).cpu()
                for index, image_probs in zip(indices, probs, strict=True):
                    rows[index] = prediction_row(
                        paths[index], image_probs, hparams["class_names"], top_k
                    )
            for index in sorted(rows):
                yield rows[index]
            bar.update(len(rows))


def write_predictions_csv(rows: Iterable[dict[str, str]], out: str | Path, top_k: int) -> int:
    """Write rows to ``out`` (parents created); returns the number of rows."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_fieldnames(top_k), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
            count += 1
    return count


class PredictionCSVWriter(BasePredictionWriter):
    """Write the ``predict`` subcommand's outputs as the same CSV as ``scripts/predict.py``.

    Under DDP each rank writes its own part file as batches finish (Lightning's predict loop
    gives each image to exactly one rank); rank 0 then merges the parts in dataset order.

    Args:
        output_path: The CSV file; None writes ``predictions.csv`` into the run directory.
        top_k: How many top classes each row lists.
    """

    def __init__(self, output_path: str | Path | None = None, top_k: int = 3) -> None:
        super().__init__(write_interval="batch")
        self.output_path = None if output_path is None else Path(output_path)
        self.top_k = top_k
        self._part_handle = None

    def _part_path(self, rank: int) -> Path:
        return self._out.with_name(f".{self._out.name}.rank{rank}.part")

    def on_predict_start(self, trainer, pl_module) -> None:
        # Every rank resolves the folder here: Trainer.log_dir is a collective call under DDP.
        self._out = self.output_path or Path(
            trainer.log_dir or trainer.default_root_dir, "predictions.csv"
        )
        # As in predict.py: never more columns than classes.
        self._top_k = min(self.top_k, pl_module.hparams["num_classes"])
        part = self._part_path(trainer.global_rank)
        part.parent.mkdir(parents=True, exist_ok=True)
        self._part_handle = part.open("w", newline="")

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        samples = _dataset_of(trainer.predict_dataloaders, dataloader_idx).samples
        class_names = pl_module.hparams["class_names"]
        # A DataModule that leaves unreadable images out of the batch records them in `skipped`
        # ({path: (reason, ...)}); they get error rows and the probabilities skip them.
        skipped = getattr(trainer.datamodule, "skipped", None) or {}
        probs = iter(prediction["probs"].float().cpu())
        fields = csv_fieldnames(self._top_k)
        writer = csv.writer(self._part_handle)
        for index in batch_indices:
            path = samples[index][0]
            if str(path) in skipped:
                row = error_row(path, str(skipped[str(path)][0]))
            else:
                image_probs = next(probs, None)
                if image_probs is None:
                    break
                row = prediction_row(path, image_probs, class_names, self._top_k)
            writer.writerow([index, *(row.get(key, "") for key in fields)])
        else:
            if next(probs, None) is None:
                return
        raise RuntimeError(
            f"predict batch {batch_idx}: the predictions do not match the images; a DataModule "
            "that leaves images out of a batch must record each in its `skipped` dict."
        )

    def on_predict_end(self, trainer, pl_module) -> None:
        self._part_handle.close()
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            parts = [self._part_path(rank) for rank in range(trainer.world_size)]
            rows = []
            for part in parts:
                with part.open(newline="") as handle:
                    rows += [(int(index), values) for index, *values in csv.reader(handle)]
            rows.sort(key=lambda row: row[0])
            fields = csv_fieldnames(self._top_k)
            write_predictions_csv(
                (dict(zip(fields, values, strict=True)) for _, values in rows),
                self._out,
                self._top_k,
            )
            for part in parts:
                part.unlink()
        trainer.strategy.barrier()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._part_handle is not None and not self._part_handle.closed:
            self._part_handle.close()
            Path(self._part_handle.name).unlink(missing_ok=True)


def _dataset_of(dataloaders, dataloader_idx: int):
    loader = dataloaders[dataloader_idx] if isinstance(dataloaders, list) else dataloaders
    return loader.dataset


def run_data_dir(ckpt: str | Path) -> Path | None:
    """The ``data.data_dir`` recorded in the run's ``config.yaml`` next to a CLI checkpoint.

    Returns the built-in demo's folder for a run on the demo data, and None when the checkpoint
    is not inside a CLI run directory.
    """
    import yaml

    from alexnet_lit.data import demo_dir

    config = Path(ckpt).resolve().parents[1] / "config.yaml"
    if not config.is_file():
        return None
    data_dir = (yaml.safe_load(config.read_text()).get("data") or {}).get("data_dir")
    return demo_dir() if data_dir is None else Path(os.path.expanduser(data_dir))


def predict_files(
    ckpt: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path = "predictions.csv",
    top_k: int = 3,
    device: str = "auto",
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[int, int]:
    """Predict every image under ``inputs`` with a checkpoint and write the CSV.

    Returns:
        The number of rows written and how many of them are unreadable files.

    Raises:
        InferenceError: A bad checkpoint, input path, option or device.
    """
    if top_k < 1 or batch_size < 1 or num_workers < 0:
        raise InferenceError(
            "--top-k and --batch-size must be at least 1 and --num-workers at least 0."
        )
    paths = collect_image_paths(inputs)
    if not paths:
        raise InferenceError(
            f"no image files under {', '.join(map(str, inputs))}; pass images or folders."
        )
    model = load_model(ckpt, map_location=resolve_device(device))
    top_k = min(top_k, model.hparams["num_classes"])
    failed = 0

    def counted(rows: Iterable[dict[str, str]]) -> Iterator[dict[str, str]]:
        nonlocal failed
        for row in rows:
            failed += bool(row["error"])
            yield row

    rows = iter_predictions(model, paths, top_k, batch_size, num_workers, progress)
    return write_predictions_csv(counted(rows), out, top_k), failed


def checkpoint_mismatch(
    ckpt: str | Path, class_names: Sequence[str], preprocessing: dict[str, Any]
) -> str | None:
    """Why the data's classes or preprocessing differ from what ``ckpt`` was trained with.

    Returns None when they agree (or ``ckpt`` records neither). The file is memory-mapped, so
    only its small hyperparameter record is read.
    """
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, OSError, pickle.UnpicklingError):
        return None  # the trainer's own load reports unreadable and unsafe files
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    trained = {
        "class names": hparams.get("class_names"),
        "preprocessing": hparams.get("preprocessing"),
    }
    given = {"class names": list(class_names), "preprocessing": dict(preprocessing)}
    for what, value in trained.items():
        if value is not None and value != given[what]:
            return (
                f"--ckpt_path '{ckpt}' was trained with {what} {value} but the data gives "
                f"{given[what]}; pass the run's config.yaml with --config (or the matching "
                "--data.* options)."
            )
    return None
