"""Where a fit starts (``model.weights``): random weights, ImageNet's, a ``.pth`` state dict or a
``.ckpt`` of this project, trained on the same classes or others.

Every file is read by the one safe loader (data only). Every tensor must fit the chosen
architecture except the classifier's last layer, which starts fresh when the class count
differs; RGB weights on grayscale data get their first filters summed over the colour channels.
"""

from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import AlexNet_Weights

from alexnet_lit.checkpoints import load_checkpoint
from alexnet_lit.errors import CheckpointError
from alexnet_lit.model import convert_tutorial_state_dict
from alexnet_lit.preprocessing import preprocessing_record

IMAGENET = "imagenet"
IMAGENET_WEIGHTS = AlexNet_Weights.IMAGENET1K_V1
HEAD = "classifier.6"  # the last layer of both AlexNets: one output per class
FIRST_CONV = "features.0.weight"
FETCH_COMMAND = (
    "python -c \"from torchvision.models import alexnet; alexnet(weights='IMAGENET1K_V1')\""
)


def imagenet_file() -> Path:
    """Where torchvision keeps the ImageNet AlexNet, and reads it from when present: the torch
    hub cache (``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints`` by default)."""
    name = Path(urlparse(IMAGENET_WEIGHTS.url).path).name
    return Path(torch.hub.get_dir(), "checkpoints", name)


def imagenet_preprocessing(in_channels: int = 3) -> dict[str, Any]:
    """The eval preprocessing ImageNet weights were trained with (``weights.transforms()``:
    resize 256, crop 224, ImageNet's mean and std); one channel gets the channels' mean."""
    transforms = IMAGENET_WEIGHTS.transforms()
    mean, std = list(transforms.mean), list(transforms.std)
    if in_channels == 1:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return preprocessing_record(transforms.crop_size[0], in_channels, mean, std)


def weights_path(weights: str) -> Path:
    """The file ``model.weights`` names; ``imagenet`` is fetched into the hub cache, hash-checked,
    as torchvision does, when it is not there yet.

    Raises:
        CheckpointError: The file does not exist, or ImageNet's cannot be fetched.
    """
    if weights == IMAGENET:
        path = imagenet_file()
        if not path.is_file():
            _fetch_imagenet(path)
        return path
    path = Path(weights).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"model.weights '{weights}' does not exist; pass imagenet, a .pth state dict or a "
            ".ckpt of this project."
        )
    return path


def _fetch_imagenet(path: Path) -> None:
    hash_prefix = path.stem.rsplit("-", 1)[-1]  # torchvision's file names end in their hash
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(IMAGENET_WEIGHTS.url, str(path), hash_prefix)
    except (URLError, OSError, RuntimeError) as err:
        raise CheckpointError(
            f"model.weights: imagenet needs {path.name} in {path.parent}, and it could not be "
            f"downloaded ({type(err).__name__}); on a machine that is online run "
            f"{FETCH_COMMAND} and copy {path.name} from its torch hub cache into {path.parent}."
        ) from err


def weights_preprocessing(weights: str | None, in_channels: int = 3) -> dict[str, Any] | None:
    """The preprocessing record the weights were trained with: ImageNet's, or the one a ``.ckpt``
    of this project carries; None for random weights and for a ``.pth`` (which records none).

    The file is found (ImageNet's fetched) here, so a missing one ends a fit before its run folder
    exists.
    """
    if not weights:
        return None
    path = weights_path(weights)
    if weights == IMAGENET:
        return imagenet_preprocessing(in_channels)
    checkpoint = load_checkpoint(path, mmap=True)
    if not isinstance(checkpoint, dict):
        return None  # not weights at all: read_state_dict says so in one line
    record = checkpoint.get("hyper_parameters", {}).get("preprocessing")
    if not isinstance(record, dict):
        return None
    if record.get("in_channels") != in_channels:  # RGB weights for grayscale data, or back
        mean, std = record["mean"], record["std"]
        if in_channels == 1:
            mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
        return preprocessing_record(record["image_size"], in_channels, mean * 3, std * 3)
    return dict(record)


def read_state_dict(weights: str, arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """``model.weights`` as a state dict in :func:`~alexnet_lit.model.build_alexnet`'s keys, and
    the words naming where it came from.

    Raises:
        CheckpointError: Missing, unsafe or unreadable file, or a ``.ckpt`` of the other
            architecture.
    """
    path = weights_path(weights)
    loaded = load_checkpoint(path)
    source = f"ImageNet ({path})" if weights == IMAGENET else str(path)
    if not isinstance(loaded, dict):
        raise CheckpointError(f"model.weights '{path}' holds no state dict; check the file.")
    if "state_dict" in loaded:  # a Lightning checkpoint of this project
        trained_arch = loaded.get("hyper_parameters", {}).get("arch", "tutorial")
        if trained_arch != arch:
            raise CheckpointError(
                f"model.weights '{path}' is a model.arch {trained_arch} checkpoint but "
                f"model.arch is {arch}; set model.arch: {trained_arch}."
            )
        state = loaded["state_dict"]  # LitAlexNet's: the network's tensors under "model."
        return {
            k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")
        }, source
    if arch == "tutorial":
        try:  # the tutorial's own alexnet.pt, keyed by its nn.Sequential's indices
            return convert_tutorial_state_dict(loaded), source
        except KeyError:
            pass
    return dict(loaded), source


def load_weights(model: nn.Module, weights: str, arch: str) -> str:
    """Load ``model.weights`` into ``model`` (a :func:`~alexnet_lit.model.build_alexnet`), every
    tensor but a head of another class count; returns the one line saying what was loaded.

    Raises:
        CheckpointError: The weights do not fit: the message names the first tensor that does
            not and both shapes (or the first one missing).
    """
    state, source = read_state_dict(weights, arch)
    own = model.state_dict()
    head = f"{HEAD}.weight"
    classes = (len(state[head]) if head in state else None, len(own[head]))  # there, here
    notes, fresh = [], []
    for key, tensor in own.items():
        if key not in state:
            raise CheckpointError(
                f"model.weights '{source}' has no tensor {key}, which model.arch {arch} needs; "
                "pass weights saved from the same architecture (or set model.arch to theirs)."
            )
        theirs = state[key]
        if theirs.shape == tensor.shape:
            continue
        if key.startswith(f"{HEAD}.") and theirs.shape[1:] == tensor.shape[1:]:
            fresh.append(key)
            state[key] = tensor  # this model's fresh initialisation
        elif key == FIRST_CONV and theirs.shape[1] == 3 and tensor.shape[1] == 1:
            state[key] = theirs.sum(dim=1, keepdim=True)  # as timm's adapt_input_conv
            notes.append(f"{key} summed over its 3 colour channels for grayscale input")
        elif key == FIRST_CONV and theirs.shape[1] == 1 and theirs.shape[0] == tensor.shape[0]:
            raise CheckpointError(
                f"model.weights '{source}' were trained on grayscale images (1 input channel) "
                f"but data.in_channels is {tensor.shape[1]}; set data.in_channels: 1."
            )
        elif key.startswith("classifier.") and theirs.shape[1:] == tensor.shape[1:]:
            # The first hidden layer is met first: its output count is their classifier's width.
            raise CheckpointError(
                f"model.weights '{source}' has a classifier {len(theirs)} wide but "
                f"model.hidden_features is {len(tensor)}; set model.hidden_features: {len(theirs)}."
            )
        else:
            raise CheckpointError(
                f"model.weights '{source}' does not fit model.arch {arch}: tensor {key} is "
                f"{list(theirs.shape)} there but {list(tensor.shape)} here; pass weights saved "
                "from the same architecture (or set model.arch to theirs)."
            )
    unexpected = sorted(state.keys() - own.keys())
    if unexpected:
        raise CheckpointError(
            f"model.weights '{source}' does not fit model.arch {arch}: it holds {unexpected[0]}, "
            "which this architecture has no place for; pass weights of the same architecture."
        )
    model.load_state_dict(state)
    loaded = len(own) - len(fresh)
    line = f"model.weights: loaded {loaded} of {len(own)} tensors from {source}"
    if fresh:
        line += f"; {HEAD} starts fresh ({classes[0]} classes there, {classes[1]} here)"
    for note in notes:
        line += f"; {note}"
    return line + "."
