"""Train each research recipe through the real CLI, one run at a time, and tabulate the results.

    python scripts/run_recipes.py                                # every recipe, seed 0
    python scripts/run_recipes.py --recipes default adamw --seeds 0 1 2
    python scripts/run_recipes.py --recipes default -- --trainer.max_epochs 1   # extra CLI args

Each run is ``python scripts/train.py fit --config configs/default.yaml [--config
configs/experiments/NAME.yaml] --seed_everything SEED [extra args]`` in its own folder
``OUT/NAME/seed_SEED/`` (its ``lightning_logs/version_0`` holds the config and TensorBoard
events). The wall time is that of the whole process; the best ``val/acc`` and the epochs run are
read back from the event file. Checkpoints (~560 MB each) are deleted after a run unless
``--keep-checkpoints``. Every finished run is appended to ``OUT/runs.jsonl``, so an interrupted
sweep picks up where it stopped, and the Markdown table goes to stdout and ``OUT/results.md``.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from argparse import ArgumentError
from pathlib import Path

from alexnet_lit.errors import UserError, run_main
from alexnet_lit.evaluation.run_page import result_summary
from alexnet_lit.runs import check_writable
from alexnet_lit.training.cli import argument_error_line, parse_fit_args

# The checkout's root: the recipes are its configs/, and each run starts its scripts/train.py.
ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "configs" / "experiments"


def all_recipes() -> list[str]:
    return ["default", *sorted(path.stem for path in EXPERIMENTS.glob("*.yaml"))]


def command(recipe: str, seed: int, extra: list[str]) -> list[str]:
    """The CLI command of one run, with paths relative to the repository root."""
    args = ["python", "scripts/train.py", "fit", "--config", "configs/default.yaml"]
    if recipe != "default":
        args += ["--config", f"configs/experiments/{recipe}.yaml"]
    return [*args, "--seed_everything", str(seed), *extra]


def absolute(argv: list[str]) -> list[str]:
    """``argv`` with the repository's ``scripts/`` and ``configs/`` paths made absolute: a run
    starts in its own folder."""
    return [str(ROOT / arg) if arg.startswith(("scripts/", "configs/")) else arg for arg in argv]


def without_seed(argv: list[str]) -> list[str]:
    at = argv.index("--seed_everything")
    return argv[:at] + argv[at + 2 :]


def run_one(recipe: str, seed: int, extra: list[str], out: Path, keep: bool) -> dict:
    work_dir = out / recipe / f"seed_{seed}"
    work_dir.mkdir(parents=True, exist_ok=True)
    argv = command(recipe, seed, extra)
    # Run from work_dir so lightning_logs/ lands there; configs and the script by absolute path.
    started = [sys.executable, *absolute(argv[1:])]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    print(f"[{recipe} seed {seed}] {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    with open(work_dir / "train.log", "w") as log:
        returncode = subprocess.run(
            started, cwd=work_dir, env=env, stdout=log, stderr=log
        ).returncode
    wall_s = time.perf_counter() - start
    versions = sorted(
        (work_dir / "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime
    )
    run_dir = versions[-1] if versions else work_dir
    summary = result_summary(run_dir) if versions else {}
    if not keep:
        for checkpoint in run_dir.glob("checkpoints/*.ckpt"):
            checkpoint.unlink()
    result = {
        "recipe": recipe,
        "seed": seed,
        "command": shlex.join(argv),
        "returncode": returncode,
        "wall_s": round(wall_s, 1),
        "epochs": summary.get("epochs", 0),
        "best_val_acc": summary.get("best_val_acc"),
        "best_epoch": summary.get("best_epoch"),  # 0-based, as Lightning counts epochs
        "run_dir": str(run_dir),
    }
    status = "failed, see train.log" if returncode else f"best val/acc {result['best_val_acc']}"
    print(f"[{recipe} seed {seed}] {wall_s:.0f} s, {status}", flush=True)
    return result


def format_minutes(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s"


def markdown_table(results: list[dict], extra: list[str]) -> str:
    """One row per recipe: command, epochs, wall time, best val/acc (mean ± sd over seeds)."""
    rows = [
        "| recipe | command | seeds | epochs | wall time per run | best `val/acc` (mean ± sd) "
        "| per seed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for recipe in dict.fromkeys(r["recipe"] for r in results):
        runs = [r for r in results if r["recipe"] == recipe]
        good = [r for r in runs if r["returncode"] == 0 and r["best_val_acc"] is not None]
        seeds = ", ".join(str(r["seed"]) for r in runs)
        shown = shlex.join(without_seed(command(recipe, 0, extra)))
        if not good:
            rows.append(f"| {recipe} | `{shown}` | {seeds} | - | - | failed | - |")
            continue
        accs = [r["best_val_acc"] for r in good]
        spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
        epochs = sorted({r["epochs"] for r in good})
        wall = format_minutes(statistics.mean(r["wall_s"] for r in good))
        per_seed = ", ".join(f"{r['seed']}: {r['best_val_acc']:.3f}" for r in good)
        rows.append(
            f"| {recipe} | `{shown}` | {seeds} | {'/'.join(map(str, epochs))} | {wall} "
            f"| {statistics.mean(accs):.3f}{spread} | {per_seed} |"
        )
    return "\n".join(rows) + "\n"


RECORD_KEYS = {"recipe", "seed", "command", "returncode"}


def finished_runs(path: Path) -> list[dict]:
    """The records of ``runs.jsonl``; a line that is not a whole record (the tool was stopped
    while writing it) is said and left out, so that its run is done again."""
    runs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and record.keys() >= RECORD_KEYS:
            runs.append(record)
        else:
            print(f"{path}:{number} is not a whole record (cut short?); that run is done again.")
    return runs


def check_extra_args(recipes: list[str], extra: list[str]) -> None:
    """Each recipe's ``train.py fit`` arguments, the ones after ``--`` included, parse: checked
    before any run.

    Raises:
        UserError: They do not; the line names the recipe and the key.
    """
    for recipe in recipes:
        try:
            parse_fit_args(absolute(command(recipe, 0, extra))[3:])
        except ArgumentError as err:
            line = argument_error_line(err, extra)
            raise UserError(f"after -- (with the {recipe} recipe): {line}") from err


def recipes_main(argv: list[str] | None = None) -> int:
    """``scripts/run_recipes.py``: 0 when every run succeeded, 1 when one failed (its train.log
    says why), 2 with one line for a mistake in the arguments."""
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=all_recipes(), choices=all_recipes())
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=Path("recipe_runs"), help="run folder root")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="ignore runs.jsonl; rerun all")
    args = parser.parse_args(argv)
    failed = False

    def main() -> None:
        nonlocal failed
        failed = _run_recipes(args, extra)

    return run_main(main) or int(failed)


def _run_recipes(args: argparse.Namespace, extra: list[str]) -> bool:
    """Run what is not done yet and write the table; whether a run failed."""
    check_extra_args(args.recipes, extra)
    check_writable(args.out, "--out", folder=True)
    log_path = args.out / "runs.jsonl"
    done = []
    if log_path.exists() and not args.fresh:
        done = finished_runs(log_path)
    if log_path.exists() and not log_path.read_bytes().endswith(b"\n"):
        with open(log_path, "a") as log:  # end the cut-short line: the next record is whole
            log.write("\n")
    results = []
    for recipe in args.recipes:
        for seed in args.seeds:
            previous = [
                r
                for r in done
                if r["recipe"] == recipe
                and r["seed"] == seed
                and r["command"] == shlex.join(command(recipe, seed, extra))
            ]
            if previous and previous[-1]["returncode"] == 0:
                print(f"[{recipe} seed {seed}] already in {log_path}; skipped")
                results.append(previous[-1])
                continue
            result = run_one(recipe, seed, extra, args.out, args.keep_checkpoints)
            with open(log_path, "a") as log:
                log.write(json.dumps(result) + "\n")
            results.append(result)
    table = markdown_table(results, extra)
    (args.out / "results.md").write_text(table)
    print("\n" + table)
    return any(r["returncode"] for r in results)
