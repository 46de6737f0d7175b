"""The LightningCLI entry point behind ``scripts/train.py``."""

import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from alexnet_lit.data import DataConfigError, ImageFolderDataModule
from alexnet_lit.fault_tolerance import (
    AtomicCheckpointIO,
    CheckpointError,
    NonFiniteLossError,
    check_checkpoint_is_data,
    find_last_checkpoint,
)
from alexnet_lit.inference import PredictionCSVWriter, checkpoint_mismatch
from alexnet_lit.memory import KeepFreedMemory
from alexnet_lit.module import LitAlexNet

_VERSIONED_LOGGERS = ("TensorBoardLogger", "CSVLogger")


class AlexNetCLI(LightningCLI):
    """LightningCLI that takes the classes and preprocessing from the data, never from the user."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.in_channels", "model.in_channels")
        for attribute in ("num_classes", "class_names", "preprocessing", "class_weights"):
            parser.link_arguments(f"data.{attribute}", f"model.{attribute}", apply_on="instantiate")
        parser.add_argument(
            "--keep_freed_memory",
            type=bool,
            default=False,
            help="Let the C library keep freed memory for reuse while the trainer runs its "
            "steps (glibc only; configs/fast.yaml): faster CPU training steps.",
        )

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        if config is None or not config.get("ckpt_path"):
            return
        logger = config.trainer.logger
        versioned = getattr(logger, "class_path", "").rsplit(".", 1)[-1] in _VERSIONED_LOGGERS
        if versioned:
            log_root = Path(logger.init_args.save_dir, logger.init_args.name or "")
        else:
            log_root = Path(config.trainer.default_root_dir or ".", "lightning_logs")
        if config.ckpt_path == "last":
            config.ckpt_path = str(find_last_checkpoint(log_root))
        check_checkpoint_is_data(config.ckpt_path)
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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config.get("keep_freed_memory"):
            trainer.callbacks.append(KeepFreedMemory())
        # Write checkpoints atomically and load them as data only, unless a plugin chose otherwise.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_predict(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path:
            data = self.datamodule
            mismatch = checkpoint_mismatch(ckpt_path, data.class_names, data.preprocessing)
            if mismatch:
                raise DataConfigError(mismatch)
        # predict writes predictions.csv into the run directory unless a writer is configured.
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionCSVWriter())


def cli_main(args: list[str] | None = None) -> AlexNetCLI:
    """Run the CLI; a data or config mistake ends in one line on stderr and exit code 2."""
    try:
        return AlexNetCLI(
            LitAlexNet,
            ImageFolderDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            # The optimizer is the model's (model.optimizer in YAML): one way to set it, not two.
            auto_configure_optimizers=False,
            # Raise instead of printing the whole usage text, so the error is one line.
            parser_kwargs={"exit_on_error": False},
        )
    except (DataConfigError, CheckpointError) as err:
        _exit_with(str(err))
    except NonFiniteLossError as err:
        _exit_with(str(err), code=1)
    except ArgumentError as err:
        # jsonargparse puts the key on the first line and the reason on the second.
        message = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])
        message = message.rstrip(".")
        _exit_with(f"{message}; see 'python scripts/train.py SUBCOMMAND --help' for valid keys.")


def _exit_with(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
