"""Turn the tutorial's saved ``state_dict`` (``alexnet.pt``) into a LitAlexNet checkpoint.
``scripts/import_tutorial_weights.py`` is its command line.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import lightning

from alexnet_lit.checkpoints import AtomicCheckpointIO, load_checkpoint
from alexnet_lit.errors import CheckpointError, InferenceError, first_line, run_main
from alexnet_lit.model import convert_tutorial_state_dict
from alexnet_lit.module import LitAlexNet
from alexnet_lit.preprocessing import IMAGE_SIZE, MEAN, STD, preprocessing_record
from alexnet_lit.runs import check_writable


def tutorial_checkpoint(weights_path: str | Path, class_names: Sequence[str]) -> dict:
    """Build a Lightning checkpoint dict from the tutorial's ``alexnet.pt``.

    The checkpoint records the tutorial's preprocessing (224 px, mean and std 0.5) and holds what
    ``LitAlexNet.load_from_checkpoint`` and ``trainer.validate(ckpt_path=...)`` read: the
    module's ``state_dict``, ``hyper_parameters`` and ``pytorch-lightning_version``.

    Args:
        weights_path: The file the tutorial's ``torch.save(model.state_dict(), 'alexnet.pt')``
            wrote.
        class_names: One name per output of the last layer, in the tutorial's ImageFolder order
            (sorted folder names).

    Raises:
        CheckpointError: The file is unsafe or not the tutorial's.
        InferenceError: The class count is wrong.
    """
    state_dict = load_checkpoint(weights_path)
    if not isinstance(state_dict, dict):
        raise CheckpointError(
            f"'{weights_path}' holds no state_dict; pass the tutorial's alexnet.pt."
        )
    try:
        converted = convert_tutorial_state_dict(state_dict)
    except KeyError as err:
        raise CheckpointError(f"'{weights_path}': {err.args[0]}") from err
    num_classes = converted["classifier.6.weight"].shape[0]
    in_channels = converted["features.0.weight"].shape[1]
    hidden_features = converted["classifier.0.weight"].shape[0]  # 4096 in the tutorial
    if len(class_names) != num_classes:
        raise InferenceError(
            f"'{weights_path}' has {num_classes} outputs but {len(class_names)} class names were "
            f"given ({', '.join(class_names)}); pass exactly {num_classes}, in the order of the "
            "tutorial's sorted class folders."
        )
    model = LitAlexNet(
        num_classes=num_classes,
        class_names=list(class_names),
        in_channels=in_channels,
        hidden_features=hidden_features,
        preprocessing=preprocessing_record(IMAGE_SIZE, in_channels, MEAN, STD),
    )
    try:
        model.model.load_tutorial_state_dict(state_dict)
    except ValueError as err:  # a tensor of another shape than this AlexNet's
        raise CheckpointError(f"'{weights_path}': {first_line(err)}") from err
    return {
        "state_dict": {key: tensor.clone() for key, tensor in model.state_dict().items()},
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }


def import_tutorial_weights(
    weights_path: str | Path, class_names: Sequence[str], out: str | Path
) -> Path:
    """Convert ``weights_path`` and save the checkpoint to ``out`` (parents created)."""
    check_writable(out, "--out")
    checkpoint = tutorial_checkpoint(weights_path, class_names)
    AtomicCheckpointIO().save_checkpoint(checkpoint, out)
    return Path(out)


def import_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/import_tutorial_weights.py``: exit code 0, or 2 with one line for a mistake."""
    parser = argparse.ArgumentParser(
        description="Convert the tutorial's alexnet.pt (a state_dict) into a checkpoint this "
        "project can use."
    )
    parser.add_argument("weights", help="the state_dict file saved by the tutorial's script")
    parser.add_argument(
        "--classes", nargs="+", required=True,
        help="class names in the tutorial's order (its ImageFolder's sorted folder names)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="checkpoint file to write (.ckpt)")
    args = parser.parse_args(argv)

    def main() -> None:
        out = import_tutorial_weights(args.weights, args.classes, args.out)
        print(f"wrote {out} ({len(args.classes)} classes: {', '.join(args.classes)})")

    return run_main(main)
