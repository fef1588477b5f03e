"""Shared pieces of every data module: quantization, binarization, padding, loaders (paper sec. 4).

A batch is always a float tensor ``x`` of shape (B, C, H, W) with values on the n-bit grid
``k / (2^b - 1)``, k = 0..2^b - 1; labels are dropped. The model maps it to [-1, 1] itself.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms.functional import pil_to_tensor

from nvae.compat import completed_batches
from nvae.spec import ImageSpec

Transform = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------
def quantize(x: Tensor, num_bits: int) -> Tensor:
    """Reduce 8-bit data to ``num_bits`` bits: ``floor(x * 255 / 2^(8-b)) / (2^b - 1)``.

    ``x`` is uint8 (0..255) or float in [0, 1] on the 8-bit grid (it is rounded to the nearest
    8-bit level first, so ``k / 255`` is read as ``k`` despite float error). Returns float32 in
    [0, 1] with exactly ``2^b`` possible values. No dequantization noise (NVAE appendix: 5-bit
    CelebA-HQ / FFHQ, as in Glow).
    """
    if not 1 <= num_bits <= 8:
        raise ValueError(f"num_bits must be in 1..8, got {num_bits}")
    if x.dtype == torch.uint8:
        levels = x.to(torch.int64)
    else:
        levels = (x.to(torch.float32) * 255.0).round().clamp_(0, 255).to(torch.int64)
    levels = levels >> (8 - num_bits)  # floor(k / 2^(8-b))
    return levels.to(torch.float32) / float(2**num_bits - 1)


class ToGrid:
    """PIL image or uint8 (C, H, W) tensor -> float (C, H, W) on the ``num_bits`` grid."""

    def __init__(self, num_bits: int = 8) -> None:
        self.num_bits = num_bits

    def __call__(self, img: Image.Image | Tensor) -> Tensor:
        x = pil_to_tensor(img) if isinstance(img, Image.Image) else img
        return quantize(x, self.num_bits)

    def __repr__(self) -> str:
        return f"ToGrid(num_bits={self.num_bits})"


class DynamicBinarize:
    """Bernoulli sample of the intensity, drawn afresh every time an item is read.

    NVAE sec. 5 / appendix (binarized MNIST): dynamic binarization on train *and* test data.
    Input: uint8 or float in [0, 1]; output: float {0, 1} of the same shape.
    """

    def __call__(self, x: Tensor) -> Tensor:
        p = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        return torch.bernoulli(p.clamp(0.0, 1.0))

    def __repr__(self) -> str:
        return "DynamicBinarize()"


class Pad:
    """Zero border of ``pad`` pixels per side on a (..., H, W) tensor (MNIST 28x28 -> 32x32)."""

    def __init__(self, pad: int = 2, value: float = 0.0) -> None:
        self.pad, self.value = pad, value

    def __call__(self, x: Tensor) -> Tensor:
        p = self.pad
        return F.pad(x, (p, p, p, p), value=self.value) if p else x

    def __repr__(self) -> str:
        return f"Pad({self.pad})"


class CenterSquare:
    """Center crop a PIL image to the largest square it contains."""

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return img.crop((left, top, left + s, top + s))

    def __repr__(self) -> str:
        return "CenterSquare()"


class DataError(RuntimeError):
    """A data item that cannot be used (unreadable file, ...): the message names it."""


def missing_data_error(what: str, root: str, hint: str) -> FileNotFoundError:
    """The one-line error for absent data: names the path and how to get the data."""
    path = os.path.abspath(os.path.expanduser(root)) if root else "<empty data.root>"
    return FileNotFoundError(f"{what} not found under '{path}': {hint}")


# ----------------------------------------------------------------------------------------------
# Dataset wrappers (labels dropped)
# ----------------------------------------------------------------------------------------------
class TensorImages(Dataset):
    """Images held in one uint8 tensor (N, C, H, W); ``transform`` runs at every read."""

    def __init__(self, images: Tensor, transform: Optional[Transform] = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        x = self.images[index]
        return self.transform(x) if self.transform is not None else quantize(x, 8)


class ImagesOnly(Dataset):
    """Wrap a dataset of (image, label, ...) tuples and keep only the image."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tensor:
        item = self.dataset[index]
        return item[0] if isinstance(item, (tuple, list)) else item


def random_hflip(x: Tensor) -> Tensor:
    """Horizontal flip of a (C, H, W) tensor with probability 1/2."""
    return x.flip(-1) if torch.rand(()) < 0.5 else x


# ----------------------------------------------------------------------------------------------
# Base data module
# ----------------------------------------------------------------------------------------------
class ImageDataModule(L.LightningDataModule):
    """Base class: loaders and the :class:`ImageSpec` the command line links into the model.

    Subclasses implement :attr:`image_spec` (usable right after ``__init__``) and
    :meth:`build_datasets`, called once by :meth:`setup`, returning (train, val or None, test).
    Without a validation split, validation runs on the test split.
    """

    def __init__(
        self,
        root: str,
        batch_size: int,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        """
        Args:
            root: Folder holding the data set files.
            batch_size: Training batch size (per device).
            num_workers: DataLoader worker processes (0 loads in the main process).
            eval_batch_size: Batch size for validation/test; defaults to ``batch_size``.
        """
        super().__init__()
        self.save_hyperparameters()  # with the subclass's arguments: checkpoints can rebuild the data
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str, *args: object, **kwargs: object) -> "ImageDataModule":
        """Refused: Lightning's version would import what the file names. A checkpoint's data module is
        rebuilt safely by :func:`nvae.checkpoint.load_datamodule`."""
        raise TypeError(f"{cls.__name__}.load_from_checkpoint is not supported: use "
                        f"nvae.checkpoint.load_datamodule({str(checkpoint_path)!r}) (it reads the file safely)")

    # -- to implement ---------------------------------------------------------------------------
    @property
    def image_spec(self) -> ImageSpec:
        """Shape and bit depth of the batches; known before :meth:`setup`."""
        raise NotImplementedError

    def build_datasets(self) -> tuple[Dataset, Optional[Dataset], Dataset]:
        """Return (train, validation or None, test) datasets yielding (C, H, W) float tensors."""
        raise NotImplementedError

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        """Build the datasets once (idempotent over fit/validate/test stages); for ``fit``, check that
        training would take a step and has held-out images to report on."""
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_datasets()
        if stage == "fit":
            self.check_fit_sizes()

    def check_fit_sizes(self) -> None:
        """ValueError (one line, naming the numbers and the field) when an epoch would have no
        training batch, or the held-out split is empty: such a run would train nothing and report
        an untrained model's NELBO, or report nothing.

        Each of ``world`` processes gets ``n // world`` training images (:class:`ResumableSampler`
        drops the remainder) and the train loader drops its last incomplete batch, so a process
        needs at least ``batch_size`` of them. Data sets without a length are not checked.
        """
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        n = sized(self.train_set)
        if n is not None and n // world < self.batch_size:
            shared = f" shared by {world} processes ({n // world} each)" if world > 1 else ""
            raise ValueError(f"data.batch_size {self.batch_size} is larger than the {n} training images{shared}: "
                             "lower data.batch_size or add images (an incomplete batch is dropped, so training "
                             "would take no step)")
        for split, dataset in (("validation", self.val_set), ("test", self.test_set)):
            if sized(dataset) == 0:
                raise ValueError(f"the held-out ({split}) split of {type(self).__name__} under data.root '{self.root}' "
                                 "has no images: add held-out images")

    def _train_sampler(self, dataset: Dataset) -> "ResumableSampler":
        """Seeded, sharded shuffle that starts where a resumed run's epoch stopped."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ResumableSampler(dataset, world, rank, seed=shuffle_seed())
        if trainer is not None:
            done = completed_batches(trainer)  # restored from a checkpoint
            if done > 0:
                sampler.resume_at(trainer.current_epoch, done * self.batch_size)
        return sampler

    def _loader(self, dataset: Optional[Dataset], train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for loaders")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self._train_sampler(dataset) if train else None,
            drop_last=train,
            generator=torch.Generator().manual_seed(shuffle_seed()),  # worker seeds leave the global RNG alone
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last incomplete batch is dropped."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation split if the data set has one, else the test split."""
        return self._loader(self.val_set if self.val_set is not None else self.test_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """The held-out test split, in order."""
        return self._loader(self.test_set, train=False)


def sized(dataset: Optional[Dataset]) -> Optional[int]:
    """``len(dataset)``, or None for a data set without a length (an iterable one) or none at all."""
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def seeded_permutation(n: int, seed: int) -> np.ndarray:
    """A fixed permutation of ``range(n)`` (independent of the global RNG)."""
    return np.random.default_rng(seed).permutation(n)


def shuffle_seed() -> int:
    """The run's seed (``seed_everything``, shared by all processes) or 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class ResumableSampler(DistributedSampler):
    """Shuffles with (seed, epoch), gives each process its share, and can start mid-epoch.

    A :class:`DistributedSampler`, so Lightning uses it as it is on any number of processes.
    ``resume_at(epoch, n)`` drops the first ``n`` indices of that epoch's share: a run resumed
    from a mid-epoch checkpoint sees exactly the batches the interrupted run had not seen yet.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._resume: tuple[int, int] = (-1, 0)

    def resume_at(self, epoch: int, consumed: int) -> None:
        self._resume = (epoch, consumed)

    def __iter__(self):  # noqa: ANN204 - Iterator[int]
        indices = list(super().__iter__())
        epoch, consumed = self._resume
        return iter(indices[consumed:] if epoch == self.epoch else indices)
