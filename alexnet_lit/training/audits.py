"""Trust the data: suspicious labels (out-of-fold confident learning) and the learning curve.

Both train several models through the same LightningCLI arguments as ``train.py fit`` (so any
config and overlay applies), each on a subset of the training images, and write their results
into one run folder, ``lightning_logs/version_N/``, with each model's TensorBoard logs in a
subfolder of it. Those models are means to an end: no checkpoint is written.
"""

import argparse
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from alexnet_lit.errors import DataConfigError, UserError, run_main
from alexnet_lit.evaluation.class_report import per_class_metrics, summary
from alexnet_lit.runs import discard_if_unused, next_run_folder, printable, write_csv
from alexnet_lit.training.cli import fit_cli

Samples = list[tuple[Path, int]]
AUDIT_INSTALL = "pip install -e '.[audit]'"


def fit_on(cli, train: Samples, val: Samples | None = None):
    """Train ``cli``'s model on ``train`` (and validate on ``val``) instead of the data's splits."""
    cli.datamodule.use_samples(train=train, val=val)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model


def split_args(argv: Sequence[str] | None, parser: argparse.ArgumentParser):
    """The script's own options, and the rest: LightningCLI arguments as for ``train.py fit``."""
    own, rest = parser.parse_known_args(argv)
    return own, rest[1:] if rest[:1] == ["fit"] else rest


def require_cleanlab():
    """Import cleanlab's ``find_label_issues``, or say in one sentence how to install it."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as err:
        raise UserError(
            "finding label issues needs cleanlab, an optional extra that is not "
            f"installed; install it with {AUDIT_INSTALL}."
        ) from err
    return find_label_issues


# --- suspicious labels ---------------------------------------------------------------------


def stratified_folds(targets: Sequence[int], folds: int, seed: int, class_names: Sequence[str]):
    """Seeded, stratified folds as ``[(train_indices, held_out_indices), ...]``.

    Raises:
        DataConfigError: Fewer than 2 folds, or a class with fewer images than folds.
    """
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise DataConfigError(f"--folds must be at least 2, got {folds}.")
    counts = np.bincount(np.asarray(targets), minlength=len(class_names))
    small = [f"'{class_names[i]}' ({int(n)})" for i, n in enumerate(counts) if n < folds]
    if small:
        raise DataConfigError(
            f"--folds {folds}: class(es) {', '.join(small)} have fewer training images than "
            "folds; lower --folds or add images."
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros((len(targets), 1)), np.asarray(targets)))


def label_issue_rows(
    samples: Samples, pred_probs: np.ndarray, class_names: Sequence[str]
) -> list[dict]:
    """The likely label errors, most likely first: cleanlab's confident learning
    (``find_label_issues``, ranked by self-confidence) on out-of-sample ``pred_probs``
    ``[N, C]``. Rows whose image could not be scored (NaN) are left out."""
    find_label_issues = require_cleanlab()
    labels = np.asarray([target for _, target in samples])
    scored = np.flatnonzero(~np.isnan(pred_probs).any(axis=1))
    ranked = find_label_issues(
        labels[scored], pred_probs[scored], return_indices_ranked_by="self_confidence"
    )
    rows = []
    for rank, i in enumerate(scored[np.asarray(ranked, dtype=int)], start=1):
        suggested = int(np.argmax(pred_probs[i]))
        rows.append(
            {
                "rank": rank,
                "path": str(samples[i][0]),
                "given": class_names[labels[i]],
                "suggested": class_names[suggested],
                "suggested_prob": f"{pred_probs[i, suggested]:.6f}",
                "given_prob": f"{pred_probs[i, labels[i]]:.6f}",
            }
        )
    return rows


def fold_accuracy(
    samples: Samples, pred_probs: np.ndarray, class_names: Sequence[str]
) -> list[dict]:
    """The fold models' out-of-sample accuracy: one row per class (its recall), then ``all``;
    images that could not be scored (NaN rows of ``pred_probs`` ``[N, C]``) are left out."""
    labels = np.asarray([target for _, target in samples])
    scored = ~np.isnan(pred_probs).any(axis=1)
    confusion = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    np.add.at(confusion, (labels[scored], pred_probs[scored].argmax(axis=1)), 1)
    per_class = per_class_metrics(confusion, class_names)
    rows = [{"class": r["class"], "images": r["support"], "accuracy": f"{r['recall']:.4f}"}
            for r in per_class]  # fmt: skip
    overall = summary(confusion, per_class)
    rows.append({"class": "all", "images": overall["images"],
                 "accuracy": f"{overall['accuracy']:.4f}"})  # fmt: skip
    return rows


def accuracy_line(rows: Sequence[dict], num_classes: int) -> str:
    """``fold models' out-of-sample accuracy 0.62 (chance 0.33); per class: a 0.70, ...``."""
    *classes, overall = rows
    per_class = ", ".join(f"{r['class']} {float(r['accuracy']):.2f}" for r in classes)
    return printable(
        f"fold models' out-of-sample accuracy {float(overall['accuracy']):.2f} (chance "
        f"{1 / num_classes:.2f}); per class: {per_class}"
    )


def chance_warning(rows: Sequence[dict], num_classes: int) -> str | None:
    """One line when the fold models are less than halfway from chance to perfect: their
    probabilities then say little about any one label, so neither does the ranking."""
    accuracy, chance = float(rows[-1]["accuracy"]), 1 / num_classes
    if accuracy >= chance + (1 - chance) / 2:
        return None
    return (
        f"warning: the fold models are close to chance ({accuracy:.2f} out of sample, chance "
        f"{chance:.2f}), so this ranking means little; train them longer (--trainer.max_epochs) "
        "or start from known weights (--config configs/finetune.yaml, or --model.weights "
        "a checkpoint of other classes)."
    )


def find_label_issues(fit_args: Sequence[str], folds: int = 5, top: int = 10) -> Path:
    """Train one model per fold, score each held-out fold, rank the likely label errors, and
    write ``label_issues.csv``, ``label_issues.png`` and the fold models' out-of-sample accuracy
    (``fold_accuracy.csv``); returns the run folder."""
    from alexnet_lit.inference.predict import predict_probs

    require_cleanlab()  # before any training
    run = next_run_folder()
    with discard_if_unused(run):
        cli = fit_cli(fit_args, run, "fold_0", checkpoints=False)
    data = cli.datamodule
    samples, class_names = data.samples("train"), data.class_names
    splits = stratified_folds([t for _, t in samples], folds, data.hparams.seed, class_names)
    pred_probs = np.full((len(samples), len(class_names)), np.nan)
    for k, (train_idx, held_idx) in enumerate(splits):
        print(f"fold {k + 1}/{folds}: training on {len(train_idx)} images, then scoring the "
              f"{len(held_idx)} it did not see")  # fmt: skip
        if k:
            cli = fit_cli(fit_args, run, f"fold_{k}", checkpoints=False)
        held = [samples[i] for i in held_idx]
        model = fit_on(cli, [samples[i] for i in train_idx], held)
        pred_probs[held_idx] = predict_probs(model, held).numpy()
    rows = label_issue_rows(samples, pred_probs, class_names)
    fields = ["rank", "path", "given", "suggested", "suggested_prob", "given_prob"]
    write_csv(run / "label_issues.csv", rows, fields)
    accuracy = fold_accuracy(samples, pred_probs, class_names)
    write_csv(run / "fold_accuracy.csv", accuracy, ["class", "images", "accuracy"])
    print(accuracy_line(accuracy, len(class_names)))
    warning = chance_warning(accuracy, len(class_names))
    if warning:
        print(warning)
    _suspects_grid(rows[:top], run / "label_issues.png")
    scored = int((~np.isnan(pred_probs).any(axis=1)).sum())
    print(f"{len(rows)} likely label issue(s) among {scored} training images ({folds}-fold "
          "out-of-sample probabilities, cleanlab's confident learning):")  # fmt: skip
    for row in rows[:top]:
        print(printable(f"{row['rank']:>4}. {row['path']}: labelled {row['given']} "
                        f"(p {float(row['given_prob']):.2f}), looks like {row['suggested']} "
                        f"(p {float(row['suggested_prob']):.2f})"))  # fmt: skip
    print(f"all of them: {run / 'label_issues.csv'}\n"
          f"the first {min(top, len(rows))}: {run / 'label_issues.png'}")  # fmt: skip
    return run


def _suspects_grid(rows: Sequence[dict], out: Path, tile: int = 112) -> None:
    from PIL import Image

    from alexnet_lit.data.images import load_image
    from alexnet_lit.evaluation.pictures import image_grid

    pictures, captions = [], []
    for row in rows:
        try:
            picture = load_image(row["path"]).resize((tile, tile), Image.Resampling.BILINEAR)
        except Exception:  # unreadable since the scan: a grey tile, the caption still says
            picture = Image.new("RGB", (tile, tile), (220, 220, 220))
        pictures.append(np.asarray(picture))
        captions.append(f"#{row['rank']} {row['given']} ->\n{row['suggested']} "
                        f"({float(row['suggested_prob']):.2f})")  # fmt: skip
    if not pictures:
        pictures, captions = [np.full((tile, tile, 3), 255, np.uint8)], ["no label issue found"]
    image_grid(np.stack(pictures), captions, tile=tile).save(out)


def find_label_issues_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/find_label_issues.py``: exit code 0, or 2 with one line for a user's mistake."""
    parser = argparse.ArgumentParser(
        description="Rank the training images whose labels are probably wrong, with out-of-fold "
        "confident learning (cleanlab). The other arguments are train.py fit's.",
    )
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--top", type=int, default=10, help="suspects printed and pictured")
    own, fit_args = split_args(argv, parser)
    return run_main(lambda: find_label_issues(fit_args, own.folds, own.top))


# --- the learning curve --------------------------------------------------------------------


def nested_subsets(samples: Samples, fractions: Sequence[float], seed: int) -> dict[float, Samples]:
    """Stratified, nested subsets: each class's images in one seeded order, and each fraction
    the first ``ceil(fraction * n)`` of them (at least one), so that every subset holds the
    smaller ones.

    Raises:
        DataConfigError: A fraction outside (0, 1].
    """
    bad = [f"{f:g}" for f in fractions if not 0 < f <= 1]
    if bad:
        raise DataConfigError(
            f"--fractions must lie in (0, 1], got {', '.join(bad)}; for example "
            "--fractions 0.1 0.25 0.5 1.0."
        )
    by_class: dict[int, list[Path]] = defaultdict(list)
    for path, target in samples:
        by_class[target].append(path)
    rng = np.random.default_rng(seed)
    ordered = {t: [paths[i] for i in rng.permutation(len(paths))] for t, paths in by_class.items()}
    return {
        fraction: [
            (path, target)
            for target, paths in sorted(ordered.items())
            for path in paths[: max(1, math.ceil(fraction * len(paths)))]
        ]
        for fraction in fractions
    }


def reading(points: dict[int, list[float]]) -> str:
    """One sentence on whether more labelled images would help, from the two largest subsets."""
    sizes = sorted(points)
    if len(sizes) < 2:
        return "Only one subset size: nothing to compare."
    small, large = sizes[-2], sizes[-1]
    gain = 100 * (statistics.mean(points[large]) - statistics.mean(points[small]))
    per_doubling = gain / math.log2(large / small)
    noise = 100 * max(statistics.pstdev(points[large]), statistics.pstdev(points[small]))
    if per_doubling >= max(1.0, noise):
        verdict = "still rising, so more labelled images are likely to help"
    elif per_doubling <= -max(1.0, noise):
        verdict = "falling, which points at noisy labels or too few epochs, not too few images"
    else:
        verdict = "about flat (within the seeds' spread): more of the same images may not help"
    return (
        f"Best val/acc moves {per_doubling:+.1f} points per doubling of the training images "
        f"({small} to {large}): {verdict}."
    )


def gap_reading(label: str, gaps: dict[int, list[float]], num_classes: int) -> str:
    """One sentence on what an overlay adds over the baseline (``gaps``: per training-set size,
    its best val/acc minus the baseline's, seed by seed), at the smallest size and the full set."""
    sizes = sorted(gaps)

    def at(size: int) -> str:
        points = 100 * statistics.mean(gaps[size])
        sd = 100 * statistics.stdev(gaps[size]) if len(gaps[size]) > 1 else 0.0
        return f"{points:+.1f} points (± {sd:.1f})"

    per_class = round(sizes[0] / num_classes)
    line = f"Starting from {label} adds {at(sizes[0])} at {per_class} images per class"
    if len(sizes) > 1:
        line += f", {at(sizes[-1])} at the largest set ({round(sizes[-1] / num_classes)} per class)"
    return line + "."


def learning_curve(
    fit_args: Sequence[str],
    fractions: Sequence[float],
    seeds: Sequence[int],
    compare: Sequence[str] = (),
) -> Path:
    """Train on nested subsets (the val split fixed), with the given arguments and again with
    each ``compare`` overlay (same subsets and seeds); write ``learning_curve.csv`` and
    ``learning_curve.png``, print a one-line reading; returns the run folder."""
    fractions = sorted(set(fractions))
    nested_subsets([], fractions, 0)  # refuse bad fractions before any training
    missing = [config for config in compare if not Path(config).is_file()]
    if missing:
        raise DataConfigError(f"--compare '{missing[0]}' does not exist; pass a YAML overlay.")
    # The baseline, then one curve per overlay, each named after its file.
    curves = {"baseline": [], **{Path(c).stem: ["--config", c] for c in compare}}
    if len(curves) != len(compare) + 1:
        raise DataConfigError("--compare: give overlays with different file names.")
    run = next_run_folder()
    results, samples, num_classes = [], None, 0
    for seed in seeds:
        subsets = None
        for fraction in fractions:
            for label, overlay in curves.items():
                name = f"f{fraction:g}_s{seed}" if not compare else f"{label}_f{fraction:g}_s{seed}"
                args = [*fit_args, *overlay, f"--seed_everything={seed}"]
                with discard_if_unused(run):
                    cli = fit_cli(args, run, name, checkpoints=False)
                if samples is None:
                    samples, num_classes = (
                        cli.datamodule.samples("train"),
                        cli.datamodule.num_classes,
                    )
                if subsets is None:  # this seed's nested subsets, once
                    subsets = nested_subsets(samples, fractions, seed)
                subset = subsets[fraction]
                print(f"learning curve: {len(subset)} training images ({fraction:g}), seed {seed}"
                      + (f", {label}" if compare else ""))  # fmt: skip
                model = fit_on(cli, subset)
                results.append(
                    {
                        "config": label,
                        "fraction": fraction,
                        "seed": seed,
                        "train_images": len(subset),
                        "best_val_acc": float(model.val_acc_best.compute()),
                    }
                )
    baseline = {(r["fraction"], r["seed"]): r["best_val_acc"] for r in results
                if r["config"] == "baseline"}  # fmt: skip
    for result in results:
        if result["config"] != "baseline":  # paired: same subset, same seed
            key = (result["fraction"], result["seed"])
            result["gap_vs_baseline"] = result["best_val_acc"] - baseline[key]
    fields = ["fraction", "seed", "train_images", "best_val_acc"]
    if compare:
        fields = ["config", *fields, "gap_vs_baseline"]
    # "fraction" as 0.5, 1.0; "config" only when there is more than the baseline.
    rows = ({f: str(r[f]) if f == "fraction" else r.get(f) for f in fields} for r in results)
    write_csv(run / "learning_curve.csv", rows, fields)
    points: dict[str, dict[int, list[float]]] = {label: defaultdict(list) for label in curves}
    gaps: dict[str, dict[int, list[float]]] = {label: defaultdict(list) for label in curves}
    for result in results:
        points[result["config"]][result["train_images"]].append(result["best_val_acc"])
        if "gap_vs_baseline" in result:
            gaps[result["config"]][result["train_images"]].append(result["gap_vs_baseline"])
    _plot_curve(points, run / "learning_curve.png")
    for label, curve in points.items():
        for size in sorted(curve):
            values = curve[size]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            which = f", {label}" if compare else ""
            print(f"{size:>7} training images: best val/acc {statistics.mean(values):.3f} ± "
                  f"{sd:.3f} over {len(values)} seed(s){which}")  # fmt: skip
    print(reading(points["baseline"]))
    for label in curves:
        if label != "baseline":
            print(gap_reading(label, gaps[label], num_classes))
    print(f"table: {run / 'learning_curve.csv'}\nplot: {run / 'learning_curve.png'}")
    rank_zero_info(f"learning curve written to {run}")
    return run


def _plot_curve(curves: dict[str, dict[int, list[float]]], out: Path) -> None:
    from alexnet_lit.evaluation.pictures import figure

    with figure((5.6, 4), out) as axes:
        for label, points in curves.items():
            sizes = sorted(points)
            means = [statistics.mean(points[s]) for s in sizes]
            sds = [statistics.stdev(points[s]) if len(points[s]) > 1 else 0.0 for s in sizes]
            axes.errorbar(sizes, means, yerr=sds, marker="o", capsize=4, label=label)
        axes.set_xscale("log")
        axes.set_xticks(sizes, [str(s) for s in sizes])
        axes.minorticks_off()
        axes.set_xlabel("training images (log scale)")
        axes.set_ylabel("best val/acc, mean ± sd over seeds")
        axes.set_title("Learning curve")
        axes.grid(True, alpha=0.3)
        if len(curves) > 1:
            axes.legend()


def learning_curve_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/learning_curve.py``: exit code 0, or 2 with one line for a user's mistake."""
    parser = argparse.ArgumentParser(
        description="Train on nested, stratified subsets of train/ (val fixed) and plot the best "
        "val/acc against the number of training images. The other arguments are train.py fit's.",
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--compare", action="append", default=[], metavar="CONFIG",
        help="also train with this YAML overlay (e.g. configs/finetune.yaml) on the same subsets "
        "and seeds, and report what it adds; repeatable",
    )  # fmt: skip
    own, fit_args = split_args(argv, parser)
    return run_main(lambda: learning_curve(fit_args, own.fractions, own.seeds, own.compare))
