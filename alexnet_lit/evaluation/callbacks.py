"""The evaluation callbacks: pictures for the loggers, the class reports, temperature scaling and
the run page.

Every one of them reads the evaluation epoch the LightningModule collected once
(``pl_module.eval_outputs[stage].compute()``: logits, targets and the confusion matrix, gathered
from every process) and the metrics it logged (``val/ece``), so nothing is counted or gathered
twice. They work in any order in the config: the temperature is fitted when the epoch ends
(``on_validation_epoch_end``), and everything that reads it runs later (``on_validation_end``,
``on_fit_end``), before Lightning's ``ModelCheckpoint``, which always runs last.
"""

import io
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image

from alexnet_lit.checkpoints import best_checkpoint, checkpoint_temperature
from alexnet_lit.evaluation.calibration import fit_temperature, render_reliability
from alexnet_lit.evaluation.class_report import write_report
from alexnet_lit.evaluation.gradcam import grad_cam, overlay
from alexnet_lit.evaluation.pictures import (
    image_grid,
    png_bytes,
    render_confusion_matrix,
    short_name,
    to_pixels,
)
from alexnet_lit.evaluation.run_page import build_report, fit_summary, record_run, source_run
from alexnet_lit.loggers import (
    log_files,
    log_image,
    set_tags,
    takes_pictures,
    tensorboard_logger,
)
from alexnet_lit.metrics import Evaluated, expected_calibration_error
from alexnet_lit.runs import logged_step, printable, run_dir

MISCLASSIFIED = "val_misclassified.png"


def _evaluated(pl_module: L.LightningModule, stage: str) -> Evaluated:
    # Gathered by the first compute() in an *_epoch_end hook, on every process; cached after.
    return pl_module.eval_outputs[stage].compute()


class _WritesIntoTheRun(L.Callback):
    """A callback that writes into the run folder: resolved when each stage is set up, on every
    process (a collective under DDP), so that rank 0 can use it alone later."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run_dir(trainer)


def _draw_now(trainer: L.Trainer) -> bool:
    """Whether an evaluation epoch's pictures are drawn when it ends: always in ``validate`` and
    ``test``; in a fit, when the epoch improves the metric the best checkpoint monitors (or no
    checkpoint monitors one). A fit's other epochs wait: if the last one is among them, it is
    drawn when training ends, so the pictures always show the best and the final epoch.

    Called before the ModelCheckpoints update their best score (Lightning runs them last), on
    every process alike (no collective)."""
    if trainer.state.fn != "fit":
        return True
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor:
            current = trainer.callback_metrics.get(callback.monitor)
            best = callback.best_model_score
            if current is None or best is None:
                return best is None
            return bool(current > best) if callback.mode == "max" else bool(current < best)
    return True


class _DrawsWhenNews(_WritesIntoTheRun):
    """A callback whose pictures of a fit's epoch are drawn when they are news
    (:func:`_draw_now`): at once, or held until training ends if that epoch turns out to be the
    last, or until the fit stops early (SIGTERM, Ctrl-C, a NaN loss), so that the run folder's
    pictures match its reports. A later validation drops a held drawing (``_drop_held``)."""

    def __init__(self) -> None:
        self._held: Callable[[], None] | None = None

    def _drop_held(self) -> None:
        self._held = None

    def _draw_when_news(self, trainer: L.Trainer, draw: Callable[[], None]) -> None:
        if _draw_now(trainer):
            draw()
        else:
            self._held = draw

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._held is not None:  # the last epoch, which did not improve
            draw, self._held = self._held, None
            draw()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # A failure here is a warning, never raised over the exception that stopped the fit.
        try:
            self.on_train_end(trainer, pl_module)
        except Exception as err:
            rank_zero_warn(printable(f"the last epoch's pictures were not drawn: {err}"))


def _has_run_folder(trainer: L.Trainer) -> bool:
    """Whether the run writes files: not the sanity check, and not a ``fast_dev_run``, which has
    no run folder."""
    return not trainer.sanity_checking and not trainer.fast_dev_run


class ValidationImages(_DrawsWhenNews):
    """Log pictures to every logger that takes them (TensorBoard, MLflow; see
    :func:`alexnet_lit.loggers.log_image`): training inputs once, and for validation epochs the
    confusion matrix (``val/confusion_matrix``) and the most confident mistakes
    (``val/misclassified``), each row of mistakes followed by a row of their Grad-CAM heatmaps
    (what the network looked at for the class it predicted). The mistakes are also saved as
    ``val_misclassified.png`` for the run page. In a fit, an epoch's pictures are drawn when it
    improves the monitored metric, and the last epoch's at the end of training (see
    :func:`_draw_now`).

    Args:
        max_images: Images per grid, at most.
        tile: Side in pixels of each image in a grid.
    """

    def __init__(self, max_images: int = 16, tile: int = 112) -> None:
        super().__init__()
        self.max_images = max_images
        self.tile = tile
        self._inputs_logged = False
        self._mistakes: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._inputs_logged:
            return
        self._inputs_logged = True
        if not takes_pictures(trainer) or not trainer.is_global_zero:
            return
        images, targets = batch[0][: self.max_images], batch[1][: self.max_images]
        pixels = to_pixels(images, pl_module.hparams.preprocessing, self.tile).cpu().numpy()
        names = pl_module.hparams.class_names
        captions = [short_name(names[int(t)]) for t in targets.cpu()]
        grid = image_grid(pixels, captions, tile=self.tile)
        log_image(trainer, "train/inputs", grid, png_bytes(grid), logged_step(trainer))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mistakes = None

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        images, targets = batch
        if trainer.sanity_checking or len(targets) == 0 or not trainer.is_global_zero:
            return
        self._keep_worst(pl_module, images, targets, outputs["logits"])

    def _keep_worst(self, pl_module, images, targets, logits) -> None:
        """Keep the ``max_images`` most confident mistakes so far, with fixed-size device ops."""
        confidence, predicted = logits.float().softmax(dim=1).max(dim=1)
        # Mistakes score in [1, 2], correct predictions 0: top-k picks confident mistakes first.
        score = (predicted != targets).float() * (1 + confidence)
        top = score.topk(min(self.max_images, len(score))).indices
        batch = {
            "score": score[top],
            "target": targets[top],
            "predicted": predicted[top],
            "confidence": confidence[top],
            "pixels": to_pixels(images[top], pl_module.hparams.preprocessing, self.tile),
            "inputs": images[top],  # the network's input, for Grad-CAM at the epoch's end
        }
        if self._mistakes is not None:
            batch = {key: torch.cat([self._mistakes[key], batch[key]]) for key in batch}
            keep = batch["score"].topk(min(self.max_images, len(batch["score"]))).indices
            batch = {key: value[keep] for key, value in batch.items()}
        self._mistakes = batch

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drop_held()
        if trainer.sanity_checking or not takes_pictures(trainer) or not trainer.is_global_zero:
            return
        self._draw_when_news(trainer, partial(self._draw, trainer, pl_module, logged_step(trainer)))

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        names = pl_module.hparams.class_names
        picture = render_confusion_matrix(_evaluated(pl_module, "val").confusion, names)
        log_image(trainer, "val/confusion_matrix", picture, png_bytes(picture), step)
        grid = self._mistakes_grid(pl_module)
        saved = run_dir(trainer) / MISCLASSIFIED if _has_run_folder(trainer) else None
        if grid is None:  # no mistake this epoch: the run page must not show an earlier epoch's
            if saved is not None:
                saved.unlink(missing_ok=True)
            return
        png = png_bytes(grid)  # one encoding, for the file and the loggers
        log_image(trainer, "val/misclassified", grid, png, step)
        if saved is not None:
            saved.write_bytes(png)

    def _mistakes_grid(self, pl_module: L.LightningModule):
        """The mistakes, a row of pictures then a row of their Grad-CAM; None without one."""
        wrong = None if self._mistakes is None else self._mistakes["score"] > 0
        if wrong is None or not wrong.any():
            return None
        names = pl_module.hparams.class_names
        network = getattr(pl_module, "model", None)
        heat = None
        if hasattr(network, "features"):  # Grad-CAM of the predicted class, on the device
            heat = grad_cam(
                network, self._mistakes["inputs"][wrong], self._mistakes["predicted"][wrong]
            )
            heat = F.interpolate(heat[:, None], size=(self.tile, self.tile), mode="bilinear")
            heat = heat[:, 0].cpu().numpy()
        mistakes = {key: value[wrong].cpu() for key, value in self._mistakes.items()}
        captions = [
            f"true: {short_name(names[int(t)])}\npred: {short_name(names[int(p)])} ({float(c):.2f})"
            for t, p, c in zip(
                mistakes["target"], mistakes["predicted"], mistakes["confidence"], strict=True
            )
        ]
        pixels = mistakes["pixels"].numpy()
        columns = min(8, len(pixels))
        tiles, labels = [], []
        for start in range(0, len(pixels), columns):  # a row of mistakes, then their CAM row
            tiles += list(pixels[start : start + columns])
            labels += captions[start : start + columns]
            if heat is not None:
                chunk = range(start, min(start + columns, len(pixels)))
                tiles += [overlay(pixels[i], heat[i]) for i in chunk]
                labels += ["Grad-CAM\n(predicted class)"] * len(chunk)
        return image_grid(np.stack(tiles), labels, columns=columns, tile=self.tile)


class TemperatureScaling(L.Callback):
    """Fit one temperature on each validation epoch's logits and set it as the model's
    ``temperature`` hyperparameter, so that every checkpoint saved from those weights carries
    it (the best checkpoint the one fitted on its epoch, ``last.ckpt`` the latest) and
    prediction reports calibrated probabilities. Logs ``val/temperature`` and
    ``val/ece_calibrated``.

    The logits come from the fit's own validation epochs (no extra pass), gathered from every
    process, so every rank fits the same temperature. A checkpoint saved between validations
    (mid-epoch, on SIGTERM) carries the latest validation's temperature.
    """

    def __init__(self) -> None:
        self._latest: dict[str, float] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        logits, targets, _ = _evaluated(pl_module, "val")
        if len(targets) == 0:
            return
        temperature = fit_temperature(logits, targets)
        after = expected_calibration_error(logits, targets, temperature)
        pl_module.hparams["temperature"] = temperature
        pl_module.log("val/temperature", temperature)  # the same on every process
        pl_module.log("val/ece_calibrated", after)
        self._latest = {"temperature": temperature, "after": after}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._latest is None:
            return
        before = trainer.callback_metrics.get("val/ece")
        line = f"temperature scaling: T = {self._latest['temperature']:.3f} (last epoch"
        if before is not None:
            line += f", val ECE {float(before):.4f} -> {self._latest['after']:.4f}"
        line += ")"
        best = checkpoint_temperature(best_checkpoint(run_dir(trainer)))
        if best is not None:
            line += f", {best:.3f} in the best checkpoint"
        if trainer.checkpoint_callbacks:
            line += "; each checkpoint stores the T fitted on its own epoch"
        rank_zero_info(line + ".")


class EvaluationReport(_DrawsWhenNews):
    """After each validation epoch of a fit (the latest one stays), and on ``validate`` and
    ``test``, write the class report, the confusion matrix and the reliability diagram into the
    run folder: ``{stage}_report.{csv,md,json}``, ``{stage}_confused_pairs.csv``,
    ``{stage}_confusion_matrix.png`` and ``{stage}_reliability.png`` (``stage``: ``val`` or
    ``test``), with the expected calibration error before and after the model's temperature.
    In a fit the two pictures (and the reliability diagram's ``val/reliability`` for the
    loggers) are drawn as :class:`ValidationImages` draws its own: in epochs that improve the
    monitored metric, and the last epoch's at the end of training.

    Args:
        top_pairs: How many most-confused class pairs to list.
    """

    def __init__(self, top_pairs: int = 10) -> None:
        super().__init__()
        self.top_pairs = top_pairs

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drop_held()
        if _has_run_folder(trainer):
            self._write(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _has_run_folder(trainer):
            self._write(trainer, pl_module, "test")

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        evaluated = _evaluated(pl_module, stage)
        folder = run_dir(trainer)
        metrics = trainer.callback_metrics
        temperature = float(pl_module.hparams.get("temperature", 1.0))
        raw = float(metrics.get(f"{stage}/ece", float("nan")))
        if f"{stage}/ece_calibrated" in metrics:  # fitted on this very epoch
            calibrated = float(metrics[f"{stage}/ece_calibrated"])
        else:
            calibrated = expected_calibration_error(*evaluated[:2], temperature)
        bins = "Expected calibration error (15 bins)"
        if temperature != 1.0:
            fitted_now = f"{stage}/ece_calibrated" in metrics
            whose = "this epoch's fitted" if fitted_now else "the checkpoint's"
            note = f"{bins}: {raw:.4f} raw, {calibrated:.4f} with {whose} temperature "
            note += f"{temperature:.3f}."
        else:
            note = f"{bins}: {raw:.4f} (raw; the checkpoint has no fitted temperature)."
        fn = trainer.state.fn
        title = f"{stage} report ({fn.value if fn else 'evaluation'}, "
        title += f"{int(evaluated.confusion.sum())} images)"
        calibration = {"raw": raw, "calibrated": calibrated, "temperature": temperature}
        paths = write_report(
            evaluated.confusion,
            pl_module.hparams.class_names,
            folder,
            stage,
            title,
            self.top_pairs,
            calibration={**calibration, "note": note},
        )
        draw = partial(self._draw, trainer, pl_module, stage, logged_step(trainer), calibration)
        self._draw_when_news(trainer, draw)
        if trainer.state.fn != "fit":
            rank_zero_info(printable(f"{stage} report: {paths['markdown']}"))

    def _draw(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        stage: str,
        step: int,
        calibration: dict[str, float],
    ) -> None:
        evaluated, folder = _evaluated(pl_module, stage), run_dir(trainer)
        names = pl_module.hparams.class_names
        matrix = png_bytes(render_confusion_matrix(evaluated.confusion, names))
        (folder / f"{stage}_confusion_matrix.png").write_bytes(matrix)
        reliability = render_reliability(
            *evaluated[:2],
            folder / f"{stage}_reliability.png",
            calibration["temperature"],
            f"{stage} reliability",
            eces=(calibration["raw"], calibration["calibrated"]),
        )
        png = reliability.read_bytes()
        # Opened from memory, not closed and not decoded: TensorBoard needs its size alone, and
        # MLflow's asynchronous logging may read the pixels after this returns.
        log_image(trainer, f"{stage}/reliability", Image.open(io.BytesIO(png)), png, step)


class RunReport(_WritesIntoTheRun):
    """Write ``report.html`` into the run folder at the end of ``fit``, ``validate`` and
    ``test`` (rank 0), refresh the page of the run whose checkpoint a validate/test used, and
    after a fit print where its results went."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._record(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)

    def _folder(self, trainer: L.Trainer) -> Path | None:
        # fast_dev_run and logger-less runs have no run folder with a config: no page.
        folder = run_dir(trainer)
        if trainer.is_global_zero and (folder / "config.yaml").is_file():
            return folder
        return None

    def _record(self, trainer: L.Trainer) -> None:
        folder = self._folder(trainer)
        if folder is None:
            return
        record_run(folder, trainer)
        data = trainer.datamodule
        tags = {"run_folder": printable(folder.resolve())}
        if data is not None and hasattr(data, "class_names"):
            dataset = printable(Path(data.data_dir).resolve())
            tags |= {"dataset": dataset, "classes": len(data.class_names)}
        set_tags(trainer, tags, run_name=folder.name)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = self._folder(trainer)
        if folder is None:
            return
        built = _build(folder, trainer)
        if built is not None:
            tensorboard = tensorboard_logger(trainer)
            logdir = os.path.normpath(tensorboard.root_dir) if tensorboard is not None else None
            print(printable(fit_summary(*built, logdir)), flush=True)
        _upload(trainer, folder, best_checkpoint(folder))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After every callback's on_validation_end/on_test_end: the evaluation files are written.
        if stage not in ("validate", "test"):
            return
        folder = self._folder(trainer)
        if folder is None:
            return
        built = _build(folder)
        if built is not None:
            rank_zero_info(printable(f"report: {built[0]}"))
        _upload(trainer, folder)
        source = source_run(trainer.ckpt_path)
        if source is not None and source.resolve() != folder.resolve():
            _build(source)  # the trained run's page lists this evaluation too


def _upload(trainer: L.Trainer, folder: Path, checkpoint: Path | None = None) -> None:
    """Give the trackers (MLflow) the run folder's files: the config, hyperparameters, reports
    and pictures, and the best checkpoint; TensorBoard's event file is theirs already."""
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("events.out.tfevents"))
    log_files(trainer, files)
    if checkpoint is not None:
        log_files(trainer, [checkpoint], "checkpoints")


def _build(folder: Path, fit: L.Trainer | None = None) -> tuple[Path, dict[str, Any]] | None:
    # The run itself is over and saved: a page that cannot be built must not fail it.
    try:
        return build_report(folder, fit)
    except Exception as err:  # whatever a damaged run folder raises
        rank_zero_warn(
            printable(f"report.html not written in {folder}: {type(err).__name__}: {err}")
        )
        return None
