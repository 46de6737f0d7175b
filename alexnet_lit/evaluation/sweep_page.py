"""``sweep.html``: one self-contained page per sweep, like a run's ``report.html``.

The trials table (best first, each linked to its run's ``report.html``), the optimisation
history, the parameter importances (Optuna's own evaluator) and each parameter's slice plot, all
drawn by Optuna's matplotlib plots and inlined as PNGs. It is rebuilt from the study after every
trial, so it reads the same whichever worker wrote it last.
"""

import datetime
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alexnet_lit.evaluation.pictures import close_and_save
from alexnet_lit.evaluation.run_page import REPORT, png_data_uri, render_page
from alexnet_lit.runs import open_text

PAGE = "sweep.html"


def build_sweep_page(
    study: Any,
    rows: list[dict[str, Any]],
    best: Any,
    out: Path,
    sweep_dir: Path,
    params: Sequence[str],
    objective: str,
    storage: str,
    rerun: str | None,
) -> None:
    """Write the page of ``study`` (an ``optuna.Study``) to ``out``: ``rows`` are its trials as
    ``sweep.csv`` has them, ``best`` its best trial (or None), ``objective`` the metric's name.
    Links to the trials' pages are relative to ``sweep_dir``, where the page goes."""
    import optuna

    rows = [dict(row) for row in rows]  # the caller's rows stay as sweep.csv has them
    for row in rows:
        page = Path(row["run_dir"] or "/nonexistent") / REPORT
        row["report"] = os.path.relpath(page, sweep_dir.resolve()) if page.is_file() else None
    # Best first: complete trials by result, then pruned ones by their best, then the rest.
    order = {"complete": 0, "pruned": 1, "running": 2, "fail": 3, "waiting": 4}
    rows = sorted(
        rows, key=lambda r: (order.get(r["state"], 5), -(r["best_val_acc"] or 0.0), r["number"])
    )
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    complete = [r for r in rows if r["state"] == "complete"]
    pictures, notes = [], []
    if complete:
        history = _plot(optuna, "plot_optimization_history", study, objective)
        pictures += [("Optimisation history", history)]
        pictures += [("Each parameter's slice", _plot(optuna, "plot_slice", study, objective))]
    importances = {}
    if len(complete) >= 2:
        try:
            with warnings.catch_warnings():  # e.g. too few trials to tell the parameters apart
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study)
            importance = _plot(optuna, "plot_param_importances", study, objective)
            pictures.insert(1, ("Parameter importances", importance))
        except (RuntimeError, ValueError) as err:  # e.g. every trial had the same values
            notes.append(f"Parameter importances: not computed ({err}).")
    else:
        notes.append("Parameter importances need two complete trials or more.")
    html = render_page(
        "sweep.html.j2",
        name=study.study_name,
        folder=str(sweep_dir),
        storage=storage,
        objective=objective,
        params=list(params),
        rows=rows,
        counts=counts,
        best=best,
        rerun=rerun,
        importances=importances,
        pictures=[(title, uri) for title, uri in pictures if uri is not None],
        notes=notes,
        generated=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    with open_text(out) as file:
        file.write(html)


def _plot(optuna: Any, name: str, study: Any, target: str) -> str | None:
    """One of Optuna's matplotlib plots of ``study`` (``target``: the objective's name) as a PNG
    data URI; None if it cannot be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plots are marked experimental; tight_layout warns
        try:
            axes = getattr(optuna.visualization.matplotlib, name)(study, target_name=target)
        except (RuntimeError, ValueError):
            return None
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        buffer = io.BytesIO()
        try:
            figure.set_dpi(90)
            figure.tight_layout()
            close_and_save(figure, buffer)
        finally:
            plt.close(figure)  # also when drawing it failed
        return png_data_uri(buffer.getvalue())
