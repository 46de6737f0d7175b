"""The class report of an evaluation: per-class precision, recall and F1, the most-confused
pairs, and a summary, as CSV, Markdown and JSON (the run page reads the JSON and the CSVs).

A confusion matrix here is a ``[num_classes, num_classes]`` integer array whose row is the true
class and whose column is the predicted class.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alexnet_lit.runs import open_text, write_csv


def per_class_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support of each class (0 where a ratio has no denominator)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    true_positives = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = ratio(true_positives, predicted)
    recall = ratio(true_positives, support)
    f1 = ratio(2 * precision * recall, precision + recall)
    return [
        {
            "class": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    ]


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=np.asarray(denominator) > 0)
    return out


def most_confused(confusion: np.ndarray, class_names: Sequence[str], top: int = 10) -> list[dict]:
    """The largest off-diagonal cells: which true class is most often taken for which other.

    Each entry has ``true``, ``predicted``, ``count`` and ``share``, the fraction of the true
    class's images that went to ``predicted``. Sorted by count, then share; empty cells are left
    out.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    support = confusion.sum(axis=1)
    pairs = [
        {
            "true": class_names[t],
            "predicted": class_names[p],
            "count": int(confusion[t, p]),
            "share": float(confusion[t, p] / support[t]),
        }
        for t, p in zip(*np.nonzero(confusion), strict=True)
        if t != p
    ]
    pairs.sort(key=lambda pair: (-pair["count"], -pair["share"], pair["true"], pair["predicted"]))
    return pairs[:top]


def summary(confusion: np.ndarray, rows: Sequence[dict]) -> dict[str, float | int]:
    """Images, accuracy and the macro averages of per-class ``rows``.

    A class with no image in the split that nothing was predicted as has no precision or recall
    to speak of: the averages leave it out, as the logged ``*_macro`` metrics (torchmetrics) do.
    """
    total = int(confusion.sum())
    present = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    scored = [row for row, seen in zip(rows, present, strict=True) if seen]
    macro = {
        f"macro_{k}": float(np.mean([r[k] for r in scored])) if scored else 0.0
        for k in ("precision", "recall", "f1")
    }
    return {
        "images": total,
        "accuracy": float(np.trace(confusion) / total) if total else 0.0,
        **macro,
    }


def write_report(
    confusion: np.ndarray,
    class_names: Sequence[str],
    out_dir: str | Path,
    stage: str,
    title: str,
    top_pairs: int = 10,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``{stage}_report.csv``, ``{stage}_confused_pairs.csv``, ``{stage}_report.md`` and
    ``{stage}_report.json`` into ``out_dir``; returns the paths by kind.

    ``calibration``: the ECE before (``raw``) and after (``calibrated``) the model's
    ``temperature``, with a one-line ``note`` for the reader.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    confusion = np.asarray(confusion, dtype=np.int64)
    rows = per_class_metrics(confusion, class_names)
    pairs = most_confused(confusion, class_names, top_pairs)
    paths = {
        "csv": out_dir / f"{stage}_report.csv",
        "pairs_csv": out_dir / f"{stage}_confused_pairs.csv",
        "markdown": out_dir / f"{stage}_report.md",
        "json": out_dir / f"{stage}_report.json",
    }
    write_csv(paths["csv"], rows, ["class", "precision", "recall", "f1", "support"])
    write_csv(paths["pairs_csv"], pairs, ["true", "predicted", "count", "share"])
    totals = summary(confusion, rows)
    notes = [calibration["note"]] if calibration else []
    with open_text(paths["markdown"]) as file:
        file.write(_markdown(totals, rows, pairs, title, notes))
    with open_text(paths["json"]) as file:
        json.dump({"title": title, **totals, "calibration": calibration}, file, indent=2)
    return paths


def _markdown(
    totals: dict, rows: list[dict], pairs: list[dict], title: str, notes: Sequence[str]
) -> str:
    lines = [
        f"# {title}",
        "",
        f"{totals['images']} images, accuracy {totals['accuracy']:.4f}; macro precision "
        f"{totals['macro_precision']:.4f}, recall {totals['macro_recall']:.4f}, F1 "
        f"{totals['macro_f1']:.4f}.",
        *(line for note in notes for line in ("", note)),
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {_cell(r['class'])} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} "
        f"| {r['support']} |"
        for r in rows
    ]
    lines += ["", "## Most confused pairs", ""]
    if pairs:
        lines += ["| true | predicted as | count | share of true |", "| --- | --- | ---: | ---: |"]
        lines += [
            f"| {_cell(p['true'])} | {_cell(p['predicted'])} | {p['count']} | {p['share']:.4f} |"
            for p in pairs
        ]
    else:
        lines.append("No image was misclassified.")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
