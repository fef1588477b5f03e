"""CelebA 64x64 through torchvision (official train / valid / test partition), 8-bit RGB or fewer bits.

NVAE's CelebA-64 pipeline, as the official code runs it: crop the aligned 178x218 image to the
148x148 box (left 15, top 40, right 178-15, bottom 218-30), resize it to 64x64, random horizontal
flips on train. The official code evaluates on the 'valid' partition: so does the test split here
unless ``eval_split`` says 'test'.
"""
from __future__ import annotations

from typing import Literal, Optional

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from nvae.data.base import ImageDataModule, ImagesOnly, ToGrid, missing_data_error
from nvae.spec import ImageSpec

CROP_BOX = (15, 40, 178 - 15, 218 - 30)  # (left, top, right, bottom) in the aligned 178x218 image: 148x148


class CropBox:
    """Crop a PIL image to a fixed (left, top, right, bottom) box, as RGB."""

    def __init__(self, box: tuple[int, int, int, int] = CROP_BOX) -> None:
        self.box = box

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.convert("RGB").crop(self.box)

    def __repr__(self) -> str:
        return f"CropBox({self.box})"


def celeba64_transform(size: int, train: bool, random_flip: bool, num_bits: int = 8) -> T.Compose:
    """PIL -> float (3, size, size) on the ``num_bits`` grid: crop box, resize, optional flip."""
    steps: list = [CropBox(), T.Resize((size, size), antialias=True)]  # a square: no aspect change
    if train and random_flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, ToGrid(num_bits)])


class CelebA64DataModule(ImageDataModule):
    """CelebA at 64x64, spec (3, 64, num_bits); validated and tested on the official 'valid' split."""

    def __init__(
        self,
        root: str,
        batch_size: int = 16,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = None,
        download: bool = False,
        random_flip: bool = True,
        num_bits: int = 8,
        eval_split: Literal["valid", "test"] = "valid",
    ) -> None:
        """
        Args:
            root: Folder holding ``celeba/`` (img_align_celeba/ and the list_*.txt files).
            batch_size: Training batch size (the paper's CelebA-64 preset uses 16 per GPU).
            num_workers: DataLoader worker processes (0 loads in the main process).
            eval_batch_size: Batch size for validation/test; defaults to ``batch_size``.
            download: Download into ``root`` if absent (needs internet; Google Drive quotas apply).
            random_flip: Random horizontal flips of training images.
            num_bits: Bits per channel kept (8; the official code's ``--num_x_bits``).
            eval_split: The partition behind the test split (the held-out number after training,
                evaluate.py): 'valid', what the official code evaluates on, or 'test'.
        """
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers, eval_batch_size=eval_batch_size)
        self.download, self.random_flip = download, random_flip
        self.num_bits = ImageSpec(channels=3, size=64, num_bits=num_bits).num_bits  # checked there
        if eval_split not in ("valid", "test"):
            raise ValueError(f"data.eval_split must be 'valid' or 'test', got {eval_split!r}")
        self.eval_split = eval_split

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(channels=3, size=64, num_bits=self.num_bits, pad=0)

    def prepare_data(self) -> None:
        if self.download:
            self._load("train")

    def _load(self, split: str) -> ImagesOnly:
        from torchvision.datasets import CelebA

        transform = celeba64_transform(self.image_spec.size, split == "train", self.random_flip, self.num_bits)
        try:
            ds = CelebA(self.root, split=split, target_type=[], transform=transform, download=self.download)
        except RuntimeError:
            raise missing_data_error(
                "CelebA (celeba/img_align_celeba and list_*.txt)", self.root,
                "set data.root to the folder holding celeba/, or data.download=true",
            ) from None
        return ImagesOnly(ds)

    def build_datasets(self) -> tuple[Dataset, Optional[Dataset], Dataset]:
        valid = self._load("valid")
        return self._load("train"), valid, valid if self.eval_split == "valid" else self._load("test")
