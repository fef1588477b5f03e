"""LightningDataModules yielding float image batches (B, C, H, W) on the n-bit grid (paper sec. 4-5)."""
from nvae.data.base import DynamicBinarize, ImageDataModule, Pad, ToGrid, quantize
from nvae.data.bundled import BundledMNISTDataModule
from nvae.data.celeba import CelebA64DataModule
from nvae.data.cifar10 import CIFAR10DataModule
from nvae.data.folder import (
    CelebAHQ256DataModule,
    FFHQ256DataModule,
    ImageFolderDataModule,
    ImageNet32DataModule,
)
from nvae.data.lmdb import LMDBDataModule
from nvae.data.mnist import MNISTDataModule
from nvae.data.registry import register_datamodule

__all__ = [
    "BundledMNISTDataModule",
    "CIFAR10DataModule",
    "CelebA64DataModule",
    "CelebAHQ256DataModule",
    "DynamicBinarize",
    "FFHQ256DataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageNet32DataModule",
    "LMDBDataModule",
    "MNISTDataModule",
    "Pad",
    "ToGrid",
    "quantize",
    "register_datamodule",
]
