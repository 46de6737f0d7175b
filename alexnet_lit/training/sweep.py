"""Hyperparameter sweeps on Optuna: many ordinary fits, one study.

    python scripts/tune.py --config configs/default.yaml --search configs/search/recipe.yaml \\
        --trials 20 [any other train.py fit argument]

Each trial is ``train.py fit`` with the given arguments plus the values Optuna's sampler picks for
the keys of the search file, run in this process into its own run folder,
``lightning_logs/sweeps/STUDY/trial_K/``. The objective is the trial's best ``val/acc``; Optuna's
pruner stops trials that trail the others at the same epoch. The study lives in a journal file in
the sweep folder, or in any database Optuna's RDB storage takes (``--storage
postgresql://...``), where workers on many machines share it. After every trial the sweep folder
gets ``sweep.csv`` and ``best.yaml``, and at the end of a worker's run ``sweep.html`` (see
:mod:`alexnet_lit.evaluation.sweep_page`). docs/sweeps.md is the user's guide.
"""

import argparse
import contextlib
import functools
import gc
import json
import os
import re
import shlex
import signal
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from alexnet_lit.errors import UserError, first_line, print_error
from alexnet_lit.evaluation.run_page import result_summary
from alexnet_lit.runs import check_writable, printable, write_csv
from alexnet_lit.training.cli import (
    INTERRUPTED,
    argument_error_line,
    fit_cli,
    fit_parser,
    parse_fit_args,
)
from alexnet_lit.training.fault_tolerance import CheckpointOnInterrupt, NonFiniteLossError
from alexnet_lit.training.recipes import ROOT

try:  # the optional extra; require_optuna() says how to install it
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback
except ImportError:
    optuna = None
    PyTorchLightningPruningCallback = Callback

TUNE_INSTALL = "pip install -e '.[tune]'"
OBJECTIVE = "val/acc"  # maximised
TERMINATED = 128 + signal.SIGTERM  # the exit status a shell reports for SIGTERM
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"  # best.yaml is an overlay on it
_KINDS = ("float", "int", "choice")
_OPTIONS = {"float": {"log", "step"}, "int": {"log", "step"}, "choice": set()}


def require_optuna() -> None:
    """Say in one sentence how to install the sweep's extra when it is missing."""
    if optuna is None:
        raise UserError(
            f"sweeps need optuna and optuna-integration, an optional extra that is not "
            f"installed; install it with {TUNE_INSTALL}."
        )


# --- the search space ------------------------------------------------------------------------


def load_search_space(path: str | Path) -> dict[str, "optuna.distributions.BaseDistribution"]:
    """The search file's keys and their distributions, in file order.

    A key is any ``train.py fit`` key (``model.dropout``); its value is one of
    ``{float: [LOW, HIGH]}`` (``log: true``, ``step: S`` optional), ``{int: [LOW, HIGH]}``
    (the same options) or ``{choice: [A, B, ...]}``.

    Raises:
        UserError: The file is missing or not such a mapping; the message names the key.
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read the search file '{path}': {err.strerror}.") from err
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"'{path}' is not valid YAML: {first_line(err)}.") from err
    if not isinstance(spec, dict) or not spec:
        raise UserError(
            f"'{path}' holds no search space; write one key per line, for example "
            "'model.dropout: {float: [0.2, 0.7]}'."
        )
    return {str(key): _distribution(path, str(key), value) for key, value in spec.items()}


def _distribution(path: Path, key: str, value: Any) -> "optuna.distributions.BaseDistribution":
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    where = f"'{path}', key '{key}'"
    kinds = [kind for kind in _KINDS if isinstance(value, dict) and kind in value]
    if len(kinds) != 1:
        raise UserError(
            f"{where}: give exactly one of float: [LOW, HIGH], int: [LOW, HIGH] or "
            f"choice: [A, B, ...], not {value!r}."
        )
    kind = kinds[0]
    unknown = sorted(set(value) - {kind} - _OPTIONS[kind])
    if unknown:
        allowed = ", ".join(sorted(_OPTIONS[kind])) or "nothing"
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}; {kind} takes {allowed}.")
    bounds = value[kind]
    if kind == "choice":
        if not isinstance(bounds, list) or not bounds:
            raise UserError(f"{where}: choice needs a non-empty list of values, got {bounds!r}.")
        if not all(v is None or isinstance(v, bool | int | float | str) for v in bounds):
            raise UserError(f"{where}: choices must be numbers, strings, booleans or null.")
        return CategoricalDistribution(bounds)
    number = int if kind == "int" else (int, float)
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds)
    ):
        raise UserError(f"{where}: {kind} needs [LOW, HIGH], two {kind} numbers, got {bounds!r}.")
    low, high = bounds
    if low > high:
        raise UserError(f"{where}: the low end {low} is above the high end {high}.")
    log, step = bool(value.get("log", False)), value.get("step")
    if step is not None and (not isinstance(step, number) or isinstance(step, bool) or step <= 0):
        raise UserError(f"{where}: step must be a positive {kind} number, got {step!r}.")
    if log and low <= 0:
        raise UserError(f"{where}: a log scale needs a low end above 0, got {low}.")
    if log and step is not None:
        raise UserError(f"{where}: use log or step, not both.")
    if kind == "int":
        return IntDistribution(low, high, log=log, step=1 if step is None else step)
    return FloatDistribution(float(low), float(high), log=log, step=step)


def value_arg(key: str, value: Any) -> str:
    """``--KEY=VALUE`` as ``train.py`` takes it (``true``/``null`` for booleans and None)."""
    text = json.dumps(value) if value is None or isinstance(value, bool) else str(value)
    return f"--{key}={text}"


def value_args(params: Mapping[str, Any]) -> list[str]:
    """A trial's values as ``train.py fit`` arguments."""
    return [value_arg(key, value) for key, value in params.items()]


def check_search_space(space: Mapping[str, Any], fit_args: Sequence[str], path: Path) -> Namespace:
    """Check, before any trial runs, that every key is one ``train.py fit FIT_ARGS`` takes and
    that the CLI's parser accepts the ends of every range and every choice; returns the config
    ``FIT_ARGS`` resolve to.

    Raises:
        UserError: The arguments, or a key or value of the search file, in one sentence.
    """
    from argparse import ArgumentError

    try:
        config = parse_fit_args(fit_args)
    except ArgumentError as err:
        raise UserError(argument_error_line(err, fit_args)) from err
    for key in space:
        if key not in config or key.split(".")[0] == "config":
            raise UserError(
                f"'{path}': '{key}' is not a key of 'train.py fit' with these arguments; see "
                "'python scripts/train.py fit --help' (and --model.help / --data.help) for them."
            )
        if key.startswith(("trainer.logger", "trainer.default_root_dir")):
            raise UserError(
                f"'{path}': '{key}' is set by the sweep (each trial's run folder); leave it out."
            )
    values = {key: _ends(distribution) for key, distribution in space.items()}
    for i in range(max(len(v) for v in values.values())):
        picked = {key: v[min(i, len(v) - 1)] for key, v in values.items()}
        try:
            parse_fit_args([*fit_args, *value_args(picked)])
        except ArgumentError as err:
            raise UserError(f"'{path}': {argument_error_line(err, fit_args)}") from err
    return config


def _ends(distribution: Any) -> list[Any]:
    if hasattr(distribution, "choices"):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def suggest(trial: "optuna.Trial", key: str, distribution: Any) -> Any:
    """The trial's value for ``key``, drawn by the study's sampler from ``distribution``."""
    from optuna.distributions import FloatDistribution, IntDistribution

    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(
            key, distribution.low, distribution.high, log=distribution.log, step=distribution.step
        )
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(
            key, distribution.low, distribution.high, log=distribution.log, step=distribution.step
        )
    return trial.suggest_categorical(key, distribution.choices)


# --- one trial ---------------------------------------------------------------------------


class StopHopelessTrial(PyTorchLightningPruningCallback):
    """Optuna's pruning callback: after each validation epoch it reports the best ``val/acc`` so
    far (``val/acc_best``, what the objective ends as) and asks the study's pruner. Two changes:
    a trial it prunes stops the way an early-stopped fit does, so its run folder gets its
    checkpoints and ``report.html`` like any other (the stock callback raises inside the fit,
    which skips both), and a trial in its last epoch is never pruned (nothing would be saved,
    and a pruned trial cannot be the best)."""

    def __init__(self, trial: "optuna.Trial", monitor: str = f"{OBJECTIVE}_best") -> None:
        super().__init__(trial, monitor)
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            super().on_validation_end(trainer, pl_module)
        except optuna.TrialPruned:
            last = trainer.max_epochs is not None and trainer.max_epochs > 0
            if last and pl_module.current_epoch + 1 >= trainer.max_epochs:
                return
            self.pruned_at = pl_module.current_epoch
            trainer.should_stop = True
            rank_zero_info(
                f"Pruned at epoch {self.pruned_at}: {self.monitor} "
                f"{float(trainer.callback_metrics[self.monitor]):.4f} trails the other trials "
                "at this epoch; the fit stops here."
            )


class Terminated(Exception):
    """SIGTERM while no fit runs. An Exception, so that Optuna marks a trial it ends failed:
    Lightning's own SIGTERMException is a SystemExit, which Optuna lets through."""


class TrialEnded(Exception):
    """A trial stopped by Ctrl-C, SIGTERM or a mistake the CLI reported (and said: then
    ``message`` is None); Optuna marks it failed and the sweep ends with ``code``."""

    def __init__(self, message: str | None, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def worker_id() -> str:
    """``host:pid`` of this worker, kept with each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Objective:
    """One trial: ``train.py fit FIT_ARGS`` plus the sampled values, in ``sweep_dir/trial_K``.

    Returns the run's best ``val/acc``. A trial the pruner stops, or whose loss stops being
    finite (a learning rate far too high), is reported pruned.
    """

    def __init__(self, fit_args: Sequence[str], space: Mapping[str, Any], sweep_dir: Path) -> None:
        self.fit_args = list(fit_args)
        self.space = dict(space)
        self.sweep_dir = sweep_dir
        self.stop = False  # a SIGTERM came at the end of the last fit: stop after its trial

    def __call__(self, trial: "optuna.Trial") -> float:
        _SIGTERM.check()  # one that came while Optuna was starting this trial
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("process", f"{process_space()}/{os.getpid()}")
        trial.set_user_attr("fit_args", self.fit_args)
        params = {key: suggest(trial, key, dist) for key, dist in self.space.items()}
        folder = self.sweep_dir / f"trial_{trial.number}"
        print(f"\ntrial {trial.number}: {format_params(params)}", flush=True)
        try:
            folder.mkdir(parents=True)  # claimed: no other study's trial writes into it
        except FileExistsError as err:
            raise UserError(
                f"'{folder}' exists from an earlier study of this name; move it away, or pass "
                "another --study."
            ) from err
        trial.set_user_attr("run_dir", str(folder.resolve()))
        args = [*self.fit_args, *value_args(params)]
        pruning = StopHopelessTrial(trial)
        cli = None
        try:
            with _SIGTERM.interruptible():
                cli = fit_cli(args, self.sweep_dir, folder.name, experiment=trial.study.study_name)
            if not isinstance(cli.trainer.strategy, SingleDeviceStrategy):
                raise UserError(
                    f"a sweep trial trains on one device, but these arguments choose "
                    f"{type(cli.trainer.strategy).__name__}; leave configs/ddp.yaml out and run "
                    "one worker per GPU (CUDA_VISIBLE_DEVICES=N python scripts/tune.py ...)."
                )
            # A failed trial is never resumed: no last.ckpt on Ctrl-C or SIGTERM, no resume hint.
            cli.trainer.callbacks[:] = [
                c for c in cli.trainer.callbacks if not isinstance(c, CheckpointOnInterrupt)
            ]
            cli.trainer.callbacks.append(pruning)
            with _SIGTERM.interruptible():
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            # A SIGTERM Lightning noted after its last look: the trial is done, the sweep stops.
            self.stop = cli.trainer.received_sigterm
        except NonFiniteLossError as err:
            epoch = cli.trainer.current_epoch
            self._record(trial, folder, f"diverged at epoch {epoch} (loss not finite)")
            raise optuna.TrialPruned(f"diverged at epoch {epoch}") from err
        except (SIGTERMException, Terminated) as err:
            trial.set_user_attr("note", "stopped by SIGTERM")
            raise TrialEnded(f"trial {trial.number} stopped by SIGTERM", TERMINATED) from err
        except SystemExit as err:  # the CLI's one-line mistakes, and Ctrl-C (Lightning exits 1)
            if isinstance(err.__context__, KeyboardInterrupt) or err.code == INTERRUPTED:
                trial.set_user_attr("note", "stopped by Ctrl-C")
                raise TrialEnded(f"trial {trial.number} stopped by Ctrl-C", INTERRUPTED) from err
            trial.set_user_attr("note", "the fit ended with an error")
            raise TrialEnded(None, err.code if isinstance(err.code, int) else 1) from err
        finally:
            cli = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the next trial's batch size may differ
        if pruning.pruned_at is not None:
            self._record(trial, folder, f"pruned at epoch {pruning.pruned_at}")
            raise optuna.TrialPruned(f"pruned at epoch {pruning.pruned_at}")
        best = self._record(trial, folder)
        if best is None:
            raise UserError(
                f"trial {trial.number} logged no {OBJECTIVE}, which the sweep maximises; keep "
                "validation on (trainer.limit_val_batches above 0)."
            )
        return best

    @staticmethod
    def _record(trial: "optuna.Trial", folder: Path, note: str | None = None) -> float | None:
        """Store the run's best val/acc and its epoch (and ``note``) with the trial."""
        summary = result_summary(folder) if folder.is_dir() else {}
        best = summary.get("best_val_acc")
        trial.set_user_attr("best_val_acc", best)
        trial.set_user_attr("best_epoch", summary.get("best_epoch"))
        if note:
            trial.set_user_attr("note", note)
        return best


def format_params(params: Mapping[str, Any]) -> str:
    """``dropout=0.41, lr=0.00012``: each key's last part and its value, briefly."""
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={_brief(v)}" for key, v in params.items())


def at_epoch(trial: "optuna.trial.FrozenTrial") -> str:
    """`` (epoch E)``: where the trial's best was reached, when known."""
    epoch = trial.user_attrs.get("best_epoch")
    return "" if epoch is None else f" (epoch {epoch})"


def _brief(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --- the study -----------------------------------------------------------------------------


def shown_url(storage: str) -> str:
    """A storage URL with its password hidden (``user:***@``, ``password=***``), for messages
    and pages, whether or not it is a URL a database would take."""
    shown = re.sub(r"(//[^/@:]*:)[^@]*@", r"\1***@", storage)
    return re.sub(r"(password=)[^&]*", r"\1***", shown, flags=re.IGNORECASE)


def open_storage(storage: str | None, sweep_dir: Path) -> Any:
    """The study's storage: ``sweep_dir/journal.log`` by default, a journal file at a path, or
    Optuna's RDB storage for a database URL (with a heartbeat, so that a trial whose worker
    died is marked failed by the next worker to start one).

    Raises:
        UserError: The driver is missing, or the database cannot be reached.
    """
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if storage is None or "://" not in storage:
        path = Path(storage) if storage else sweep_dir / "journal.log"
        if path.is_dir():
            raise UserError(
                f"--storage '{path}' is a folder; pass a journal file such as "
                f"'{path / 'journal.log'}', or a database URL."
            )
        # Its folder, probed with a file of this process's own: the journal may be another
        # worker's, being written.
        check_writable(path.parent, "--storage" if storage else "--sweep-dir", folder=True)
        return JournalStorage(JournalFileBackend(str(path)))
    try:
        return _rdb_storage(storage)
    except ImportError as err:  # Optuna re-raises SQLAlchemy's missing driver as one
        driver = getattr(err.__cause__, "name", None) or "for it"
        raise UserError(
            f"--storage {shown_url(storage)} needs the database driver {driver}, which is not "
            f"installed; for PostgreSQL install the extra with {TUNE_INSTALL}."
        ) from err
    except Exception as err:  # SQLAlchemy's OperationalError, ArgumentError, ...
        raise UserError(
            f"cannot open the study storage {shown_url(storage)}: "
            f"{first_line(getattr(err, 'orig', None) or err)}; check the URL and that the "
            "database server runs."
        ) from err


def _rdb_storage(url: str, attempts: int = 5) -> Any:
    """Optuna's RDB storage at ``url``. Workers started together on a new database each create
    its tables, and all but one can meet the others' half-made ones (a unique key or a table
    that exists already); the creation checks what exists, so trying again a moment later
    succeeds."""
    from optuna.storages import RDBStorage
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    def create() -> Any:
        with warnings.catch_warnings():  # the heartbeat is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                # A connection idle through a long epoch may have been dropped on the way.
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=60,
                grace_period=180,
            )

    for attempt in range(1, attempts):
        try:
            return create()
        except (IntegrityError, ProgrammingError):
            time.sleep(0.5 * attempt)
    return create()


def open_study(
    storage: Any, name: str, space: Mapping[str, Any], fit_args: Sequence[str], own: Any
) -> "optuna.Study":
    """Create the study, or load it to continue; refuse one that searches another space."""
    from optuna.distributions import distribution_to_json

    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=own.prune_after_trials, n_warmup_steps=own.prune_warmup_epochs
        ),
    )
    # constant_liar: workers running at once are steered away from each other's points. A seed
    # goes on from the trials there are, or a continued sweep would draw the same values again.
    seed = None if own.sampler_seed is None else own.sampler_seed + len(study.trials)
    study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    searched = {key: json.loads(distribution_to_json(d)) for key, d in space.items()}
    earlier = study.user_attrs.get("search_space")
    if earlier is None:
        study.set_user_attr("search_space", searched)
        study.set_user_attr("fit_args", list(fit_args))
    elif earlier != searched:
        raise UserError(
            f"study '{name}' searches another space ({', '.join(sorted(earlier))}); continue it "
            "with the same search file, or start a new study with --study NEW_NAME."
        )
    elif study.user_attrs.get("fit_args") != list(fit_args):
        began = shlex.join(study.user_attrs.get("fit_args", []))
        if not own.study:  # a default name: most likely another experiment, not this one
            raise UserError(
                f"study '{name}' began with other fit arguments ({began}); continue it with "
                f"these anyway with --study {name}, or start a new one with --study NEW_NAME."
            )
        print(f"note: study '{name}' began with other fit arguments: {began}", flush=True)
    return study


def fail_abandoned_trials(study: "optuna.Study") -> None:
    """Mark failed the running trials of this machine's workers that are gone (SIGKILL, the
    out-of-memory killer, a crash): a journal file has no heartbeat to notice them."""
    here = process_space()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        space, _, pid = str(trial.user_attrs.get("process", "")).rpartition("/")
        if space != here or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker starting now marked it first
        worker = trial.user_attrs.get("worker")
        print(f"note: trial {trial.number}'s worker ({worker}) is gone; marked failed.")


def process_space() -> str:
    """Where this process's ID means this process: the host, its boot and its PID namespace
    (Linux; containers sharing a host name have their own), so that a worker only judges the
    processes it can see."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "|".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def finished_states() -> tuple["optuna.trial.TrialState", ...]:
    """Complete and pruned: the trials ``--trials`` counts."""
    return (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def finished_trials(study: "optuna.Study") -> list["optuna.trial.FrozenTrial"]:
    """The study's complete and pruned trials."""
    return study.get_trials(deepcopy=False, states=finished_states())


def best_trial(
    trials: Sequence["optuna.trial.FrozenTrial"],
) -> "optuna.trial.FrozenTrial | None":
    """The complete trial with the highest objective (the first of equals), or None."""
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return max(complete, key=lambda t: t.value) if complete else None


def trial_line(study: "optuna.Study", trial: "optuna.trial.FrozenTrial") -> str:
    """The line printed when a trial ends: its values, its result, the best so far."""
    state = trial.state.name.lower()
    if state == "complete":
        result = f"{OBJECTIVE} {trial.value:.4f}{at_epoch(trial)}"
    else:
        result = trial.user_attrs.get("note") or state
    best = best_trial(study.get_trials(deepcopy=False))
    best_text = f"best {best.value:.4f} (trial {best.number})" if best else "no complete trial yet"
    return f"trial {trial.number} done: {format_params(trial.params)} -> {result}; {best_text}"


# --- what a sweep leaves behind ------------------------------------------------------------


def trial_rows(trials: Sequence["optuna.trial.FrozenTrial"]) -> list[dict[str, Any]]:
    """One row per trial, in trial order, as ``sweep.csv`` has them."""
    rows = []
    for trial in trials:
        # A pruned trial's value is its last report; its best is kept with it.
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        best = trial.value if complete else trial.user_attrs.get("best_val_acc")
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name.lower(),
                **trial.params,
                "best_val_acc": best,
                "best_epoch": trial.user_attrs.get("best_epoch"),
                "note": trial.user_attrs.get("note", ""),
                "worker": trial.user_attrs.get("worker", ""),
                "run_dir": trial.user_attrs.get("run_dir", ""),
            }
        )
    return rows


@contextlib.contextmanager
def results_lock(sweep_dir: Path) -> Iterator[None]:
    """Held while a worker rewrites the sweep folder's files from the study, so that one
    worker's older view never replaces another's newer one: an advisory lock on
    ``sweep_dir/.results.lock``, which the kernel releases if its holder dies (POSIX; elsewhere
    the files are written unlocked)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(sweep_dir / ".results.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_results(
    study: "optuna.Study",
    sweep_dir: Path,
    space: Mapping[str, Any],
    fit_args: Sequence[str],
    storage: str,
    keep_checkpoints: str = "best",
    page: bool = True,
) -> Path | None:
    """From one reading of the study: delete the checkpoints of this folder's ended trials but
    the best (unless ``keep_checkpoints`` is ``all``), and write ``sweep.csv``, ``best.yaml`` and,
    with ``page``, ``sweep.html``, each file replaced whole. Returns ``best.yaml``'s path, None
    before any trial completes."""
    with results_lock(sweep_dir):
        trials = study.get_trials(deepcopy=False)
        best = best_trial(trials)
        if keep_checkpoints == "best":
            delete_checkpoints(trials, best, sweep_dir)
        rows = trial_rows(trials)
        fields = ["number", "state", *space, "best_val_acc", "best_epoch", "note", "worker"]
        # Parameters in full: write_csv rounds floats to 4 decimals, too few for a learning rate.
        in_full = [
            {k: repr(v) if k in space and isinstance(v, float) else v for k, v in row.items()}
            for row in rows
        ]
        with _replaced(sweep_dir / "sweep.csv") as tmp:
            write_csv(tmp, in_full, [*fields, "run_dir"])
        best_yaml = sweep_dir / "best.yaml"
        if best is None:
            best_yaml.unlink(missing_ok=True)
            best_yaml = None
        else:
            with _replaced(best_yaml) as tmp:
                tmp.write_text(best_overlay_text(study.study_name, best, fit_args, best_yaml))
        if page:
            from alexnet_lit.evaluation.sweep_page import build_sweep_page

            with _replaced(sweep_dir / "sweep.html") as tmp:
                rerun = rerun_command(best_yaml)
                build_sweep_page(
                    study, rows, best, tmp, sweep_dir, list(space), OBJECTIVE, storage, rerun
                )
    return best_yaml


@contextlib.contextmanager
def _replaced(path: Path) -> Iterator[Path]:
    """A temporary file that replaces ``path`` whole when the block ends: a reader never sees
    half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def best_overlay(fit_args: Sequence[str], params: Mapping[str, Any]) -> dict[str, Any]:
    """The overlay on ``configs/default.yaml`` that reproduces ``train.py fit FIT_ARGS`` with a
    trial's values: every key whose value differs (the sweep's logger is not among them, so a
    re-run gets its own run folder)."""
    return _difference(_default_config(), _dumped([*fit_args, *value_args(params)]))


@functools.cache
def _default_config() -> dict[str, Any]:
    """``configs/default.yaml`` resolved: once per process, not once per trial (read only)."""
    return _dumped(["--config", str(DEFAULT_CONFIG)])


def _dumped(args: Sequence[str]) -> dict[str, Any]:
    """The config ``train.py fit ARGS`` resolves to, as YAML has it in a config file (a callable
    default as its import path)."""
    return yaml.safe_load(fit_parser().dump(parse_fit_args(args)))


def _difference(base: Any, new: Any) -> Any:
    """What ``new`` sets differently from ``base``, as a nested overlay; ``{}`` when nothing.
    A class whose ``class_path`` changed, and any list, is given whole."""
    if isinstance(base, dict) and isinstance(new, dict):
        if "class_path" in new and base.get("class_path") != new.get("class_path"):
            return new
        changed = {}
        for key, value in new.items():
            if key not in base:
                changed[key] = value
                continue
            delta = _difference(base[key], value)
            if delta != {}:
                changed[key] = delta
        return changed
    return {} if base == new else new


def best_overlay_text(
    study_name: str, best: "optuna.trial.FrozenTrial", fit_args: Sequence[str], path: Path
) -> str:
    """``best.yaml``'s text: the overlay reproducing the best trial (its own fit arguments, or
    ``fit_args`` for a trial that did not record them), and a header saying which trial it is."""
    fit_args = best.user_attrs.get("fit_args", fit_args)
    header = (
        f"# The best trial of study '{study_name}': trial {best.number}, {OBJECTIVE} "
        f"{best.value:.4f}{at_epoch(best)}, run in {best.user_attrs.get('run_dir')} "
        f"({best.user_attrs.get('worker')}).\n"
        f"# Its values: {format_params(best.params)}\n"
        f"# Re-run it: {rerun_command(path)}\n"
    )
    return header + yaml.safe_dump(best_overlay(fit_args, best.params), sort_keys=False)


def rerun_command(best_yaml: Path | None) -> str | None:
    """``python scripts/train.py fit --config configs/default.yaml --config BEST_YAML``."""
    if best_yaml is None:
        return None
    default = _relative(DEFAULT_CONFIG)
    return shlex.join(
        ["python", "scripts/train.py", "fit", "--config", default, "--config", _relative(best_yaml)]
    )


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def delete_checkpoints(
    trials: Sequence["optuna.trial.FrozenTrial"],
    best: "optuna.trial.FrozenTrial | None",
    sweep_dir: Path,
) -> None:
    """Delete the checkpoints of this sweep folder's ended trials other than ``best`` (~560 MB
    each for the tutorial's AlexNet: a sweep of 20 would fill ~20 GB otherwise)."""
    ended = (*finished_states(), optuna.trial.TrialState.FAIL)
    for trial in trials:
        if trial.state not in ended or (best is not None and trial.number == best.number):
            continue
        folder = sweep_dir / f"trial_{trial.number}"
        if Path(trial.user_attrs.get("run_dir", "")) != folder.resolve():
            continue  # another machine's, or another folder's, trial
        for checkpoint in folder.glob("checkpoints/*.ckpt"):
            checkpoint.unlink(missing_ok=True)


# --- the command -----------------------------------------------------------------------------


class _SigtermState:
    """SIGTERM in a sweep worker. Noted wherever it comes; raised (:class:`Terminated`) only
    while a trial's CLI is built or its fit runs before Lightning's own handler is in place
    (the data scan), and elsewhere acted on at the next safe point: the start of a trial, the
    end of one (the sweep stops), the end of the sweep. Raised anywhere else it could land in
    Optuna's storage code or in a finalizer that swallows it. During a fit Lightning's handler
    calls this one after noting the signal, and the fit stops at its next batch."""

    def __init__(self) -> None:
        self.received = False
        self._interruptible = False

    def handle(self, signum: int, frame: Any) -> None:
        self.received = True
        if self._interruptible and signal.getsignal(signal.SIGTERM) == self.handle:
            raise Terminated

    def check(self) -> None:
        if self.received:
            raise Terminated

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self.check()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False


_SIGTERM = _SigtermState()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage text
        raise UserError(f"{message}; see 'python scripts/tune.py --help'.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tune.py",
        description="Search hyperparameters with Optuna: each trial is a train.py fit with the "
        "other arguments given here (--config overlays, --data.data_dir, ...).",
        allow_abbrev=False,
    )
    parser.add_argument("--search", type=Path, required=True, help="the search space (YAML)")
    parser.add_argument(
        "--trials", type=int, default=20, help="complete or pruned trials the study needs"
    )
    parser.add_argument("--study", help="the study's name (default: the search file's name)")
    parser.add_argument(
        "--storage",
        help="a journal file (default: SWEEP_DIR/journal.log) or a database URL such as "
        "postgresql://user@host/db, shared by every worker of the study",
    )
    parser.add_argument(
        "--sweep-dir", type=Path, help="default: lightning_logs/sweeps/STUDY; one folder per trial"
    )
    parser.add_argument(
        "--sampler-seed",
        type=int,
        help="seed of the TPE sampler, for a repeatable sweep in one worker (workers that "
        "share a study must not share a seed)",
    )
    parser.add_argument(
        "--prune-after-trials",
        type=int,
        default=4,
        help="complete trials before the median pruner stops any (default 4)",
    )
    parser.add_argument(
        "--prune-warmup-epochs",
        type=int,
        default=2,
        help="epochs every trial runs before it can be pruned (default 2)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        choices=("best", "all"),
        default="best",
        help="'best' (default) deletes the checkpoints of every trial but the best one",
    )
    return parser


def tune_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/tune.py``: run (or continue) a sweep; exit 2 with one line on a mistake."""
    previous = signal.getsignal(signal.SIGTERM)
    _SIGTERM.received = False
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _SIGTERM.handle)
    try:
        own, fit_args = build_parser().parse_known_args(
            sys.argv[1:] if argv is None else list(argv)
        )
        return _sweep(own, fit_args[1:] if fit_args[:1] == ["fit"] else fit_args)
    except UserError as err:
        print_error(err)
        return 2
    except TrialEnded as err:
        if err.message is not None:  # else the CLI said it
            print_error(
                f"{err.message}; it is marked failed in the study. Run the same command to "
                "continue."
            )
        return err.code
    except (SIGTERMException, Terminated):
        print_error("stopped by SIGTERM; run the same command to continue.")
        return TERMINATED
    except KeyboardInterrupt:
        print_error("interrupted (Ctrl-C); run the same command to continue.")
        return INTERRUPTED
    finally:
        if signal.getsignal(signal.SIGTERM) == _SIGTERM.handle:
            signal.signal(signal.SIGTERM, previous)


def _sweep(own: argparse.Namespace, fit_args: list[str]) -> int:
    require_optuna()
    if own.trials < 1:
        raise UserError(f"--trials must be at least 1, got {own.trials}.")
    for option in ("prune_after_trials", "prune_warmup_epochs"):
        if getattr(own, option) < 0:
            flag = "--" + option.replace("_", "-")
            raise UserError(f"{flag} must be 0 or more, got {getattr(own, option)}.")
    space = load_search_space(own.search)
    name = own.study or own.search.stem
    sweep_dir = own.sweep_dir or Path("lightning_logs", "sweeps", name)
    check_search_space(space, fit_args, own.search)
    storage = open_storage(own.storage, sweep_dir)
    storage_text = shown_url(own.storage) if own.storage else str(sweep_dir / "journal.log")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's own line says it
    study = open_study(storage, name, space, fit_args, own)
    check_writable(sweep_dir, "--sweep-dir", folder=True)  # made here
    fail_abandoned_trials(study)
    done = len(finished_trials(study))
    print(
        printable(
            f"study '{name}' in {storage_text}: {done} of {own.trials} trials finished; "
            f"runs in {sweep_dir}/trial_K"
        ),
        flush=True,
    )
    objective = Objective(fit_args, space, sweep_dir)

    def results(page: bool = False) -> Path | None:
        return write_results(
            study, sweep_dir, space, fit_args, storage_text, own.keep_checkpoints, page
        )

    def after_trial(study: "optuna.Study", trial: "optuna.trial.FrozenTrial") -> None:
        print(printable(trial_line(study, trial)), flush=True)
        results()  # the table and best.yaml after every trial; the page (seconds) at the end
        if objective.stop or _SIGTERM.received:
            study.stop()

    try:
        if done < own.trials and not _SIGTERM.received:
            study.optimize(
                objective,
                n_trials=own.trials - done,
                # Every worker stops once the study as a whole has --trials finished trials.
                callbacks=[
                    optuna.study.MaxTrialsCallback(own.trials, states=finished_states()),
                    after_trial,
                ],
                # Out of memory at one trial's values (a large batch) fails that trial only.
                catch=(torch.OutOfMemoryError,),
                gc_after_trial=True,
            )
    finally:  # also when a trial ended the sweep: the page shows what there is
        best_yaml = results(page=True)
    print(printable(_closing_lines(study, sweep_dir, best_yaml)), flush=True)
    if objective.stop or _SIGTERM.received:
        print_error(
            "stopped by SIGTERM after its trial finished; run the same command to continue."
        )
        return TERMINATED
    return 0


def _closing_lines(study: "optuna.Study", sweep_dir: Path, best_yaml: Path | None) -> str:
    best = best_trial(study.get_trials(deepcopy=False))
    lines = ["", f"Sweep '{study.study_name}': {len(finished_trials(study))} trials finished."]
    if best is None:
        lines.append("  no trial completed yet.")
    else:
        lines += [
            f"  best: trial {best.number}, {OBJECTIVE} {best.value:.4f}{at_epoch(best)}: "
            f"{format_params(best.params)}",
            f"  its run: {best.user_attrs.get('run_dir')}",
        ]
        if best_yaml is not None:
            lines.append(f"  re-run it: {rerun_command(best_yaml)}")
    lines += [
        f"  table: {sweep_dir / 'sweep.csv'}; page: {sweep_dir / 'sweep.html'}",
        f"  dashboards: tensorboard --logdir {sweep_dir}",
    ]
    return "\n".join(lines)
