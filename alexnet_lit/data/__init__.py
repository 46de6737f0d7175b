"""Image folders for training: the DataModule, and the scan, datasets, samplers and demo data it
is built from (one module each).

The DataModule is imported on first use: the scan and the data doctor need no torch.
"""

import importlib
from typing import TYPE_CHECKING

from alexnet_lit.errors import DataConfigError

_EXPORTS = {
    "ImageFolderDataModule": "alexnet_lit.data.datamodule",
    "default_num_workers": "alexnet_lit.data.datamodule",
}
__all__ = ["DataConfigError", "ImageFolderDataModule", "default_num_workers"]

if TYPE_CHECKING:
    from alexnet_lit.data.datamodule import ImageFolderDataModule, default_num_workers


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'alexnet_lit.data' has no attribute {name!r}")
