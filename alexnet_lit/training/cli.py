"""The LightningCLI entry point behind ``scripts/train.py``."""

import contextlib
import functools
import itertools
import json
import os
import re
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    BasePredictionWriter,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from alexnet_lit.checkpoints import (
    LAST_NAME,
    AtomicCheckpointIO,
    BackgroundCheckpointIO,
    SaveInterrupted,
    find_checkpoint,
    load_checkpoint,
)
from alexnet_lit.data import ImageFolderDataModule
from alexnet_lit.errors import CheckpointError, UserError, first_line, print_error
from alexnet_lit.inference.predict import PredictionCSVWriter
from alexnet_lit.loggers import FOLDER_LOGGERS, arrange_loggers, check_logger_config
from alexnet_lit.module import LitAlexNet
from alexnet_lit.runs import discard_if_unused, next_run_folder
from alexnet_lit.training.fault_tolerance import NonFiniteLossError
from alexnet_lit.training.precision import native_mixed_precision
from alexnet_lit.weights import weights_preprocessing

# The loggers that write a version_N folder, by class name, the run folder's first.
FOLDER_LOGGER_NAMES = tuple(cls.__name__ for cls in FOLDER_LOGGERS)
INTERRUPTED = 130  # the exit status of a process ended by Ctrl-C (128 + SIGINT)
# Classes a config may name by their path before the package was grouped into data/, training/,
# evaluation/ and inference/: a run's saved config.yaml that names one is told the new path.
MOVED = {
    "alexnet_lit.callbacks.EpochTimer": "alexnet_lit.training.callbacks.EpochTimer",
    "alexnet_lit.callbacks.HyperparametersToTensorBoard": (
        "alexnet_lit.training.callbacks.HyperparametersToTensorBoard"
    ),
    "alexnet_lit.callbacks.ValidationImages": "alexnet_lit.evaluation.callbacks.ValidationImages",
    "alexnet_lit.callbacks.EvaluationReport": "alexnet_lit.evaluation.callbacks.EvaluationReport",
    "alexnet_lit.calibration.TemperatureScaling": (
        "alexnet_lit.evaluation.callbacks.TemperatureScaling"
    ),
    "alexnet_lit.report.RunReport": "alexnet_lit.evaluation.callbacks.RunReport",
    "alexnet_lit.fault_tolerance.CheckpointOnSigterm": (
        "alexnet_lit.training.fault_tolerance.CheckpointOnInterrupt"
    ),
    "alexnet_lit.fault_tolerance.": "alexnet_lit.training.fault_tolerance.",
    "alexnet_lit.tools.": "alexnet_lit.training.finders.",
    "alexnet_lit.schedules.": "alexnet_lit.training.schedules.",
    "alexnet_lit.inference.PredictionCSVWriter": (
        "alexnet_lit.inference.predict.PredictionCSVWriter"
    ),
}


class AlexNetCLI(LightningCLI):
    """LightningCLI that takes the classes and preprocessing from the data, never from the user."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loaded_checkpoints = {}  # --ckpt_path, loaded once (see _parse_ckpt_path)
        self._resumed_logger = None  # the logger a resumed fit's folder was set on
        self._native_precision = False  # trainer.precision chosen by native_mixed_precision
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.in_channels", "model.in_channels")
        for attribute in ("num_classes", "class_names", "preprocessing", "class_weights"):
            parser.link_arguments(f"data.{attribute}", f"model.{attribute}", apply_on="instantiate")
        parser.add_argument(
            "--native_mixed_precision",
            type=bool,
            default=False,
            help="Where trainer.precision is not set, train in the mixed precision the device "
            "runs natively: bf16-mixed on CUDA GPUs of compute capability 8.0+ and on CPUs "
            "with AVX512_BF16 or AMX, 16-mixed on older CUDA GPUs, 32-true elsewhere "
            "(configs/fast.yaml turns it on).",
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if args is None or isinstance(args, list | tuple):
            check_config_files(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI calls this private hook to torch.load --ckpt_path and copy its
        # hyperparameters into the config, and offers no public way to do either. Here the file
        # is loaded once, by the one safe loader, and handed to the trainer's checkpoint IO; the
        # model's data-dependent hyperparameters come from the data's links, and a checkpoint
        # that does not fit them is refused by LitAlexNet.on_load_checkpoint.
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        if config is None or not config.get("ckpt_path"):
            return
        self._resolve_ckpt_path(config, subcommand)
        if "://" not in config.ckpt_path:  # remote files are left to the trainer
            checkpoint = load_checkpoint(config.ckpt_path)
            if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
                raise CheckpointError(
                    f"--ckpt_path '{config.ckpt_path}' is not a Lightning checkpoint (it has no "
                    f"state_dict entry); to start from weights such as a plain state_dict or the "
                    f"tutorial's alexnet.pt, pass --model.weights {config.ckpt_path} instead."
                )
            if subcommand == "fit" and "optimizer_states" not in checkpoint:
                last = Path(config.ckpt_path).with_name(LAST_NAME)
                resume = f"resume from '{last}' (the full state), or " if last.is_file() else ""
                raise CheckpointError(
                    f"--ckpt_path '{config.ckpt_path}' holds weights only (no optimizer or loop "
                    f"state), so there is no fit to resume: {resume}start a new fit from these "
                    f"weights with --model.weights {config.ckpt_path}."
                )
            self._loaded_checkpoints[config.ckpt_path] = checkpoint

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        check_logger_config(_class_paths(config.trainer.logger))
        accumulate = config.trainer.get("accumulate_grad_batches", 1)
        if accumulate is not None and accumulate < 1:  # Lightning would divide by it mid-fit
            raise UserError(
                f"trainer.accumulate_grad_batches must be at least 1, got {accumulate}."
            )
        checkpoint = self._loaded_checkpoints.get(config.get("ckpt_path"))
        if checkpoint is not None:  # resume, validate, test, predict: the checkpoint's record
            record = checkpoint.get("hyper_parameters", {}).get("preprocessing")
            _follow_preprocessing(config, record, f"--ckpt_path {config.ckpt_path} was")
        elif self.subcommand in (None, "fit") and not config.get("ckpt_path"):
            # A new fit: the record of its starting weights. (A remote --ckpt_path is left to
            # the trainer, unread, so its record cannot be followed here.)
            weights = config.model.weights
            record = weights_preprocessing(weights, config.data.in_channels)
            _follow_preprocessing(config, record, f"model.weights {weights} were")
        if config.get("native_mixed_precision"):
            trainer = config.trainer
            if trainer.precision is not None:
                rank_zero_info(
                    f"native_mixed_precision: keeping trainer.precision={trainer.precision}, "
                    "which the config sets."
                )
            else:
                trainer.precision, reason = native_mixed_precision(trainer.accelerator)
                self._native_precision = True
                rank_zero_info(f"native_mixed_precision: {trainer.precision}, {reason}.")

    def _resolve_ckpt_path(self, config, subcommand: str) -> None:
        logger = _folder_logger(config)
        versioned = logger is not None
        if versioned:
            log_root = Path(logger.init_args.save_dir, logger.init_args.name or "")
        else:
            log_root = Path(config.trainer.default_root_dir or ".", "lightning_logs")
        if config.ckpt_path in ("best", "last"):  # the newest run's, as files (Lightning's
            # own "best" means this process's fit only)
            config.ckpt_path = str(find_checkpoint([log_root], config.ckpt_path))
        # Resuming a fit continues its run folder: the TensorBoard curves stay one history, and
        # ModelCheckpoint keeps tracking the best score (it forgets it when its folder changes).
        run_dir = Path(config.ckpt_path).parent.parent  # log_root/version_N/checkpoints/x.ckpt
        if (
            subcommand == "fit"
            and versioned
            and logger.init_args.version is None
            and run_dir.name.startswith("version_")
            and run_dir.parent.resolve() == log_root.resolve()
        ):
            logger.init_args.version = run_dir.name
            self._resumed_logger = logger

    def instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        logger = _claim_run_folder(config)
        claimed = contextlib.nullcontext()
        if logger is not None:  # nothing ran if this fails: leave no empty run folder behind
            name, version = logger.init_args.name or "", f"version_{logger.init_args.version}"
            claimed = discard_if_unused(Path(logger.init_args.save_dir, name, version))
        try:
            with claimed:
                super().instantiate_classes()
        finally:
            # The saved config.yaml says what the user asked for, not what was chosen here, so
            # that running it again is a new run of the same recipe on whatever machine: no run
            # folder (a claimed or resumed one), no checkpoint to resume (a finished run would
            # "resume" doing nothing), no precision picked for this machine's hardware.
            for chosen in (logger, self._resumed_logger):
                if chosen is not None:
                    chosen.init_args.version = None
            if self.subcommand == "fit" and config.get("ckpt_path"):
                config.ckpt_path = None
            if self._native_precision:
                config.trainer.precision = None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:  # Lightning's refusal of a trainer setting
            raise UserError(first_line(err)) from err
        arrange_loggers(trainer, self.subcommand)
        # Write checkpoints atomically and load them as data only, unless a plugin chose otherwise
        # (configs/background_checkpoints.yaml's BackgroundCheckpointIO writes through one). The
        # sync to disk and the rename, I/O waits that need no CPU, go on while training does.
        checkpoint_io = trainer.strategy.checkpoint_io
        if type(checkpoint_io) is TorchCheckpointIO:
            checkpoint_io = BackgroundCheckpointIO(serialize_in_background=False)
            trainer.strategy.checkpoint_io = checkpoint_io
        if isinstance(checkpoint_io, BackgroundCheckpointIO):
            checkpoint_io = checkpoint_io.checkpoint_io
        if isinstance(checkpoint_io, AtomicCheckpointIO):
            checkpoint_io.hand_over(self._loaded_checkpoints)
        self._loaded_checkpoints = {}  # the trainer's load takes it; no second copy for the fit
        _follow_weight_averaging(trainer)
        _finetuning_first(trainer)
        _without_logger(trainer)
        return trainer

    def before_predict(self) -> None:
        # predict writes predictions.csv into the run directory unless a writer is configured.
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionCSVWriter())


def _loggers(config: Any) -> list[Namespace]:
    """The logger configs of ``trainer.logger`` (one, a list, or none)."""
    loggers = config if isinstance(config, list) else [config]
    return [logger for logger in loggers if isinstance(logger, Namespace)]


def _finetuning_first(trainer: Trainer) -> None:
    """Fine-tuning callbacks before the others: they thaw the backbone (a new optimizer group,
    new rates) in ``on_train_epoch_start``, where LearningRateMonitor logs the rates, which
    would otherwise show each rate an epoch late and miss the thaw epoch's new group."""
    finetuning = [c for c in trainer.callbacks if isinstance(c, BaseFinetuning)]
    if finetuning:
        rest = [c for c in trainer.callbacks if not isinstance(c, BaseFinetuning)]
        trainer.callbacks[:] = [*finetuning, *rest]


def _without_logger(trainer: Trainer) -> None:
    """``trainer.logger: false`` leaves the learning rates nowhere to go, and Lightning's
    LearningRateMonitor (in configs/default.yaml's callbacks) would end the fit with a traceback:
    leave it out, and say so."""
    monitors = [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)]
    if not trainer.loggers and monitors:
        trainer.callbacks[:] = [c for c in trainer.callbacks if c not in monitors]
        rank_zero_info("trainer.logger: false: the learning rates are not logged.")


def _follow_weight_averaging(trainer: Trainer) -> None:
    """Weight averaging (EMA, SWA) changes the weights outside the optimizer step, which a
    :class:`BackgroundCheckpointIO` that serializes in the background does not wait for, and
    puts its averaged weights into a checkpoint in a callback hook that weights-only files skip:
    with it, a save's tensors are written on the training thread, and the best file holds the
    full state."""
    averaging = [
        callback
        for callback in trainer.callbacks
        if isinstance(callback, WeightAveraging | StochasticWeightAveraging)
    ]
    if not averaging:
        return
    changed = []
    checkpoint_io = trainer.strategy.checkpoint_io
    if isinstance(checkpoint_io, BackgroundCheckpointIO) and checkpoint_io.serialize_in_background:
        checkpoint_io.serialize_in_background = False
        changed.append("written on the training thread")
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_weights_only:
            callback.save_weights_only = False
            changed.append("saved with the full state")
    if changed:
        rank_zero_info(
            f"{type(averaging[0]).__name__}: checkpoints are {' and '.join(dict.fromkeys(changed))}"
            ", so that they hold the averaged weights."
        )


def _class_paths(config: Any) -> list[str]:
    return [logger.class_path for logger in _loggers(config)]


def _folder_logger(config: Namespace) -> Namespace | None:
    """The config of the logger whose ``version_N`` folder is the run folder: TensorBoard's, or
    a CSV logger's where there is no TensorBoard logger (as ``arrange_loggers`` orders them)."""
    loggers = _loggers(config.trainer.logger)
    for name in FOLDER_LOGGER_NAMES:
        found = [logger for logger in loggers if logger.class_path.endswith(name)]
        if found:
            return found[0]
    return None


def _claim_run_folder(config: Namespace) -> Namespace | None:
    """Create the next ``version_N`` folder now and set it as the logger's version, so that
    runs started together never share one (the logger would list the folders, then create its
    own later). Returns the logger config it set, or None where there was nothing to claim."""
    logger = _folder_logger(config)
    if logger is None or config.trainer.get("fast_dev_run"):
        return None  # fast_dev_run: Lightning runs it without loggers, so without a run folder
    # DDP's other processes take rank 0's folder (Trainer.log_dir broadcasts it); only the
    # process that will be global rank 0 claims one.
    rank_zero = rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"
    root = Path(logger.init_args.save_dir, logger.init_args.get("name") or "")
    remote = "://" in str(logger.init_args.save_dir)
    if logger.init_args.get("version") is not None or not rank_zero or remote:
        return None
    # The number, as the logger would pick it: its folder is version_N, the progress bar's v_num N.
    folder = next_run_folder(root, "trainer.logger's save_dir")
    logger.init_args.version = int(folder.name.removeprefix("version_"))
    return logger


def _follow_preprocessing(config: Namespace, record: dict | None, trained_with: str) -> None:
    """Set the data's unset preprocessing keys to the ``record`` the weights were trained with
    (``trained_with`` names them); keys the config sets win, with one line each."""
    if not isinstance(record, dict) or record.get("in_channels") != config.data.in_channels:
        return  # no record, or the other channel count, which the model refuses in one line
    for key in ("image_size", "mean", "std"):
        ours, theirs = config.data.get(key), record[key]
        if ours is None:
            config.data[key] = theirs
        elif (ours if key == "image_size" else [float(v) for v in ours]) != theirs:
            rank_zero_info(
                f"data.{key}: keeping {ours}, which the config sets, over the {theirs} that "
                f"{trained_with} trained with."
            )


def cli_main(args: list[str] | None = None, run: bool = True) -> AlexNetCLI:
    """Run the CLI; a data or config mistake ends in one line on stderr and exit code 2, Ctrl-C in
    one line and exit code 130 (what a shell reports for SIGINT).

    With ``run=False`` the arguments are those of one subcommand (``fit``'s) without its name,
    and the model, data and trainer are instantiated but nothing runs.
    """
    try:
        return AlexNetCLI(
            LitAlexNet,
            ImageFolderDataModule,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            # The optimizer is the model's (model.optimizer in YAML): one way to set it, not two.
            auto_configure_optimizers=False,
            # Raise instead of printing the whole usage text, so the error is one line; and take
            # no abbreviation (argparse's default), so a mistyped key is an error, not another key.
            parser_kwargs={"exit_on_error": False, "allow_abbrev": False},
        )
    except UserError as err:
        _exit_with(str(err))
    except NonFiniteLossError as err:
        _exit_with(str(err), code=1)
    except KeyboardInterrupt as err:  # outside the Trainer's own handling (parsing, setup)
        _exit_with(_interrupted_message(err), code=INTERRUPTED)
    except SystemExit as err:
        # Lightning ends a run stopped by Ctrl-C with sys.exit(1) inside its `except
        # KeyboardInterrupt` (trainer/call.py), after the callbacks' on_exception; the exit's
        # __context__ is the only public trace of which interruption it was.
        if isinstance(err.__context__, KeyboardInterrupt):
            _exit_with(_interrupted_message(err.__context__), code=INTERRUPTED)
        raise
    except ArgumentError as err:
        _exit_with(argument_error_line(err, sys.argv[1:] if args is None else args))


def check_config_files(args: Sequence[str]) -> None:
    """Each ``--config FILE`` is YAML text, or one sentence names it (jsonargparse would end in a
    UnicodeDecodeError's traceback, or in a parse error that does not say which file).

    Raises:
        UserError: A config file that is not UTF-8 text or not valid YAML.
    """
    args = list(args)
    paths = [value for flag, value in itertools.pairwise(args) if flag in ("--config", "-c")]
    for arg in args:
        for prefix in ("--config=", "-c=", "-c"):
            if arg.startswith(prefix) and arg not in ("-c", "--config"):
                paths.append(arg.removeprefix(prefix))
                break
    for path in map(Path, paths):
        if not path.is_file():
            continue  # a missing file, or YAML given inline: jsonargparse says what is wrong
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as err:
            reason = first_line(err)
            mark = getattr(err, "problem_mark", None)
            if mark is not None:
                reason = f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
            raise UserError(
                f"--config {path} is not a YAML config ({reason}); fix it, or pass a config "
                "such as configs/default.yaml."
            ) from err


def argument_error_line(err: ArgumentError, args: Sequence[str]) -> str:
    """The one line a CLI argument or config mistake ends in."""
    moved = _moved_class_path(str(err), list(args))
    if moved:
        return moved
    # jsonargparse puts the key on the first line and the reason on the second.
    message = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])
    message = message.rstrip(".")
    return f"{message}; see 'python scripts/train.py SUBCOMMAND --help' for valid keys."


class _ParseOnly(AlexNetCLI):
    """The CLI's parser and parsed config; nothing is read from disk or built."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse_fit_args(args: Sequence[str]) -> Namespace:
    """The config ``train.py fit ARGS`` resolves to, without building or reading anything.

    Raises:
        ArgumentError: An unknown key or a value its type refuses (:func:`argument_error_line`
            says it in one line).
        UserError: A ``--config`` file that is not YAML.
    """
    check_config_files(args)
    return fit_parser().parse_args(list(args))


@contextlib.contextmanager
def args_given_in_code() -> Iterator[None]:
    """For a CLI given ``args=[...]`` by a tool (a sweep, an audit) rather than by the command
    line, which is what LightningCLI warns about whenever the process has arguments of its own."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended")
        yield


@functools.cache
def fit_parser() -> ArgumentParser:
    """The parser of ``train.py fit``'s arguments."""
    # Building the parser takes most of a parse's time: once per process.
    with args_given_in_code():
        return _ParseOnly(
            LitAlexNet,
            ImageFolderDataModule,
            args=["--seed_everything=false"],  # nothing runs: no seeding, and no line saying so
            run=False,
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False, "allow_abbrev": False},
        ).parser


def fit_cli(
    args: Sequence[str],
    save_dir: str | Path,
    version: str,
    checkpoints: bool = True,
    experiment: str | None = None,
) -> AlexNetCLI:
    """The CLI of ``train.py fit ARGS``, instantiated but not run, with its run folder at
    ``save_dir/version`` (a TensorBoard logger in place of the configured one; trackers such as
    MLflow's kept beside it, their runs in ``experiment`` where given); without ModelCheckpoint
    callbacks unless ``checkpoints``. Mistakes end the process as the CLI does (exit 2), but
    for a ``--config`` file that is not YAML, a :class:`UserError` (:func:`check_config_files`).
    """
    tensorboard = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {
            "save_dir": str(save_dir),
            "name": "",
            "version": version,
            "default_hp_metric": False,
        },
    }
    loggers = [tensorboard, *_trackers(args, experiment)]
    logger = [
        f"--trainer.logger={json.dumps(loggers)}",
        # Lightning's own files (and, under SLURM, the checkpoints it resumes from) go there too.
        f"--trainer.default_root_dir={Path(save_dir, version)}",
    ]
    with args_given_in_code():
        cli = cli_main([*args, *logger], run=False)
    # The saved config.yaml names no run folder, as a user's own does: run again (to reproduce
    # the run, or validate its checkpoint) it makes a new folder instead of overwriting this one.
    for entry in cli.config.trainer.logger:
        if entry.init_args.get("version") == version:
            entry.init_args.version = None
    cli.config.trainer.default_root_dir = None
    if not checkpoints:
        cli.trainer.callbacks[:] = [
            callback
            for callback in cli.trainer.callbacks
            if not isinstance(callback, ModelCheckpoint)
        ]
    return cli


def _trackers(args: Sequence[str], experiment: str | None) -> list[dict[str, Any]]:
    """The loggers ``args`` configure besides TensorBoard and CSV, as config dicts."""
    try:
        loggers = parse_fit_args(args).trainer.logger
    except ArgumentError:
        return []  # the fit's own parse says what is wrong, in one line
    trackers = []
    for logger in _loggers(loggers):
        if logger.class_path.endswith(FOLDER_LOGGER_NAMES):
            continue
        tracker = logger.as_dict()
        if experiment is not None and "experiment_name" in tracker.get("init_args", {}):
            tracker["init_args"]["experiment_name"] = experiment
        trackers.append(tracker)
    return trackers


def _renamed(name: str) -> str | None:
    """The path a class named by its old path has now, or None."""
    for old, new in MOVED.items():
        if name == old:
            return new
        if old.endswith(".") and name.startswith(old):
            return new + name[len(old) :]
    return None


def _moved_class_path(message: str, args: list[str]) -> str | None:
    """One line for a config that names classes by their old paths (all of them), or None."""
    if not any(old in message for old in MOVED):
        return None
    configs = [a for a in args if a.endswith((".yaml", ".yml")) and Path(a).is_file()]
    for config in configs:
        text = Path(config).read_text(errors="replace")
        names = dict.fromkeys(re.findall(r"alexnet_lit(?:\.\w+)+", text))
        moved = [(name, _renamed(name)) for name in names if _renamed(name)]
        if not moved:
            continue
        if len(moved) == 1:
            line = f"'{config}' names {moved[0][0]}, which is now {moved[0][1]}; replace it there"
        else:
            listed = ", ".join(f"{old} (now {new})" for old, new in moved)
            line = f"'{config}' names classes by their old paths: {listed}; replace them there"
        if any(old.endswith("calibration.TemperatureScaling") for old, _ in moved):
            line += ", and drop TemperatureScaling's init_args (it takes none now)"
        return line + "."
    return None


def _interrupted_message(err: KeyboardInterrupt) -> str:
    if isinstance(err, SaveInterrupted):
        return str(err)
    return "interrupted (Ctrl-C)."


def _exit_with(message: str, code: int = 2) -> None:
    print_error(message)
    raise SystemExit(code)
