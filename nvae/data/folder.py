"""Any folder of images, plus the paper's folder-distributed data sets (CelebA-HQ, FFHQ, ImageNet 32).

Layouts understood, checked in this order:
- ``root/<train dir>`` and ``root/<val or test dir>`` (e.g. ``train/`` + ``val/``): used as the splits;
- otherwise every image under ``root`` (recursively), split with a fixed seed by ``val_fraction``.
Images are center-cropped to a square, resized to ``image_size`` and reduced to ``num_bits``.
"""
from __future__ import annotations

import os
import warnings
from typing import ClassVar, Optional

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from nvae.data.base import (CenterSquare, DataError, ImageDataModule, TensorImages, ToGrid, missing_data_error,
                             random_hflip, seeded_permutation)
from nvae.data.files import IMAGE_EXTENSIONS, list_images, read_image
from nvae.data.lmdb import LMDBDataModule, has_official_lmdb
from nvae.spec import ImageSpec


class ImageFiles(Dataset):
    """Images read from a list of paths.

    An unreadable file raises an error naming it; with ``skip_unreadable`` it is reported once
    (warning), counted in :attr:`skipped` and replaced by the next readable file.
    """

    def __init__(self, files: list[str], transform: T.Compose, mode: str = "RGB", skip_unreadable: bool = False) -> None:
        self.files, self.transform, self.mode, self.skip_unreadable = files, transform, mode, skip_unreadable
        self.skipped: set[str] = set()  # per process (each loader worker keeps its own)

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, path: str) -> Image.Image:
        try:
            return read_image(path, self.mode)
        except DataError as err:
            if self.skip_unreadable:
                raise
            raise DataError(f"{err} (delete it, or set data.skip_unreadable=true to skip such files)") from None

    def __getitem__(self, index: int) -> torch.Tensor:
        for offset in range(len(self.files)):
            path = self.files[(index + offset) % len(self.files)]
            if path in self.skipped:
                continue
            try:
                return self.transform(self._read(path))
            except DataError as err:
                if not self.skip_unreadable:
                    raise
                self.skipped.add(path)
                warnings.warn(f"{err}; skipped ({len(self.skipped)} unreadable so far)", stacklevel=2)
        raise DataError(f"none of the {len(self.files)} images is readable (first: '{self.files[0]}')")


def folder_transform(image_size: int, num_bits: int, train: bool, random_flip: bool) -> T.Compose:
    """PIL -> float (C, size, size) on the ``num_bits`` grid: square crop, resize, optional flip."""
    steps: list = [CenterSquare(), T.Resize((image_size, image_size), antialias=True)]
    if train and random_flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, ToGrid(num_bits)])


class ImageFolderDataModule(ImageDataModule):
    """Images from a folder, spec (channels, image_size, num_bits); split dirs or a seeded split."""

    train_dirs: ClassVar[tuple[str, ...]] = ("train",)
    """Names tried, in order, for the training subfolder of ``root``."""
    eval_dirs: ClassVar[tuple[str, ...]] = ("val", "valid", "validation", "test")
    """Names tried, in order, for the held-out subfolder of ``root``."""

    def __init__(
        self,
        root: str,
        image_size: int,
        batch_size: int = 16,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = None,
        num_bits: int = 8,
        channels: int = 3,
        val_fraction: float = 0.05,
        random_flip: bool = True,
        seed: int = 0,
        skip_unreadable: bool = False,
    ) -> None:
        """
        Args:
            root: Folder of images (searched recursively), or holding train/ and val/ (or test/).
            image_size: Side of the square images after center crop and resize.
            batch_size: Training batch size (per device).
            num_workers: DataLoader worker processes (0 loads in the main process).
            eval_batch_size: Batch size for validation/test; defaults to ``batch_size``.
            num_bits: Bits per channel kept (8; the paper uses 5 for CelebA-HQ 256 and FFHQ 256).
            channels: 3 converts images to RGB, 1 to gray.
            val_fraction: Share of images held out when ``root`` has no split subfolders.
            random_flip: Random horizontal flips of training images.
            seed: Seed of the fixed shuffle behind the held-out split.
            skip_unreadable: Skip corrupt or unreadable image files with a warning (counted)
                instead of stopping with an error naming the file.
        """
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers, eval_batch_size=eval_batch_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.image_size, self.num_bits, self.channels = image_size, num_bits, channels
        self.val_fraction, self.random_flip, self.seed = val_fraction, random_flip, seed
        self.skip_unreadable = skip_unreadable

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(channels=self.channels, size=self.image_size, num_bits=self.num_bits, pad=0)

    def _subdir(self, names: tuple[str, ...]) -> Optional[str]:
        for name in names:
            path = os.path.join(self.root, name)
            if os.path.isdir(path):
                return path
        return None

    def _files(self, folder: str) -> list[str]:
        files = list_images(folder)
        if not files:
            raise missing_data_error(
                f"no images ({', '.join(IMAGE_EXTENSIONS)})", folder, "set data.root to a folder of images"
            )
        return files

    def split_files(self) -> tuple[list[str], list[str]]:
        """(train files, held-out files): split subfolders if present, else a seeded split."""
        if not self.root or not os.path.isdir(self.root):
            raise missing_data_error("image folder", self.root, "set data.root to a folder of images")
        train_dir, eval_dir = self._subdir(self.train_dirs), self._subdir(self.eval_dirs)
        if train_dir is not None and eval_dir is not None:
            return self._files(train_dir), self._files(eval_dir)
        files = self._files(train_dir or self.root)
        if len(files) < 2:
            raise ValueError(f"need at least 2 images under '{self.root}' to split, found {len(files)}")
        n_eval = min(max(1, round(len(files) * self.val_fraction)), len(files) - 1)
        perm = seeded_permutation(len(files), self.seed)
        return [files[i] for i in sorted(perm[n_eval:])], [files[i] for i in sorted(perm[:n_eval])]

    def build_datasets(self) -> tuple[Dataset, Optional[Dataset], Dataset]:
        train_files, eval_files = self.split_files()
        mode = "RGB" if self.channels == 3 else "L"
        size, bits = self.image_size, self.num_bits
        skip = self.skip_unreadable
        train = ImageFiles(train_files, folder_transform(size, bits, True, self.random_flip), mode, skip)
        test = ImageFiles(eval_files, folder_transform(size, bits, False, False), mode, skip)
        return train, None, test


class CelebAHQ256DataModule(ImageFolderDataModule):
    """CelebA-HQ at 256x256, 5 bits (paper sec. 5); 30k images, 10% held out unless split dirs."""

    def __init__(
        self,
        root: str,
        batch_size: int = 4,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = None,
        num_bits: int = 5,
        val_fraction: float = 0.1,
        random_flip: bool = True,
        seed: int = 0,
        skip_unreadable: bool = False,
    ) -> None:
        """
        Args:
            root: Folder of CelebA-HQ images (any resolution >= 256), or with train/ and val/.
            batch_size: Training batch size (the paper's preset uses 4 per GPU).
            num_workers: DataLoader worker processes (0 loads in the main process).
            eval_batch_size: Batch size for validation/test; defaults to ``batch_size``.
            num_bits: Bits per channel (the paper models 5-bit CelebA-HQ).
            val_fraction: Share held out when ``root`` has no split subfolders (27k/3k as in Glow).
            random_flip: Random horizontal flips of training images.
            seed: Seed of the fixed shuffle behind the held-out split.
            skip_unreadable: Skip corrupt or unreadable image files with a warning (counted).
        """
        super().__init__(root, 256, batch_size, num_workers, eval_batch_size, num_bits, 3, val_fraction, random_flip, seed,
                         skip_unreadable)


class FFHQ256DataModule(ImageFolderDataModule):
    """FFHQ at 256x256, 5 bits (paper sec. 5); 70k images, 10% held out unless split dirs."""

    def __init__(
        self,
        root: str,
        batch_size: int = 4,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = None,
        num_bits: int = 5,
        val_fraction: float = 0.1,
        random_flip: bool = True,
        seed: int = 0,
        skip_unreadable: bool = False,
    ) -> None:
        """
        Args:
            root: Folder of FFHQ images (e.g. images1024x1024/), or with train/ and val/.
            batch_size: Training batch size (the paper's preset uses 4 per GPU).
            num_workers: DataLoader worker processes (0 loads in the main process).
            eval_batch_size: Batch size for validation/test; defaults to ``batch_size``.
            num_bits: Bits per channel (the paper models 5-bit FFHQ).
            val_fraction: Share held out when ``root`` has no split subfolders (63k/7k).
            random_flip: Random horizontal flips of training images.
            seed: Seed of the fixed shuffle behind the held-out split.
            skip_unreadable: Skip corrupt or unreadable image files with a warning (counted).
        """
        super().__init__(root, 256, batch_size, num_workers, eval_batch_size, num_bits, 3, val_fraction, random_flip, seed,
                         skip_unreadable)


def load_npz_images(folder: str, size: int = 32) -> torch.Tensor:
    """Concatenate the ``data`` arrays (N, 3*size*size) uint8 of every .npz in ``folder``."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".npz"))
    if not files:
        raise missing_data_error("no .npz files", folder, "set data.root to the ImageNet 32x32 folder")
    arrays = [np.load(os.path.join(folder, f), allow_pickle=False)["data"] for f in files]
    data = np.concatenate(arrays).astype(np.uint8, copy=False)
    return torch.from_numpy(data).view(-1, 3, size, size)  # (N, 3*H*W) -> (N, C, H, W), planar RGB


class ImageNet32DataModule(ImageFolderDataModule):
    """Downsampled ImageNet 32x32, 8 bits (paper sec. 5).

    Two different data sets share the name. The paper's numbers are on **Oord et al.'s** version
    (2016; ``train_32x32/`` + ``valid_32x32/`` PNG folders, or the official code's ``imagenet-oord``
    LMDB: ``train.lmdb`` + ``validation.lmdb``). The ``Imagenet32_train_npz/`` +
    ``Imagenet32_val_npz/`` batches are **Chrabaszcz et al.'s** (2017; another downsampling, held in
    memory: ~3.9 GB for the training set): their numbers are not the paper's. Layouts are tried in
    that order; the run prints which one it read. The validation set is the test split.
    """

    train_dirs: ClassVar[tuple[str, ...]] = ("train_32x32", "train")
    eval_dirs: ClassVar[tuple[str, ...]] = ("valid_32x32", "valid", "val", "test")
    npz_dirs: ClassVar[tuple[str, str]] = ("Imagenet32_train_npz", "Imagenet32_val_npz")

    def __init__(
        self,
        root: str,
        batch_size: int = 24,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = None,
        val_fraction: float = 0.05,
        random_flip: bool = True,
        seed: int = 0,
        skip_unreadable: bool = False,
        num_bits: int = 8,
    ) -> None:
        """
        Args:
            root: Folder holding train_32x32/ + valid_32x32/ or Imagenet32_train_npz/ + Imagenet32_val_npz/.
            batch_size: Training batch size (the paper's preset uses 24 per GPU).
            num_workers: DataLoader worker processes (0 loads in the main process).
            eval_batch_size: Batch size for validation/test; defaults to ``batch_size``.
            val_fraction: Share held out if ``root`` is a plain folder of images without splits.
            random_flip: Random horizontal flips of training images.
            seed: Seed of the fixed shuffle behind the held-out split.
            skip_unreadable: Skip corrupt or unreadable image files with a warning (counted).
            num_bits: Bits per channel kept (8; the official code's ``--num_x_bits``).
        """
        super().__init__(root, 32, batch_size, num_workers, eval_batch_size, num_bits, 3, val_fraction, random_flip,
                         seed, skip_unreadable)

    def build_datasets(self) -> tuple[Dataset, Optional[Dataset], Dataset]:
        if has_official_lmdb(self.root):
            rank_zero_info(f"ImageNet 32: the official LMDB folders under {self.root} (Oord et al.'s version)")
            oord = LMDBDataModule(self.root, 32, num_bits=self.num_bits, random_flip=self.random_flip)
            return oord.build_datasets()
        train_npz, val_npz = (os.path.join(self.root, d) for d in self.npz_dirs)
        if not (os.path.isdir(train_npz) and os.path.isdir(val_npz)):
            return super().build_datasets()
        rank_zero_info(f"ImageNet 32: the Imagenet32_*_npz batches under {self.root} (Chrabaszcz et al.'s "
                       "version: not the data set of the paper's numbers)")
        flip = [random_hflip] if self.random_flip else []
        train = TensorImages(load_npz_images(train_npz), T.Compose([*flip, ToGrid(self.num_bits)]))
        test = TensorImages(load_npz_images(val_npz), ToGrid(self.num_bits))
        return train, None, test
