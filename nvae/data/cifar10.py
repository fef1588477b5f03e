"""CIFAR-10 (50k/10k, RGB 32x32, 8 bits or fewer) through torchvision; random horizontal flips on train."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import Dataset
from torchvision.transforms import Compose

from nvae.data.base import ImageDataModule, TensorImages, ToGrid, missing_data_error, random_hflip
from nvae.spec import ImageSpec


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10, spec (3, 32, num_bits): train with flips, test (also used for validation)."""

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = None,
        download: bool = False,
        random_flip: bool = True,
        num_bits: int = 8,
    ) -> None:
        """
        Args:
            root: Folder holding ``cifar-10-batches-py`` (torchvision's layout).
            batch_size: Training batch size (the paper's CIFAR-10 preset uses 32 per GPU).
            num_workers: DataLoader worker processes (0 loads in the main process).
            eval_batch_size: Batch size for validation/test; defaults to ``batch_size``.
            download: Download the archive into ``root`` if absent (needs internet).
            random_flip: Random horizontal flips of training images.
            num_bits: Bits per channel kept (8; the official code's ``--num_x_bits``).
        """
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers, eval_batch_size=eval_batch_size)
        self.download, self.random_flip = download, random_flip
        self.num_bits = ImageSpec(channels=3, size=32, num_bits=num_bits).num_bits  # checked there

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(channels=3, size=32, num_bits=self.num_bits, pad=0)

    def prepare_data(self) -> None:
        if self.download:
            self._load(train=True)
            self._load(train=False)

    def _load(self, train: bool) -> TensorImages:
        from torchvision.datasets import CIFAR10

        try:
            ds = CIFAR10(self.root, train=train, download=self.download)
        except RuntimeError:
            raise missing_data_error(
                "CIFAR-10 (cifar-10-batches-py)", self.root,
                "set data.root to the folder holding cifar-10-batches-py, or data.download=true",
            ) from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
        grid = ToGrid(self.num_bits)
        steps = [random_hflip, grid] if (train and self.random_flip) else [grid]
        return TensorImages(images, Compose(steps))

    def build_datasets(self) -> tuple[Dataset, Optional[Dataset], Dataset]:
        return self._load(train=True), None, self._load(train=False)
