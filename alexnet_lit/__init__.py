"""Train the tutorial's AlexNet on any ImageFolder with PyTorch Lightning.

This facade sits above every part: it re-exports the three names a notebook starts from. They
are imported on first use, so that a tool without torch (the data doctor) starts in a second.
"""

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "AlexNet": "alexnet_lit.model",
    "ImageFolderDataModule": "alexnet_lit.data.datamodule",
    "LitAlexNet": "alexnet_lit.module",
}
__all__ = ["AlexNet", "ImageFolderDataModule", "LitAlexNet"]

if TYPE_CHECKING:
    from alexnet_lit.data.datamodule import ImageFolderDataModule
    from alexnet_lit.model import AlexNet
    from alexnet_lit.module import LitAlexNet


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'alexnet_lit' has no attribute {name!r}")
