"""MNIST (60k/10k) through torchvision, dynamically binarized and padded to 32x32 (paper sec. 5).

torchvision reads ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` offline;
``download=True`` fetches them when the machine has internet.
"""
from __future__ import annotations

from typing import Optional

from torch.utils.data import Dataset

from nvae.data.base import ImageDataModule, TensorImages, missing_data_error
from nvae.data.bundled import mnist_transform
from nvae.spec import ImageSpec


class MNISTDataModule(ImageDataModule):
    """Binarized MNIST: 60k train, 10k test (also used for validation); spec (1, 32, 1 bit, pad 2)."""

    def __init__(
        self,
        root: str,
        batch_size: int = 200,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = None,
        download: bool = False,
        binarize: bool = True,
    ) -> None:
        """
        Args:
            root: Folder holding ``MNIST/raw/*-ubyte`` (torchvision's layout).
            batch_size: Training batch size (the paper's MNIST preset uses 200 per GPU).
            num_workers: DataLoader worker processes (0 loads in the main process).
            eval_batch_size: Batch size for validation/test; defaults to ``batch_size``.
            download: Download the files into ``root`` if absent (needs internet).
            binarize: Dynamic binarization (1 bit, Bernoulli likelihood); False gives 8-bit gray.
        """
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers, eval_batch_size=eval_batch_size)
        self.download, self.binarize = download, binarize

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(channels=1, size=32, num_bits=1 if self.binarize else 8, pad=2)

    def prepare_data(self) -> None:
        if self.download:
            self._load(train=True)
            self._load(train=False)

    def _load(self, train: bool) -> TensorImages:
        from torchvision.datasets import MNIST

        try:
            ds = MNIST(self.root, train=train, download=self.download)
        except RuntimeError:
            raise missing_data_error(
                "MNIST (MNIST/raw/*-ubyte)", self.root,
                "set data.root to the folder holding MNIST/raw, or data.download=true",
            ) from None
        # ds.data: uint8 (N, 28, 28), held in memory; labels dropped
        return TensorImages(ds.data.unsqueeze(1).contiguous(), mnist_transform(self.binarize))

    def build_datasets(self) -> tuple[Dataset, Optional[Dataset], Dataset]:
        return self._load(train=True), None, self._load(train=False)
