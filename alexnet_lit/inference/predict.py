"""Use a trained checkpoint: load it as a model, predict image files in batches, write CSV rows,
and draw what the network looked at (``--explain``). ``scripts/predict.py`` is its command line.
"""

import argparse
import csv
import inspect
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from tqdm import tqdm

from alexnet_lit.checkpoints import CKPT_HELP, checkpoint_argument, load_checkpoint
from alexnet_lit.data.datamodule import default_num_workers
from alexnet_lit.data.datasets import ImageListDataset, LoadedBatch, SkippingCollate
from alexnet_lit.data.folders import InputScan, not_images_note, scan_inputs
from alexnet_lit.data.presets import EvalPreset
from alexnet_lit.errors import CheckpointError, InferenceError, run_main
from alexnet_lit.evaluation.gradcam import grad_cam, overlay
from alexnet_lit.evaluation.pictures import image_grid
from alexnet_lit.module import LitAlexNet
from alexnet_lit.preprocessing import normalize
from alexnet_lit.runs import check_writable, open_text, printable, run_dir, write_csv


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> LitAlexNet:
    """Load a :class:`LitAlexNet` checkpoint (tensors and plain data only) in eval mode.

    Raises:
        CheckpointError: The file is missing, unsafe, or not a LitAlexNet checkpoint.
    """
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(
        checkpoint
    ):
        hint = (
            " it looks like the tutorial's alexnet.pt: convert it with "
            "scripts/import_tutorial_weights.py first"
            if isinstance(checkpoint, dict) and "21.weight" in checkpoint
            else " pass a checkpoint written by scripts/train.py"
        )
        raise CheckpointError(f"'{path}' is not a LitAlexNet checkpoint;{hint}.")
    # Hyperparameters a newer or older version recorded but this one does not take are left out.
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
        raise CheckpointError(
            f"'{path}' does not fit the AlexNet its hyperparameters describe ({problem}); "
            "pass a checkpoint written by scripts/train.py."
        )
    return model.eval().to(map_location)


def collect_image_paths(inputs: Sequence[str | Path]) -> InputScan:
    """Expand images and folders (searched recursively) into the files that get a row.

    In a folder, images are recognised by content as training's scan does
    (:func:`~alexnet_lit.data.folders.scan_inputs`): every image gets a row, an unreadable one
    with its reason; other files are counted in ``not_images``. A file named directly is kept
    whatever it holds, so that a broken or unsupported file gets a row with its error instead of
    silently disappearing.

    Raises:
        InferenceError: A path does not exist.
    """
    for item in map(Path, inputs):
        if not (item.is_dir() or item.is_file()):
            raise InferenceError(f"'{item}' does not exist; pass image files or folders.")
    return scan_inputs(inputs)


def csv_path(out: str | Path) -> Path:
    """The CSV file ``--out`` names: ``predictions.csv`` inside it when it is a folder (one that
    exists, or a path that ends in a separator)."""
    folder = Path(out).is_dir() or str(out).endswith(("/", os.sep))
    return Path(out, "predictions.csv") if folder else Path(out)


def top_k_note(top_k: int, num_classes: int, option: str = "--top-k") -> str | None:
    """The line that says a top-k above the number of classes lists them all; None otherwise."""
    if top_k <= num_classes:
        return None
    return (
        f"{option} {top_k} is more than the checkpoint's {num_classes} classes; "
        f"listing {num_classes}."
    )


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


def batch_rows(
    batch: LoadedBatch,
    probs: torch.Tensor,
    paths: Sequence[str | Path],
    class_names: Sequence[str],
    top_k: int,
) -> list[tuple[int, dict[str, str]]]:
    """``(dataset index, CSV row)`` of every image of a batch, in dataset order: a prediction
    row for each image that loaded (``probs`` ``[B, num_classes]``), an error row for the rest."""
    rows = [(bad.index, {"path": bad.path, "error": bad.reason}) for bad in batch.skipped]
    for index, image_probs in zip(batch.indices.tolist(), probs.float().cpu(), strict=True):
        rows.append((index, prediction_row(paths[index], image_probs, class_names, top_k)))
    return sorted(rows, key=lambda row: row[0])


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU.

    Raises:
        InferenceError: CUDA was asked for but is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InferenceError("--device cuda was given but no CUDA GPU is available; use cpu.")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise InferenceError(
            f"--device {device!r} is not a device torch knows; use auto, cpu or cuda:N."
        ) from err
    try:
        torch.empty(0, device=resolved)
    except RuntimeError as err:  # a kind torch knows that this machine lacks (mps, xpu, ...)
        raise InferenceError(
            f"--device {device!r} is not available on this machine; use auto or cpu."
        ) from err
    return resolved


def eval_loader(
    model: LitAlexNet,
    paths: Sequence[str | Path],
    batch_size: int = 32,
    num_workers: int = 0,
    unreadable: Mapping[Path, str] | None = None,
) -> DataLoader:
    """Batches of the images at ``paths``, in order, through the model's eval preset
    (:class:`LoadedBatch`: an image that fails to load, or that ``unreadable`` names, is set
    aside with its reason)."""
    preprocessing = model.hparams["preprocessing"]
    device = next(model.parameters()).device
    dataset = ImageListDataset(
        [(path, -1) for path in paths], EvalPreset(**preprocessing).read, unreadable=unreadable
    )
    side = preprocessing["image_size"]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=SkippingCollate((side, side, preprocessing["in_channels"])),
        pin_memory=device.type == "cuda",
    )


def eval_batches(
    model: LitAlexNet, loader: DataLoader, temperature: float = 1.0
) -> Iterator[tuple[LoadedBatch, torch.Tensor, torch.Tensor]]:
    """``(LoadedBatch, inputs, probs)`` of each batch of an :func:`eval_loader`: ``inputs`` the
    normalized network input ``[B, C, S, S]`` on the model's device, ``probs``
    ``softmax(logits / temperature)``."""
    preprocessing = model.hparams["preprocessing"]
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            images = batch.images.to(device, non_blocking=True)
            images = normalize(images, preprocessing["mean"], preprocessing["std"])
            logits = (
                model(images) if len(images) else images.new_empty(0, model.hparams["num_classes"])
            )
            yield batch, images, (logits.float() / temperature).softmax(dim=1)


def predict_probs(
    model: LitAlexNet, samples: Sequence[tuple[Path, int]], temperature: float = 1.0
) -> torch.Tensor:
    """Class probabilities ``[N, num_classes]`` of ``(path, label)`` samples with the model's
    eval preprocessing, ``softmax(logits / temperature)``; a row of NaN for an unreadable image."""
    probs = torch.full((len(samples), model.hparams["num_classes"]), float("nan"))
    loader = eval_loader(model, [path for path, _ in samples])
    for batch, _, batch_probs in eval_batches(model, loader, temperature):
        probs[batch.indices] = batch_probs.float().cpu()
    return probs


def iter_predictions(
    model: LitAlexNet,
    loader: DataLoader,
    top_k: int = 3,
    temperature: float = 1.0,
    progress: bool = True,
) -> Iterator[dict[str, str]]:
    """Yield one CSV row per image of an :func:`eval_loader`, in order; probabilities are
    ``softmax(logits / temperature)``."""
    class_names = model.hparams["class_names"]
    paths = [path for path, _ in loader.dataset.samples]
    with tqdm(total=len(paths), unit="img", disable=not progress) as bar:
        for batch, _, probs in eval_batches(model, loader, temperature):
            for _, row in batch_rows(batch, probs, paths, class_names, top_k):
                yield row
            bar.update(len(batch.indices) + len(batch.skipped))


def explain_files(
    model: LitAlexNet,
    loader: DataLoader,
    out_dir: str | Path,
    temperature: float = 1.0,
    progress: bool = True,
) -> list[Path]:
    """Write one PNG per readable image of an :func:`eval_loader` into ``out_dir``: the Grad-CAM
    of the predicted class over the image as the network saw it, captioned with the class and
    its confidence. Returns the files, named ``NNNNN_<stem>.png`` after each image's place."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = model.hparams["class_names"]
    paths = [path for path, _ in loader.dataset.samples]
    side = model.hparams["preprocessing"]["image_size"]
    written = []
    with tqdm(total=len(paths), unit="img", desc="grad-cam", disable=not progress) as bar:
        for batch, images, probs in eval_batches(model, loader, temperature):
            if len(batch.indices):
                confidence, predicted = probs.max(dim=1)
                heat = grad_cam(model.model, images, predicted).cpu().numpy()
                pixels = batch.images.numpy()
                if pixels.shape[-1] == 1:
                    pixels = pixels.repeat(3, axis=-1)
                for j, index in enumerate(batch.indices.tolist()):
                    caption = printable(f"{names[int(predicted[j])]} ({float(confidence[j]):.2f})")
                    picture = image_grid(
                        overlay(pixels[j], heat[j])[None], [caption], tile=side, pad=0
                    )
                    path = out_dir / f"{index:05d}_{Path(paths[index]).stem}.png"
                    picture.save(path)
                    written.append(path)
            bar.update(len(batch.indices) + len(batch.skipped))
    return written


def write_predictions_csv(rows: Iterable[dict[str, str]], out: str | Path, top_k: int) -> int:
    """Write rows to ``out`` (parents created); returns the number of rows."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_csv(out, rows, csv_fieldnames(top_k))


class PredictionCSVWriter(BasePredictionWriter):
    """Write the ``predict`` subcommand's outputs as the same CSV as ``scripts/predict.py``.

    Under DDP each rank writes its own part file as batches finish (Lightning's predict loop
    gives each image to exactly one rank); rank 0 then merges the parts in dataset order. An
    image the DataModule could not load (a :class:`LoadedBatch` names it in ``skipped``) gets a
    row with its error.

    Args:
        output_path: The CSV file; None writes ``predictions.csv`` into the run directory.
        top_k: How many top classes each row lists.
        calibrated: Probabilities with the checkpoint's fitted temperature (the model's
            ``temperature``); False reports the raw softmax.
    """

    def __init__(
        self, output_path: str | Path | None = None, top_k: int = 3, calibrated: bool = True
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_path = None if output_path is None else Path(output_path)
        self.top_k = top_k
        self.calibrated = calibrated
        self._part_handle = None

    def _part_path(self, rank: int) -> Path:
        return self._out.with_name(f".{self._out.name}.rank{rank}.part")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._out = self.output_path or run_dir(trainer) / "predictions.csv"  # on every rank
        # As in predict.py: never more columns than classes, and a line that says so.
        num_classes = pl_module.hparams["num_classes"]
        self._top_k = min(self.top_k, num_classes)
        note = top_k_note(self.top_k, num_classes, option=f"{type(self).__name__}'s top_k")
        if note is not None:
            rank_zero_info(note)
        part = self._part_path(trainer.global_rank)
        part.parent.mkdir(parents=True, exist_ok=True)
        self._part_handle = open_text(part)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        loader = trainer.predict_dataloaders
        dataset = (loader[dataloader_idx] if isinstance(loader, list) else loader).dataset
        paths = [path for path, _ in dataset.samples]
        if not isinstance(batch, LoadedBatch):  # a DataModule that never skips an image
            indices = torch.as_tensor(list(batch_indices), dtype=torch.long)
            batch = LoadedBatch(batch[0], batch[1], indices, [])
        class_names = pl_module.hparams["class_names"]
        fields = csv_fieldnames(self._top_k)
        writer = csv.writer(self._part_handle)
        probs = prediction["probs"]
        if not self.calibrated and "logits" in prediction:
            probs = prediction["logits"].float().softmax(dim=1)
        for index, row in batch_rows(batch, probs, paths, class_names, self._top_k):
            writer.writerow([index, *(row.get(key, "") for key in fields)])

    def on_predict_end(self, trainer, pl_module) -> None:
        self._part_handle.close()
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            parts = [self._part_path(rank) for rank in range(trainer.world_size)]
            rows = []
            for part in parts:
                with open_text(part, "r") as handle:
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


def predict_files(
    ckpt: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path = "predictions.csv",
    top_k: int = 3,
    device: str = "auto",
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    calibrated: bool = True,
    explain_dir: str | Path | None = None,
) -> tuple[int, int]:
    """Predict every image under ``inputs`` with a checkpoint and write the CSV.

    Images in folders are recognised by content, as in training (:func:`collect_image_paths`);
    one printed line counts the other files, and another says when ``top_k`` is more than the
    classes. ``out`` may be a folder (:func:`csv_path`). ``calibrated`` uses the checkpoint's
    fitted temperature (False: the raw softmax); ``explain_dir`` also writes a Grad-CAM overlay
    PNG per image there.

    Returns:
        The number of rows written and how many of them are unreadable files.

    Raises:
        CheckpointError: A bad checkpoint.
        InferenceError: A bad input path, option or device.
    """
    if top_k < 1 or batch_size < 1 or num_workers < 0:
        raise InferenceError(
            "--top-k and --batch-size must be at least 1 and --num-workers at least 0."
        )
    check_writable(csv_path(out), "--out")
    if explain_dir is not None:
        check_writable(explain_dir, "--explain", folder=True)
    found = collect_image_paths(inputs)
    ignored = f" ({not_images_note(found.not_images)})" if found.not_images else ""
    if not found.paths:
        raise InferenceError(
            f"no image files under {', '.join(map(str, inputs))}{ignored}; pass images or folders."
        )
    if found.not_images:
        print(printable(f"{not_images_note(found.not_images)}."))
    model = load_model(ckpt, map_location=resolve_device(device))
    note = top_k_note(top_k, model.hparams["num_classes"])
    if note is not None:
        print(note)
    top_k = min(top_k, model.hparams["num_classes"])
    failed = 0

    def counted(rows: Iterable[dict[str, str]]) -> Iterator[dict[str, str]]:
        nonlocal failed
        for row in rows:
            failed += bool(row["error"])
            yield row

    temperature = model.hparams["temperature"] if calibrated else 1.0
    loader = eval_loader(model, found.paths, batch_size, num_workers, found.unreadable)
    rows = iter_predictions(model, loader, top_k, temperature, progress)
    written = write_predictions_csv(counted(rows), csv_path(out), top_k)
    if explain_dir is not None:
        explain_files(model, loader, explain_dir, temperature, progress)
    return written, failed


def predict_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/predict.py``: exit code 0, or 2 with one line for a user's mistake."""
    parser = argparse.ArgumentParser(
        description="Predict image files or folders with a checkpoint and write one CSV row per "
        "image."
    )
    parser.add_argument("--ckpt", required=True, help=CKPT_HELP)
    parser.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument(
        "--out", default="predictions.csv",
        help="CSV file to write; a folder (one that exists, or a path ending in /) gets "
        "predictions.csv inside it",
    )  # fmt: skip
    parser.add_argument("--top-k", type=int, default=3, help="top classes listed per image")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--num-workers", type=int, default=default_num_workers(),
        help="image loading processes (default: the usable CPUs minus one, at most 16)",
    )  # fmt: skip
    parser.add_argument(
        "--no-calibration", action="store_true",
        help="raw softmax probabilities, not those scaled by the checkpoint's fitted temperature",
    )  # fmt: skip
    parser.add_argument(
        "--explain", metavar="DIR",
        help="also write a Grad-CAM overlay PNG per image (what the network looks at) into DIR",
    )  # fmt: skip
    args = parser.parse_args(argv)

    def main() -> None:
        ckpt = checkpoint_argument(args.ckpt)
        rows, failed = predict_files(
            ckpt, args.paths, args.out, args.top_k, args.device, args.batch_size,
            args.num_workers, calibrated=not args.no_calibration, explain_dir=args.explain,
        )  # fmt: skip
        unreadable = f" ({failed} unreadable, see the error column)" if failed else ""
        print(printable(f"wrote {rows} predictions to {csv_path(args.out)}{unreadable}"))
        if args.explain:
            print(printable(f"wrote Grad-CAM overlays to {args.explain}"))

    return run_main(main)


def run_data_dir(ckpt: str | Path) -> Path | None:
    """The data folder of the run a CLI checkpoint belongs to: the absolute path its
    ``run.json`` recorded, else the ``data.data_dir`` of its ``config.yaml``.

    Returns the built-in demo's folder for a run on the demo data, and None when the checkpoint
    is not inside a CLI run directory.
    """
    import json

    import yaml

    from alexnet_lit.data.demo import demo_dir
    from alexnet_lit.evaluation.run_page import RUN_RECORD

    folder = Path(ckpt).resolve().parents[1]
    record = folder / RUN_RECORD
    if record.is_file():  # absolute; older runs recorded it as given, maybe relative
        recorded = Path(json.loads(record.read_text()).get("data_dir") or ".")
        if recorded.is_absolute() and recorded.is_dir():
            return recorded
    config = folder / "config.yaml"
    if not config.is_file():
        return None
    data_dir = (yaml.safe_load(config.read_text()).get("data") or {}).get("data_dir")
    if data_dir is None:
        return demo_dir()
    data_dir = Path(os.path.expanduser(data_dir))
    if not data_dir.is_absolute():
        # Relative to the folder the fit ran in, which holds its run folder (lightning_logs/
        # version_N): the nearest such folder that has it.
        found = (parent / data_dir for parent in folder.parents)
        return next((path for path in found if path.is_dir()), data_dir)
    return data_dir
