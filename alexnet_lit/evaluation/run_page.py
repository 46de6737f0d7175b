"""One page per run: ``report.html``, a self-contained file that says what happened.

It is assembled from the run folder alone (``config.yaml``, ``run.json``, the TensorBoard events,
the evaluation files, ``skipped_images.csv``, the checkpoints' hyperparameters), so
``python scripts/report.py RUN_DIR`` rebuilds it at any time. Every picture is inlined as a PNG
data URI and nothing is fetched: it opens from an e-mail attachment. The HTML comes from a
Jinja2 template with autoescaping on, so a file or class name cannot inject markup.
"""

import base64
import datetime
import io
import json
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from alexnet_lit.checkpoints import best_checkpoint, checkpoint_temperature
from alexnet_lit.data.folders import SPLITS, identical_files, imbalance_text
from alexnet_lit.data.index import class_counts
from alexnet_lit.data.scan_cache import ScanCache
from alexnet_lit.errors import UserError, first_line
from alexnet_lit.evaluation.pictures import figure
from alexnet_lit.model import ALEXNET_WIDTH
from alexnet_lit.runs import open_text, printable, read_csv, read_scalars

REPORT = "report.html"
RUN_RECORD = "run.json"
SKIPPED_ROWS_SHOWN = 50


def record_run(folder: Path, trainer: L.Trainer) -> None:
    """Write ``run.json``: the command line, the start, the subcommand and checkpoint, and the
    data's classes with images per split (what the report needs that config.yaml lacks)."""
    data = trainer.datamodule
    counts: dict[str, dict[str, int]] = {}
    if data is not None and hasattr(data, "samples"):
        for split, dataset in getattr(data, "datasets", {}).items():
            if split != "predict":
                counts[split] = class_counts(dataset.samples, data.class_names)
    record = {
        "command": shlex.join(sys.argv),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "subcommand": str(trainer.state.fn.value),
        "ckpt_path": None if trainer.ckpt_path is None else str(Path(trainer.ckpt_path).resolve()),
        # Absolute: the notebook and the report find it from any working folder.
        "data_dir": None
        if getattr(data, "data_dir", None) is None
        else str(Path(data.data_dir).resolve()),
        "class_names": None if data is None else list(getattr(data, "class_names", [])),
        "images_per_class": counts,
        "image_size": getattr(data, "image_size", None),
        # Filled in when a fit ends (record_shared_files); None where it was not checked.
        "shared_between_splits": None,
        "device": str(trainer.strategy.root_device),
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def record_shared_files(folder: Path, trainer: L.Trainer) -> None:
    """Add to ``run.json`` the files this run's splits share byte for byte (a fit's train and
    val). After the fit, not before it: on a large dataset the search reads some files."""
    data = trainer.datamodule
    files: dict[str, list[Path]] = {}
    for split, dataset in getattr(data, "datasets", {}).items():
        paths = [Path(path) for path, _ in getattr(dataset, "samples", [])]
        if split != "predict" and paths not in files.values():  # test may be val/ itself
            files[split] = paths
    if len(files) > 1:
        record = _record(folder)
        # The scan caches keep each file's digests: a later fit on unchanged files reads none.
        root = getattr(data, "data_dir", None)
        caches = [] if root is None else [ScanCache(Path(root, s)) for s in SPLITS]
        groups = identical_files(files, across_splits=True, caches=caches)
        record["shared_between_splits"] = [[str(p) for _, p in group] for _, group in groups]
        (folder / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def source_run(ckpt_path: str | None) -> Path | None:
    """The run folder a checkpoint was written in (``RUN/checkpoints/x.ckpt``), if any."""
    parents = Path(ckpt_path).resolve().parents if ckpt_path else []
    if len(parents) < 2:  # no path, or a file too near the root to be in a run folder
        return None
    folder = parents[1]
    return folder if (folder / "config.yaml").is_file() else None


# --- reading a run folder ------------------------------------------------------------------


def result_summary(
    folder: Path, scalars: dict[str, list[tuple[int, float]]] | None = None
) -> dict[str, Any]:
    """Best val/acc and the 0-based epoch it was first reached,
    final val/loss and ECE, and the best checkpoint with its temperature; ``scalars`` are the
    run's logged scalars, when already read."""
    scalars = read_scalars(folder) if scalars is None else scalars
    summary: dict[str, Any] = {}
    accuracies = scalars.get("val/acc", [])
    if accuracies:
        # The first best, as ModelCheckpoint keeps it, over the run's whole history (a resumed
        # fit continues the same event files). Lightning logs "epoch" at every step it logs, so
        # this is the best's epoch whatever the validation schedule.
        step, value = max(accuracies, key=lambda point: point[1])
        epochs = _epochs_at(scalars, accuracies)
        # The epochs run, not the validations: with check_val_every_n_epoch, fewer.
        last = max([epochs[-1], *(epoch for _, epoch in scalars.get("epoch", []))])
        summary.update(best_val_acc=value, best_epoch=epochs[accuracies.index((step, value))])
        summary["epochs"] = int(last) + 1
    for tag, key in (("val/loss", "final_val_loss"), ("val/ece", "final_val_ece")):
        if scalars.get(tag):
            summary[key] = scalars[tag][-1][1]
    best_file = best_checkpoint(folder)
    if best_file is not None:
        summary["best_checkpoint"] = str(best_file)
        summary["temperature"] = checkpoint_temperature(best_file)
    return summary


def fit_summary(page: Path, summary: dict[str, Any], logdir: str | Path | None = None) -> str:
    """What a fit prints when it ends: its best val/acc, best checkpoint and where to look
    (``summary``: :func:`result_summary`'s; ``logdir``: TensorBoard's, when it logged)."""
    lines = ["", "Done."]
    if summary.get("best_val_acc") is not None:
        lines.append(
            f"  best val/acc {summary['best_val_acc']:.4f} (epoch {summary['best_epoch']})"
        )
    if summary.get("best_checkpoint"):
        lines.append(f"  best checkpoint: {summary['best_checkpoint']}")
    lines.append(f"  report: {page}")
    if logdir is not None:
        lines.append(f"  dashboards: tensorboard --logdir {logdir}")
    return "\n".join(lines)


def _epochs_at(
    scalars: dict[str, list[tuple[int, float]]], points: list[tuple[int, float]]
) -> list[int]:
    """The 0-based epoch of each ``(step, value)`` point: Lightning logs ``epoch`` at every step
    it logs anything (a folder without it: one point per epoch)."""
    epoch_at = dict(scalars.get("epoch", []))
    return [int(epoch_at.get(step, i)) for i, (step, _) in enumerate(points)]


def _png(path: Path) -> str | None:
    """A PNG file as a data URI, or None when it is not there."""
    return png_data_uri(path.read_bytes()) if path.is_file() else None


def png_data_uri(png: bytes) -> str:
    """PNG bytes as a data URI, to inline in a page."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _curves(scalars: dict[str, list[tuple[int, float]]]) -> list[dict[str, str]]:
    """Loss, accuracy and learning-rate curves per epoch, as inlined PNGs."""
    panels = [
        ("Loss", [("train/loss_epoch", "train"), ("val/loss", "val")]),
        ("Accuracy", [("train/acc", "train"), ("val/acc", "val")]),
        ("Learning rate", [(tag, tag) for tag in scalars if tag.startswith("lr-")]),
    ]
    curves = []
    for title, series in panels:
        present = [(tag, label) for tag, label in series if scalars.get(tag)]
        if not present:
            continue
        buffer = io.BytesIO()
        with figure((4.2, 3), buffer, dpi=90) as axes:
            for tag, label in present:
                values = [value for _, value in scalars[tag]]
                epochs = _epochs_at(scalars, scalars[tag])
                axes.plot(epochs, values, marker="o", markersize=3, label=label)
            axes.set_xlabel("epoch")
            axes.xaxis.get_major_locator().set_params(integer=True)
            axes.set_title(title)
            axes.grid(True, alpha=0.3)
            axes.legend(fontsize=8)
        curves.append({"title": title, "src": png_data_uri(buffer.getvalue())})
    return curves


def _evaluation(folder: Path, stage: str, title: str) -> dict[str, Any] | None:
    rows = read_csv(folder / f"{stage}_report.csv")
    if not rows:
        return None
    summary_file = folder / f"{stage}_report.json"
    if summary_file.is_file():
        summary = _parsed(summary_file, json.loads)
    else:  # a run folder written before the JSON summary: the totals from the per-class rows
        support = [int(row["support"]) for row in rows]
        right = sum(float(row["recall"]) * n for row, n in zip(rows, support, strict=True))
        summary = {"images": sum(support), "accuracy": right / max(1, sum(support))}
        for key in ("precision", "recall", "f1"):
            summary[f"macro_{key}"] = sum(float(row[key]) for row in rows) / len(rows)
    notes = [
        f"{summary['images']} images, accuracy {summary['accuracy']:.4f}; macro precision "
        f"{summary['macro_precision']:.4f}, recall {summary['macro_recall']:.4f}, F1 "
        f"{summary['macro_f1']:.4f}."
    ]
    if summary.get("calibration"):
        notes.append(summary["calibration"]["note"])
    return {
        "title": title,
        "stage": stage,
        "accuracy": summary["accuracy"],
        "images": summary["images"],
        "notes": notes,
        "classes": rows,
        "pairs": read_csv(folder / f"{stage}_confused_pairs.csv"),
        "confusion": _png(folder / f"{stage}_confusion_matrix.png"),
        "reliability": _png(folder / f"{stage}_reliability.png"),
        # Only the fit's validation epochs draw the mistakes.
        "misclassified": _png(folder / "val_misclassified.png") if stage == "val" else None,
    }


def _later_evaluations(folder: Path) -> list[dict[str, Any]]:
    """The validate/test runs (sibling folders) whose checkpoint came from ``folder``."""
    found = []
    for sibling in sorted(folder.parent.glob("*/")):
        record = _record(sibling)
        ckpt = record.get("ckpt_path")
        if sibling == folder or record.get("subcommand") not in ("validate", "test"):
            continue
        if source_run(ckpt) != folder.resolve():
            continue
        stage = "val" if record["subcommand"] == "validate" else "test"
        evaluation = _evaluation(sibling, stage, f"{record['subcommand']} in {sibling.name}")
        if evaluation is not None:
            evaluation["checkpoint"] = ckpt
            found.append(evaluation)
    return found


def _record(folder: Path) -> dict[str, Any]:
    path = folder / RUN_RECORD
    return _parsed(path, json.loads) if path.is_file() else {}


def _parsed(path: Path, parse: Any) -> Any:
    """``parse`` of a run file's text; a file cut short or damaged is one sentence naming it."""
    try:
        return parse(path.read_text())
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as err:  # JSONDecodeError: ValueError
        raise UserError(
            f"'{path}' cannot be read ({type(err).__name__}: {first_line(err)}); re-run the "
            "command that wrote it, or delete it to leave its section out."
        ) from err


def _settings(config: dict[str, Any], record: dict[str, Any]) -> list[tuple[str, str]]:
    """The key settings as (name, value) pairs: the config's, and what they resolved to
    (``run.json``: an image size or precision left to the preset or to ``fast.yaml``)."""
    trainer, model, data = (config.get(key) or {} for key in ("trainer", "model", "data"))
    optimizer = model.get("optimizer") or {}
    init = optimizer.get("init_args") or {} if isinstance(optimizer, dict) else {}
    scheduler = model.get("lr_scheduler")
    name = (
        optimizer.get("class_path", "?").rsplit(".", 1)[-1]
        if isinstance(optimizer, dict)
        else optimizer
    )
    weights, width = model.get("weights"), model.get("hidden_features", ALEXNET_WIDTH)
    network = model.get("arch") or "tutorial"
    if width != ALEXNET_WIDTH:  # the classifier's, narrower than both AlexNets'
        network += f", {width} wide"
    start = f"from {weights}" if weights else "random weights"
    pairs = [
        ("network", f"AlexNet ({network}), {start}"),
        ("optimizer", f"{name} (lr {init.get('lr', '?')})"),
        (
            "scheduler",
            "none"
            if not scheduler
            else str(scheduler.get("class_path", scheduler)).rsplit(".", 1)[-1],
        ),
        ("epochs", str(trainer.get("max_epochs"))),
        ("batch size", str(data.get("batch_size"))),
        ("image size", str(record.get("image_size") or data.get("image_size") or "the preset's")),
        ("augmentation", str(data.get("augment", "tutorial"))),
        ("loader", str(data.get("backend", "pil"))),
        ("precision", str(record.get("precision") or trainer.get("precision") or "32-true")),
        ("accelerator", f"{trainer.get('accelerator')} x {trainer.get('devices')}"),
        ("seed", str(config.get("seed_everything"))),
    ]
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path")).endswith(
            "BackboneFinetuning"
        ):
            args = callback.get("init_args") or {}
            pairs.append(
                (
                    "fine-tuning",
                    f"convolutions frozen until epoch {args.get('unfreeze_backbone_at_epoch')}, "
                    f"then at {args.get('backbone_initial_ratio_lr')} x the head's lr",
                )
            )
    return pairs


def _data_section(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    skipped = read_csv(folder / "skipped_images.csv")
    reasons = Counter(row.get("reason", "").split(" (")[0] for row in skipped)
    split_files = [
        name for name in ("split_train.txt", "split_val.txt") if (folder / name).is_file()
    ]
    return {
        "skipped": skipped[:SKIPPED_ROWS_SHOWN],
        "skipped_total": len(skipped),
        "reasons": reasons.most_common(),
        "duplicates": record.get("shared_between_splits"),
        "split_files": [str(folder / name) for name in split_files],
    }


def build_report(folder: str | Path, fit: L.Trainer | None = None) -> tuple[Path, dict[str, Any]]:
    """Write ``folder/report.html`` from the run folder's files; returns its path and the
    :func:`result_summary` it shows. ``fit``: the trainer of a fit that just ended, whose splits
    are searched for shared files first.

    Raises:
        UserError: ``folder`` is not a run folder (no ``config.yaml``).
    """
    folder = Path(folder)
    if fit is not None:
        record_shared_files(folder, fit)
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        raise UserError(
            f"'{folder}' is not a run folder (it has no config.yaml); pass a "
            "lightning_logs/version_N folder."
        )
    config = _parsed(config_path, yaml.safe_load) or {}
    if not isinstance(config, dict):
        raise UserError(
            f"'{config_path}' holds no config (a YAML mapping such as trainer: ...); re-run the "
            "command that wrote it, or restore it."
        )
    record = _record(folder)
    counts = record.get("images_per_class", {})
    classes = record.get("class_names") or sorted({n for split in counts.values() for n in split})
    subcommand = record.get("subcommand", "fit")
    stage = {"validate": "val", "test": "test"}.get(subcommand)
    evaluations = [
        e
        for e in (
            _evaluation(
                folder,
                "val",
                "validation (the latest epoch)" if subcommand == "fit" else "validation",
            ),
            _evaluation(folder, "test", "test"),
        )
        if e is not None
    ]
    scalars = read_scalars(folder)  # the event file, read once
    summary = result_summary(folder, scalars)
    settings = _settings(config, record)
    if stage is not None:  # an evaluation of a checkpoint: its weights and training are the fit's
        kept = ("batch size", "image size", "loader", "precision", "accelerator")
        checkpoint = ("checkpoint", printable(record.get("ckpt_path") or "none"))
        settings = [checkpoint, *(pair for pair in settings if pair[0] in kept)]
    html = render_page(
        "report.html.j2",
        folder=str(folder),
        name=folder.name,
        record=record,
        subcommand=subcommand,
        settings=settings,
        classes=classes,
        splits=list(counts),
        counts=counts,
        imbalance={split: imbalance_text(c) for split, c in counts.items()},
        summary=summary,
        curves=_curves(scalars),
        evaluations=evaluations,
        # A validate or test run's own result: its stage's evaluation, not another's.
        evaluated=next((e for e in evaluations if e["stage"] == stage), None),
        later=_later_evaluations(folder) if subcommand == "fit" else [],
        data=_data_section(folder, record),
        reproduce=f"python scripts/train.py {subcommand} --config {shlex.quote(str(config_path))}",
        stage=stage,
        generated=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    out = folder / REPORT
    with open_text(out) as file:
        file.write(html)
    return out, summary


def render_page(template: str, **context: Any) -> str:
    """One of the package's HTML pages (``templates/TEMPLATE``), every value escaped."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    environment = Environment(
        loader=PackageLoader("alexnet_lit.evaluation", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    environment.filters["printable"] = printable
    return environment.get_template(template).render(**context)


def report_main(argv: list[str] | None = None) -> int:
    """``scripts/report.py RUN_DIR``: rebuild a run's report.html."""
    import argparse

    from alexnet_lit.errors import run_main

    parser = argparse.ArgumentParser(description="Rebuild a run's report.html from its folder.")
    parser.add_argument("run_dir", type=Path, help="a lightning_logs/version_N folder")
    args = parser.parse_args(argv)

    def rebuild() -> None:
        print(printable(f"wrote {build_report(args.run_dir)[0]}"))

    return run_main(rebuild)
