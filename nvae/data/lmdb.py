"""The official NVAE code's LMDB data folders, read as they are (paper sec. 5 data sets).

The official scripts write ``train.lmdb`` and ``validation.lmdb`` under the data folder: key
``str(index)``, value the image, either raw RGB bytes of a square image (``size * size * 3``, e.g.
ImageNet-32 of Oord et al., ``imagenet-oord``) or an encoded PNG / JPEG file (e.g. CelebA-HQ). Both
are recognized per value. Needs the ``lmdb`` package (``pip install "nvae[lmdb]"``).
"""
from __future__ import annotations

import io
import math
import os
from typing import Any, Callable, Literal, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from nvae.data.base import CenterSquare, DataError, ImageDataModule, ToGrid, missing_data_error
from nvae.data.celeba import CropBox
from nvae.spec import ImageSpec

SPLITS = ("train.lmdb", "validation.lmdb")  # the official names: training and held-out
ENCODED_MAGIC = (b"\x89PNG", b"\xff\xd8\xff")  # PNG, JPEG


def has_official_lmdb(root: str) -> bool:
    """Whether ``root`` holds the official ``train.lmdb`` and ``validation.lmdb``."""
    return bool(root) and all(os.path.isdir(os.path.join(root, name)) for name in SPLITS)


def decode_image(value: bytes, source: str) -> Image.Image:
    """An official LMDB value as an RGB PIL image: encoded PNG/JPEG, or raw square RGB bytes."""
    if value.startswith(ENCODED_MAGIC):
        try:
            with Image.open(io.BytesIO(value)) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as err:
            raise DataError(f"{source}: cannot decode the image ({err})") from None
    size = math.isqrt(len(value) // 3)
    if size == 0 or size * size * 3 != len(value):
        raise DataError(f"{source}: {len(value)} bytes are neither a PNG/JPEG file nor a square RGB image")
    return Image.fromarray(np.frombuffer(value, dtype=np.uint8).reshape(size, size, 3), mode="RGB")


# Open databases by (process, path): LMDB allows one environment per file and process, and one
# opened before a loader worker forks must not be used in the worker.
_OPEN: dict[tuple[int, str], Any] = {}


def open_readonly(path: str) -> Any:
    """The read-only LMDB environment of ``path`` for this process (opened once)."""
    key = (os.getpid(), os.path.abspath(path))
    if key not in _OPEN:
        try:
            import lmdb
        except ImportError:
            raise DataError("reading the official LMDB folders needs the lmdb package: "
                            'pip install "nvae[lmdb]"') from None
        try:
            _OPEN[key] = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as err:
            raise DataError(f"cannot open LMDB '{path}': {err}") from None
    return _OPEN[key]


class LMDBImages(Dataset):
    """The images of one official LMDB folder (each process opens the database itself)."""

    def __init__(self, path: str, transform: Callable[[Image.Image], Any]) -> None:
        self.path, self.transform = path, transform
        self.length = int(open_readonly(path).stat()["entries"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        with open_readonly(self.path).begin(write=False) as txn:
            value = txn.get(str(index).encode())
        if value is None:
            raise DataError(f"LMDB '{self.path}' has no key '{index}' (of {self.length} entries)")
        return self.transform(decode_image(bytes(value), f"LMDB '{self.path}' key '{index}'"))


def lmdb_transform(size: int, num_bits: int, train: bool, random_flip: bool, crop: str) -> T.Compose:
    """PIL -> float (3, size, size) on the ``num_bits`` grid: crop, resize, optional flip."""
    steps: list = [CropBox() if crop == "celeba64" else CenterSquare(), T.Resize((size, size), antialias=True)]
    if train and random_flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, ToGrid(num_bits)])


class LMDBDataModule(ImageDataModule):
    """The official code's ``train.lmdb`` / ``validation.lmdb`` under ``root``; the held-out split is
    ``validation.lmdb`` (what the official code evaluates on); spec (3, image_size, num_bits)."""

    def __init__(
        self,
        root: str,
        image_size: int,
        batch_size: int = 16,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = None,
        num_bits: int = 8,
        crop: Literal["square", "celeba64"] = "square",
        random_flip: bool = True,
    ) -> None:
        """
        Args:
            root: Folder holding ``train.lmdb`` and ``validation.lmdb`` (the official scripts' output).
            image_size: Height and width the images are resized to (e.g. 32, 64, 256).
            batch_size: Training batch size per process.
            num_workers: DataLoader worker processes (0 loads in the main process).
            eval_batch_size: Batch size for validation/test; defaults to ``batch_size``.
            num_bits: Bits per channel kept (the official ``--num_x_bits``).
            crop: 'square': the centred largest square; 'celeba64': the official CelebA-64 box
                (148x148 at (15, 40) of the aligned 178x218 image).
            random_flip: Random horizontal flips of training images.
        """
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers, eval_batch_size=eval_batch_size)
        if crop not in ("square", "celeba64"):
            raise ValueError(f"data.crop must be 'square' or 'celeba64', got {crop!r}")
        self.spec = ImageSpec(channels=3, size=image_size, num_bits=num_bits)  # checks them
        self.crop, self.random_flip = crop, random_flip

    @property
    def image_spec(self) -> ImageSpec:
        return self.spec

    def build_datasets(self) -> tuple[Dataset, Optional[Dataset], Dataset]:
        if not has_official_lmdb(self.root):
            raise missing_data_error("official LMDB folders (train.lmdb, validation.lmdb)", self.root,
                                     "set data.root to the folder the official scripts wrote")
        size, bits = self.spec.size, self.spec.num_bits
        train = LMDBImages(os.path.join(self.root, SPLITS[0]), lmdb_transform(size, bits, True, self.random_flip,
                                                                                self.crop))
        test = LMDBImages(os.path.join(self.root, SPLITS[1]), lmdb_transform(size, bits, False, False, self.crop))
        return train, None, test
