"""The two AlexNets, plain ``nn.Module``s of 5 conv layers and 3 fully connected layers: the
tutorial's (the default) and torchvision's (the one ImageNet weights exist for).
"""

from collections.abc import Mapping
from typing import Literal

import torch
import torchvision
from torch import nn

from alexnet_lit.errors import UserError

Arch = Literal["tutorial", "torchvision"]
ARCHS = ("tutorial", "torchvision")
# The width of both AlexNets' two hidden linear layers, and of ImageNet's weights.
ALEXNET_WIDTH = 4096

# Positions of the weighted layers in the tutorial's ``nn.Sequential``, mapped to ours. The
# tutorial's index 6 is a ReLU right after a max-pool: a no-op that we keep so shapes and outputs
# match layer for layer.
_TUTORIAL_TO_OURS = {
    "0": "features.0",
    "3": "features.3",
    "7": "features.7",
    "9": "features.9",
    "11": "features.11",
    "15": "classifier.0",
    "18": "classifier.3",
    "21": "classifier.6",
}


class AlexNet(nn.Module):
    """AlexNet exactly as the tutorial builds it (46,755,202 parameters for 2 classes).

    Unlike torchvision's AlexNet, the first convolution has 96 filters with padding 1 and the
    classifier reads a 5x5 map (6400 features), as in the tutorial's ``nn.Sequential``.

    Args:
        num_classes: Number of output logits.
        in_channels: Image channels, 3 for RGB or 1 for grayscale.
        dropout: Dropout probability before each of the first two linear layers.
        hidden_features: Width of the two hidden linear layers. The tutorial's 4096 holds 43M
            of the 47M parameters; narrower, checkpoints and Adam's state shrink with it (the
            tests use 64).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.5,
        hidden_features: int = ALEXNET_WIDTH,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise UserError(f"model.num_classes must be at least 1, got {num_classes}.")
        if hidden_features < 1:
            raise UserError(f"model.hidden_features must be at least 1, got {hidden_features}.")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=1),  # [96,54,54]
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # [96,26,26]
            nn.Conv2d(96, 256, kernel_size=5, padding=2),  # [256,26,26]
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # [256,12,12]
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),  # [384,12,12]
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),  # [384,12,12]
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # [256,12,12]
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # [256,5,5]
        )
        # An identity for 224x224 inputs; lets other input sizes reach the classifier.
        self.avgpool = nn.AdaptiveAvgPool2d((5, 5))
        self.classifier = nn.Sequential(
            nn.Linear(256 * 5 * 5, hidden_features),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden_features, hidden_features),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden_features, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)  # [256,5,5] -> 6400
        return self.classifier(x)

    def load_tutorial_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a ``state_dict`` saved by the tutorial's script (an ``nn.Sequential``).

        Args:
            state_dict: Keys ``0.weight``, ``0.bias``, ``3.*``, ``7.*``, ``9.*``, ``11.*``,
                ``15.*``, ``18.*`` and ``21.*``, as the tutorial's ``torch.save`` writes them.

        Raises:
            KeyError: The dict is not the tutorial's; the message names the missing and
                unexpected keys.
            ValueError: A tensor's shape does not match, e.g. a different number of classes.
        """
        converted = convert_tutorial_state_dict(state_dict)
        own = self.state_dict()
        for key, tensor in converted.items():
            if tensor.shape != own[key].shape:
                raise ValueError(
                    f"Tensor {key} has shape {list(tensor.shape)} but this AlexNet expects "
                    f"{list(own[key].shape)}; build it with the num_classes, in_channels and "
                    "hidden_features the weights were trained with."
                )
        self.load_state_dict(converted)


def build_alexnet(
    arch: Arch,
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.5,
    hidden_features: int = ALEXNET_WIDTH,
) -> nn.Module:
    """The ``arch`` AlexNet; both have ``features`` (the convolutions) and ``classifier``.

    ``torchvision`` is torchvision's ``AlexNet`` (64/192/384/256/256 channels, a 6x6 map, a
    9216-wide first linear layer; 57,012,034 parameters for 2 classes); a grayscale one gets a
    1-channel first convolution, and ``hidden_features`` other than 4096 its own classifier.
    """
    if arch == "tutorial":
        return AlexNet(
            num_classes, in_channels=in_channels, dropout=dropout, hidden_features=hidden_features
        )
    if arch != "torchvision":
        raise UserError(f"model.arch must be one of {', '.join(ARCHS)}, got {arch!r}.")
    if hidden_features < 1:
        raise UserError(f"model.hidden_features must be at least 1, got {hidden_features}.")
    model = torchvision.models.AlexNet(num_classes=num_classes, dropout=dropout)
    if in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)
    if hidden_features != ALEXNET_WIDTH:
        # torchvision's classifier: Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear.
        model.classifier[1] = nn.Linear(256 * 6 * 6, hidden_features)
        model.classifier[4] = nn.Linear(hidden_features, hidden_features)
        model.classifier[6] = nn.Linear(hidden_features, num_classes)
    return model


def convert_tutorial_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the tutorial's ``nn.Sequential`` keys (``0.weight``, ...) to :class:`AlexNet`'s.

    Raises:
        KeyError: Keys are missing or unexpected; both lists are named in the message.
    """
    expected = {f"{index}.{p}" for index in _TUTORIAL_TO_OURS for p in ("weight", "bias")}
    missing = sorted(expected - state_dict.keys(), key=_natural_key)
    unexpected = sorted(state_dict.keys() - expected, key=_natural_key)
    if missing or unexpected:
        raise KeyError(
            "This is not a state_dict saved by the tutorial's AlexNet: "
            f"missing keys {missing or 'none'}, unexpected keys {unexpected or 'none'}."
        )
    converted = {}
    for key, tensor in state_dict.items():
        index, param = key.split(".")
        converted[f"{_TUTORIAL_TO_OURS[index]}.{param}"] = tensor
    return converted


def _natural_key(key: str) -> tuple[int, str]:
    index, _, param = key.partition(".")
    return (int(index), param) if index.isdigit() else (-1, key)
