"""The run's loggers: TensorBoard always, and MLflow (or another tracker) beside it.

Lightning sends every scalar to every logger. What it does not send goes through here, the one
place that knows each logger's API: pictures (:func:`log_image`), files (:func:`log_files`) and
tags (:func:`set_tags`). A tracker that fails in the middle of a fit (its server went away) costs
a warning per failed call, never the fit: the run folder and checkpoints are written as usual.

TensorBoard stays first in ``trainer.loggers`` (:func:`arrange_loggers`): its ``version_N``
folder is the run folder whatever else is configured, and ``report.html`` reads its curves from
its event file.
"""

import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary

from alexnet_lit.errors import UserError

INSTALL = "pip install -e '.[mlflow]'"
LOCAL_STORE = "sqlite:///mlflow.db"
MLFLOW_RUN_NAME = "mlflow.runName"  # the tag MLflow keeps a run's name in


def tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The trainer's TensorBoard logger, if it has one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


# Loggers that write a versioned folder (``version_N``); the others are trackers.
FOLDER_LOGGERS = (TensorBoardLogger, CSVLogger)
# After a failed call, a tracker is left alone this long (calls skipped with a warning), so that
# a server that went away costs seconds of training, not MLflow's minutes of retries per call.
RETRY_AFTER_S = 60.0
_DOWN: "weakref.WeakKeyDictionary[Logger, float]" = weakref.WeakKeyDictionary()


def _trackers(trainer: L.Trainer) -> list[Logger]:
    """The loggers other than TensorBoard and CSV: the ones that talk to a server."""
    return [lg for lg in trainer.loggers if not isinstance(lg, FOLDER_LOGGERS)]


def takes_pictures(trainer: L.Trainer) -> bool:
    """Whether any of the trainer's loggers shows pictures (see :func:`log_image`)."""
    return any(_picture_logger(lg) for lg in trainer.loggers)


def _picture_logger(logger: Logger) -> bool:
    return isinstance(logger, TensorBoardLogger | MLFlowLogger) or callable(
        getattr(logger, "log_image", None)
    )


def _uri(logger: Logger) -> str | None:
    # MLFlowLogger has no public name for its URI, and its client (``experiment``) would start
    # the run on the server.
    return getattr(logger, "_tracking_uri", None)


def _call(logger: Logger, what: str, call: Callable[[], Any]) -> None:
    """Make one call to a tracker; a failure is a warning, and for ``RETRY_AFTER_S`` after it
    the tracker's calls are skipped with one."""
    where = _uri(logger) or type(logger).__name__
    if time.monotonic() < _DOWN.get(logger, 0.0):
        rank_zero_warn(f"{where}: {what} not logged (the server failed a call less than "
                       f"{RETRY_AFTER_S:.0f} s ago)")  # fmt: skip
        return
    try:
        call()
    except Exception as err:  # whatever the client raises when its server is gone
        _DOWN[logger] = time.monotonic() + RETRY_AFTER_S
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        rank_zero_warn(f"{where}: {what} not logged ({type(err).__name__}: {reason})")


def log_image(trainer: L.Trainer, tag: str, picture: Image.Image, png: bytes, step: int) -> None:
    """Log a picture to every logger that takes pictures (rank 0 only). ``png``: the picture
    encoded (``pictures.png_bytes``, also for its file), which TensorBoard takes as it is; the
    other trackers' clients encode the picture themselves."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            _add_png(logger.experiment, tag, picture, png, step)
        elif isinstance(logger, MLFlowLogger):
            _call(
                logger,
                f"picture {tag}",
                lambda lg=logger: lg.experiment.log_image(lg.run_id, picture, key=tag, step=step),
            )
        elif _picture_logger(logger):  # W&B, Neptune
            _call(
                logger,
                f"picture {tag}",
                lambda lg=logger: lg.log_image(key=tag, images=[picture], step=step),
            )


def _add_png(writer: Any, tag: str, picture: Image.Image, png: bytes, step: int) -> None:
    # SummaryWriter.add_image takes pixels only and encodes them again, at PIL's default level.
    # This writes the Summary it would build around the PNG the picture already has, through
    # the writer's file_writer (as its own add_hparams does). TensorBoard reads the PNG itself;
    # colorspace is a label.
    if writer.file_writer is None:  # closed, as Lightning leaves it after a fit: add_image reopens
        writer.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
        return
    channels = min(len(picture.getbands()), 4)
    image = Summary.Image(
        height=picture.height, width=picture.width, colorspace=channels, encoded_image_string=png
    )
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def log_files(trainer: L.Trainer, paths: Iterable[Path], folder: str | None = None) -> None:
    """Upload files (the config, the reports, the best checkpoint) to every MLflow run, into
    its artifact ``folder`` (rank 0 only)."""
    paths = [path for path in paths if path.is_file()]
    if not trainer.is_global_zero or not paths:
        return
    for logger in _trackers(trainer):
        if not isinstance(logger, MLFlowLogger):
            continue
        for path in paths:
            _call(
                logger,
                f"file {path.name}",
                lambda lg=logger, p=path: lg.experiment.log_artifact(lg.run_id, str(p), folder),
            )


def set_tags(trainer: L.Trainer, tags: Mapping[str, Any], run_name: str | None = None) -> None:
    """Tag every MLflow run, and name it ``run_name`` unless its config names it (rank 0 only)."""
    if not trainer.is_global_zero:
        return
    for logger in _trackers(trainer):
        if not isinstance(logger, MLFlowLogger):
            continue

        def tag(lg: MLFlowLogger = logger) -> None:
            for key, value in tags.items():
                lg.experiment.set_tag(lg.run_id, key, str(value))
            if run_name and MLFLOW_RUN_NAME not in (lg.tags or {}):  # the logger's run_name
                lg.experiment.update_run(lg.run_id, name=run_name)

        _call(logger, "tags", tag)


def log_params(trainer: L.Trainer, params: Mapping[str, Any]) -> None:
    """Log flat ``group/name`` settings as the parameters of every tracker (rank 0 only)."""
    for logger in _trackers(trainer):
        _call(logger, "parameters", lambda lg=logger: lg.log_hyperparams(dict(params)))


def check_logger_config(class_paths: Iterable[str]) -> None:
    """Refuse, before anything is built, loggers whose library is not installed.

    Raises:
        UserError: An MLflow logger without MLflow.
    """
    for path in class_paths:
        if "mlflow" in path.lower():
            try:
                import mlflow  # noqa: F401
            except ImportError:
                raise UserError(
                    f"trainer.logger: {path} needs MLflow; install it with {INSTALL}"
                ) from None


def arrange_loggers(trainer: L.Trainer, subcommand: str | None) -> None:
    """Put the logger whose folder is the run folder first, refuse a fit without TensorBoard,
    and start every MLflow run now, on the process that will be global rank 0, so that a server
    that cannot be reached ends the command before anything runs.

    Raises:
        UserError: Loggers without TensorBoard's, or an MLflow server that does not answer.
    """
    loggers = trainer.loggers
    if not loggers or trainer.fast_dev_run:  # logger: false; fast_dev_run logs nowhere
        return
    folder_loggers = [lg for lg in loggers if isinstance(lg, FOLDER_LOGGERS)]
    tensorboard = tensorboard_logger(trainer)
    if (subcommand in (None, "fit") and tensorboard is None) or not folder_loggers:
        names = ", ".join(type(lg).__name__ for lg in loggers)
        raise UserError(
            f"trainer.logger lists {names} without TensorBoardLogger, which must stay in the "
            "list: the run folder lightning_logs/version_N and report.html's curves come from "
            "it; add trackers beside it with 'logger+:' as configs/mlflow.yaml does."
        )
    first = tensorboard or folder_loggers[0]
    trainer.loggers = [first, *(lg for lg in loggers if lg is not first)]
    if rank_zero_only.rank == 0:
        for logger in loggers:
            if isinstance(logger, MLFlowLogger):
                _start_run(logger)


def _start_run(logger: MLFlowLogger) -> None:
    uri = _uri(logger) or ""
    if uri.startswith(("http://", "https://")):
        import requests  # an MLflow dependency

        try:
            # A dead server fails here at once; MLflow's client would retry it for minutes.
            requests.get(uri, timeout=10)
        except requests.exceptions.SSLError:
            pass  # a certificate MLflow may accept (MLFLOW_TRACKING_INSECURE_TLS): its call
        except requests.RequestException as err:
            raise UserError(
                f"the MLflow tracking server {uri} cannot be reached ({type(err).__name__}); "
                "start it, or set MLFLOW_TRACKING_URI (or the logger's tracking_uri) to one "
                "that runs."
            ) from None
    try:
        logger.run_id  # noqa: B018 (creates the experiment and the run)
    except Exception as err:  # an answer that is not MLflow's, a refusal, a bad store
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"the MLflow tracking store {uri} did not start the run ({type(err).__name__}: "
            f"{reason}); check MLFLOW_TRACKING_URI (or the logger's tracking_uri)."
        ) from None


class MLflowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` for ``configs/mlflow.yaml``, where a call that fails (the
    server went away mid-run) is a warning instead of the end of the fit.

    Args:
        experiment_name: The MLflow experiment the run goes into.
        tracking_uri: The tracking server or store; ``None``: ``MLFLOW_TRACKING_URI`` when it is
            set, else MLflow's own default, a local SQLite store ``./mlflow.db`` (artifacts in
            ``./mlruns``) that ``mlflow ui`` in the same folder shows. (MLflow 3 refuses new
            ``file:./mlruns`` stores.)
        run_name: ``None``: named after the run folder, ``version_N``.
        tags: Tags for the run, beside the dataset, class count and run folder.
        synchronous: ``False`` logs in a background thread (MLflow's async logging).

    The best checkpoint, the config and the reports are uploaded when the fit ends (see
    :class:`alexnet_lit.evaluation.callbacks.RunReport`), so Lightning's ``log_model`` is off.
    """

    def __init__(
        self,
        experiment_name: str = "alexnet-lit",
        tracking_uri: str | None = None,
        run_name: str | None = None,
        tags: dict[str, Any] | None = None,
        synchronous: bool | None = None,
    ) -> None:
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_STORE,
            tags=tags,
            synchronous=synchronous,
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        _call(
            self,
            f"metrics at step {step}",
            lambda: super(MLflowLogger, self).log_metrics(metrics, step),
        )

    def log_hyperparams(self, params: Any) -> None:
        _call(self, "hyperparameters", lambda: super(MLflowLogger, self).log_hyperparams(params))

    def finalize(self, status: str = "success") -> None:
        _call(self, f"the run's end ({status})", lambda: super(MLflowLogger, self).finalize(status))
