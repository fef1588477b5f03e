"""What ``nvae-restore`` reads and checks before any work: the clean or observed images, the
mask, the operator, and the output folder. Every problem is a ValueError of one line naming the file
or option."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from nvae.cli.outputs import NVAE_TEMP, OutputError, check_folder, stale_files
from nvae.data.base import DataError, quantize
from nvae.data.files import read_image
from nvae.metrics.images import load_images
from nvae.model import NVAE
from nvae.restore.operators import Mask, Operator, parse_operator
from nvae.restore.run import DATA_STREAM, stream_seed

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
            torch.manual_seed(stream_seed(self.seed, DATA_STREAM, i))
            item = self.dataset[i]
        x = item[0] if isinstance(item, (list, tuple)) else item
        return x[..., self.pad:-self.pad, self.pad:-self.pad] if self.pad else x

    def __getitem__(self, index: list[int] | slice) -> Tensor:
        indices = range(self.shape[0])[index] if isinstance(index, slice) else index
        return torch.stack([self._one(i) for i in indices])


def read_mask(path: str, shape: tuple[int, ...]) -> Mask:
    """A mask image of the images' height and width: a pixel whose every channel is 0 is missing, any
    other observed, read at its own bit depth (a 16-bit 0/1 mask, a dark red pixel count as observed)."""
    try:
        img = read_image(path, None)
    except DataError as err:
        raise ValueError(f"--mask: {err}") from None
    if img.mode == "P":  # palette indices: their colours decide
        img = img.convert("RGBA")
    levels = np.asarray(img)
    if levels.ndim == 3 and img.mode in ("RGBA", "LA", "PA"):
        levels = levels[..., :-1]  # the alpha channel says nothing about being observed
    observed = (levels != 0).any(axis=-1) if levels.ndim == 3 else levels != 0
    if observed.shape != tuple(shape[1:]):
        raise ValueError(f"--mask '{path}' is {observed.shape[0]}x{observed.shape[1]}, the images "
                         f"{shape[1]}x{shape[2]}")
    if observed.all() or not observed.any():
        what = "no missing pixel" if observed.all() else "no observed pixel"
        raise ValueError(f"--mask '{path}' has {what} (0 is missing, anything else observed)")
    return Mask(torch.from_numpy(observed).unsqueeze(0))


def operator(args: argparse.Namespace, shape: tuple[int, ...]) -> Operator:
    """``--mask`` when given, else ``--operator`` (inpaint-box by default; a random mask is one for all the
    images, drawn from ``--seed``)."""
    if args.mask:
        if args.operator is not None:
            raise ValueError(f"--mask is the operator: leave out --operator {args.operator}")
        return read_mask(args.mask, shape)
    return parse_operator(args.operator or "inpaint-box", shape, torch.Generator().manual_seed(args.seed))


def observed_images(path: str, op: Operator, shape: tuple[int, ...], num: Optional[int]) -> Tensor:
    """Degraded images (N, C, h, w) as float in [0, 1], of the operator's output size."""
    want = op.out_shape((1, *shape))[1:]
    images = read_images(path, "--observed", want, num)
    if images.shape[0] == 0:
        raise ValueError(f"--observed '{path}': no images")
    return images.float() / 255.0


def check_output(folder: Path, overwrite: bool) -> list[Path]:
    """The output folder can be written: empty or new, or (``overwrite``) holding only an earlier run's
    files (grid.png, scores.csv, images/NNNNNN.png, temporary files of a killed run), which are returned
    for removal once replaced. A link where ``images`` should be is refused (files would land elsewhere)."""
    if folder.is_symlink() and not folder.exists():
        raise OutputError(f"--output '{folder}' is a link to a folder that does not exist")
    check_folder(folder)
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    if entries and not overwrite:
        raise OutputError(f"--output '{folder}' already holds {len(entries)} file(s) (an earlier run?); pass "
                          f"--overwrite to replace nvae-restore's files there, or choose another folder")
    images = folder / "images"
    foreign = [p.name for p in entries if not (
        (p.name in OUTPUT_FILES and p.is_file()) or (p == images and p.is_dir() and not p.is_symlink())
        or (NVAE_TEMP.fullmatch(p.name) and p.is_file() and not p.is_symlink()))]
    if foreign:
        raise OutputError(f"--output '{folder}' holds {', '.join(foreign[:3])}, not written by nvae-restore "
                          f"(links included); choose another folder")
    leftovers = [p for p in entries if NVAE_TEMP.fullmatch(p.name)]
    return leftovers + (stale_files(images, overwrite, "--output") if images.is_dir() else [])
