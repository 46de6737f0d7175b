"""Image folders for training: the DataModule, and the scan, datasets, samplers and demo data it
is built from (one module each)."""

from alexnet_lit.data.datamodule import ImageFolderDataModule, default_num_workers
from alexnet_lit.errors import DataConfigError

__all__ = ["DataConfigError", "ImageFolderDataModule", "default_num_workers"]
