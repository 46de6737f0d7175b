"""The LightningCLI entry point behind ``scripts/train.py``."""

import sys
from argparse import ArgumentError

from lightning.pytorch.cli import LightningCLI

from alexnet_lit.data import DataConfigError, ImageFolderDataModule
from alexnet_lit.module import LitAlexNet


class AlexNetCLI(LightningCLI):
    """LightningCLI that takes the classes and preprocessing from the data, never from the user."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.in_channels", "model.in_channels")
        for attribute in ("num_classes", "class_names", "preprocessing", "class_weights"):
            parser.link_arguments(f"data.{attribute}", f"model.{attribute}", apply_on="instantiate")


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
    except ArgumentError as err:
        message = str(err).strip().splitlines()[0].rstrip(".")
        _exit_with(f"{message}; see 'python scripts/train.py SUBCOMMAND --help' for valid keys.")


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
