"""Train the tutorial's AlexNet on any ImageFolder with PyTorch Lightning.

This facade sits above every part: it re-exports the three names a notebook starts from.
"""

from alexnet_lit.data import ImageFolderDataModule
from alexnet_lit.model import AlexNet
from alexnet_lit.module import LitAlexNet

__all__ = ["AlexNet", "ImageFolderDataModule", "LitAlexNet"]
