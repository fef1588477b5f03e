"""What ``nvae-restore`` reads and checks before any work (issue 28): the clean or observed images, the
mask, the operator, and the output folder. Every problem is a ValueError of one line naming the file
or option."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from nvae.cli.outputs import OutputError, check_folder, stale_files
from nvae.data.base import DataError, quantize
from nvae.data.files import read_image
from nvae.metrics.images import load_images
from nvae.model import NVAE
from nvae.sampling import image_seed
from nvae.restore.operators import Mask, Operator, parse_operator

OUTPUT_FILES = ("grid.png", "scores.csv")


def image_shape(model: NVAE) -> tuple[int, int, int]:
    """(C, H, W) of the images the model restores: its size less the training padding."""
    inner = model.spec.size - 2 * model.spec.pad
    return model.spec.channels, inner, inner


def read_images(path: str, option: str, shape: tuple[int, ...], num: Optional[int]) -> Tensor:
    """uint8 (N, C, H, W) images from a folder or an .npz, the first ``num``; checked against ``shape``
    (channels, then height and width), one line naming the option and the file otherwise."""
    try:
        images = load_images(path)
    except (FileNotFoundError, ValueError, DataError) as err:
        raise ValueError(f"{option}: {err}") from None
    if num is not None:
        images = images[:num]
    if shape[0] == 1 and images.shape[1] == 3 and bool((images == images[:, :1]).all()):
        images = images[:, :1]  # gray stored as RGB (as torchvision's save_image writes gray images)
    channels = images.shape[1]
    if channels != shape[0]:
        raise ValueError(f"{option} '{path}': the images have {channels} channel(s), the model {shape[0]}")
    if tuple(images.shape[2:]) != tuple(shape[1:]):
        raise ValueError(f"{option} '{path}': the images are {images.shape[2]}x{images.shape[3]}, expected "
                         f"{shape[1]}x{shape[2]}")
    return images


def clean_images(path: str, option: str, model: NVAE, num: Optional[int]) -> Tensor:
    """Clean images (N, C, H, W) on the model's bit grid (as its training data), at the model's image size
    (no resizing: a restoration is judged against the image itself)."""
    images = read_images(path, option, image_shape(model), num)
    if images.shape[0] == 0:
        raise ValueError(f"{option} '{path}': no images")
    return quantize(images, model.spec.num_bits)


class SplitImages:
    """Clean images from a split of the checkpoint's recorded data module (an allowed class, nothing
    downloaded), read when indexed, as the model sees them without the padding: (N, C, H, W) floats on
    the bit grid. A random transform (dynamic binarization) draws image i's randomness from a generator
    seeded by i, so every process and every run sees the same images."""

    def __init__(self, data: Optional[dict], split: str, model: NVAE, num: Optional[int], seed: int) -> None:
        from nvae.checkpoint import build_datamodule

        try:
            dm = build_datamodule(data, num_workers=0)
            dm.setup("fit" if split == "train" else "test")
        except (FileNotFoundError, DataError) as err:
            raise ValueError(f"--split {split}: {err}") from None
        self.dataset = {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}[split]
        if self.dataset is None or len(self.dataset) == 0:
            raise ValueError(f"--split {split}: the checkpoint's data module has no {split} images")
        n = len(self.dataset) if num is None else min(num, len(self.dataset))
        self.shape = (n, *image_shape(model))
        self.pad, self.seed = model.spec.pad, seed

    def _one(self, i: int) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(image_seed(self.seed, i))
            item = self.dataset[i]
        x = item[0] if isinstance(item, (list, tuple)) else item
        return x[..., self.pad:-self.pad, self.pad:-self.pad] if self.pad else x

    def __getitem__(self, index: list[int] | slice) -> Tensor:
        indices = range(self.shape[0])[index] if isinstance(index, slice) else index
        return torch.stack([self._one(i) for i in indices])


def read_mask(path: str, shape: tuple[int, ...]) -> Mask:
    """A mask image (any nonzero pixel is observed, 0 is missing) of the images' height and width."""
    try:
        mask = np.asarray(read_image(path, "L"))
    except DataError as err:
        raise ValueError(f"--mask: {err}") from None
    if mask.shape != tuple(shape[1:]):
        raise ValueError(f"--mask '{path}' is {mask.shape[0]}x{mask.shape[1]}, the images {shape[1]}x{shape[2]}")
    if mask.min() > 0:
        raise ValueError(f"--mask '{path}' has no missing pixel (0 is missing, anything else observed)")
    return Mask(torch.from_numpy(mask > 0).unsqueeze(0))


def operator(args: argparse.Namespace, shape: tuple[int, ...]) -> Operator:
    """``--mask`` when given, else ``--operator`` (a random mask drawn from ``--seed``)."""
    if args.mask:
        return read_mask(args.mask, shape)
    return parse_operator(args.operator, shape, torch.Generator().manual_seed(args.seed))


def observed_images(path: str, op: Operator, shape: tuple[int, ...], num: Optional[int]) -> Tensor:
    """Degraded images (N, C, h, w) as float in [0, 1], of the operator's output size."""
    want = op.out_shape((1, *shape))[1:]
    images = read_images(path, "--observed", want, num)
    if images.shape[0] == 0:
        raise ValueError(f"--observed '{path}': no images")
    return images.float() / 255.0


def temperature_schedule(text: str) -> tuple[float, float]:
    """argparse ``type`` of ``--temperature``: T or FIRST:LAST, each a finite number > 0."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be T or FIRST:LAST with numbers > 0, got {text!r}")
    return (values[0], values[-1])


def positive_float(text: str) -> float:
    """argparse ``type``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def check_output(folder: Path, overwrite: bool) -> list[Path]:
    """The output folder can be written: empty or new, or (``overwrite``) holding only an earlier run's
    files (grid.png, scores.csv, images/NNNNNN.png), which are returned for removal once replaced."""
    check_folder(folder)
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    if entries and not overwrite:
        raise OutputError(f"--output '{folder}' already holds {len(entries)} file(s) (an earlier run?); pass "
                          f"--overwrite to replace nvae-restore's files there, or choose another folder")
    foreign = [p.name for p in entries if not ((p.name in OUTPUT_FILES and p.is_file())
                                               or (p.name == "images" and p.is_dir()))]
    if foreign:
        raise OutputError(f"--output '{folder}' holds {', '.join(foreign[:3])}, not written by nvae-restore; "
                          f"choose another folder")
    return stale_files(folder / "images", overwrite, "--output") if (folder / "images").is_dir() else []
