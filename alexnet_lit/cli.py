"""The LightningCLI entry point behind ``scripts/train.py``."""

import pickle
import sys
from argparse import ArgumentError

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI

from alexnet_lit.data import DataConfigError, ImageFolderDataModule
from alexnet_lit.inference import PredictionCSVWriter, checkpoint_mismatch
from alexnet_lit.module import LitAlexNet


class AlexNetCLI(LightningCLI):
    """LightningCLI that takes the classes and preprocessing from the data, never from the user."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.in_channels", "model.in_channels")
        for attribute in ("num_classes", "class_names", "preprocessing"):
            parser.link_arguments(f"data.{attribute}", f"model.{attribute}", apply_on="instantiate")

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
    except DataConfigError as err:
        _exit_with(str(err))
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met code in --ckpt_path
        _exit_with(
            "--ckpt_path was refused: it holds Python objects that could run code when loaded "
            "(only tensors and plain data load); use a checkpoint from a source you trust."
        )
    except ArgumentError as err:
        message = str(err).strip().splitlines()[0].rstrip(".")
        _exit_with(f"{message}; see 'python scripts/train.py SUBCOMMAND --help' for valid keys.")


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
