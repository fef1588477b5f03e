"""Images and arrays read from disk for FID: ``.npz`` files and folders of PNG/JPG images.

An ``.npz`` from elsewhere is a zip of ``.npy`` members, each a small header (dtype, shape) and then
the data, usually deflated: a 1 MB file can declare a 1 GB array, which ``np.load`` allocates before
it reads a byte. So each member's header is read first (:func:`npz_headers`, from the member's own
stream), the caller checks the shape, dtype and size it declares against what it expects and the
memory available (:func:`check_memory`), and only then is the data read (:func:`read_member`, never
unpickling). A folder of images is read file by file; a truncated PNG is refused by name.
"""
from __future__ import annotations

import math
import os
import stat
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
import torch
from torch import Tensor

from nvae import limits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every complete PNG
NPZ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)  # a damaged archive


class NpyHeader(NamedTuple):
    """What an ``.npy`` member of an ``.npz`` declares (read before its data)."""

    member: str  # the zip member's name
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """The bytes its data takes once read (what ``np.load`` allocates)."""
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        return f"{self.shape} {self.dtype}"


def npz_arrays(path: Union[str, Path]) -> list[str]:
    """The names of the arrays in an ``.npz`` (ValueError naming the file if it is not a readable one)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no file '{path}'")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"cannot read '{path}' as .npz: it is not a zip archive (an .npz is one)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.files)
    except (ValueError, *NPZ_ERRORS) as err:
        raise ValueError(f"cannot read '{path}' as .npz: {err}") from None


def npz_headers(path: Union[str, Path], keys: list[str]) -> dict[str, NpyHeader]:
    """The ``.npy`` header of each array ``keys`` names that the ``.npz`` holds (members resolved as
    ``np.load`` does: ``KEY``, else ``KEY.npy``), read from the member's stream: no data is read.
    ValueError naming the file and the array when a member is not an ``.npy`` array of numbers' layout."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            members = {name.removesuffix(".npy"): name for name in names}
            members.update({name: name for name in names})
            for key in keys:
                if key in members:
                    with zf.open(members[key]) as f:
                        headers[key] = _header(f, members[key], path, key)
    except NPZ_ERRORS as err:
        raise ValueError(f"cannot read '{path}' as .npz: {err}") from None
    return headers


def _header(f: zipfile.ZipExtFile, member: str, path: Union[str, Path], key: str) -> NpyHeader:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:  # 3.0: structured arrays with non-ASCII field names, never an array of numbers or strings
            raise ValueError(f"format version {version[0]}.{version[1]}")
    except (ValueError, EOFError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"'{path}': array {key!r} is not a readable .npy array ({reason})") from None
    if any(n < 0 for n in shape):
        raise ValueError(f"'{path}': array {key!r} declares the shape {shape}")
    return NpyHeader(member, tuple(int(n) for n in shape), dtype)


def read_member(path: Union[str, Path], header: NpyHeader) -> np.ndarray:
    """The array of a member :func:`npz_headers` described (and the caller checked); never unpickles."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(header.member) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, *NPZ_ERRORS) as err:
        raise ValueError(f"cannot read '{path}' as .npz: {err}") from None


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_memory(need: int, what: str) -> None:
    """ValueError when ``need`` bytes exceed the memory this machine has available (``what`` names them)."""
    free = limits.available_memory()
    if free is not None and need > free:
        raise ValueError(f"{what} need at least {_size(need)}, more than the {_size(free)} this machine has "
                         f"available; nothing was read")


def check_image_header(path: Union[str, Path], key: str, header: NpyHeader) -> None:
    """An array of images, uint8 (or float in [0, 1]) (N, C, H, W), (N, H, W, C) or (N, H, W) with 1 or 3
    channels, that fits the memory available with its uint8 (N, C, H, W) copy; ValueError otherwise."""
    shape, dtype = header.shape, header.dtype
    if len(shape) not in (3, 4):
        raise ValueError(f"{path}: expected images (N, H, W, C) or (N, C, H, W), got shape {shape}")
    if dtype != np.uint8 and dtype.kind != "f":
        raise ValueError(f"{path}: expected uint8 images (or float in [0, 1]), got {dtype}")
    if len(shape) == 4 and shape[1] not in (1, 3) and shape[-1] not in (1, 3):
        raise ValueError(f"{path}: cannot find a channel axis of size 1 or 3 in shape {shape}")
    copied = dtype != np.uint8 or (len(shape) == 4 and shape[1] not in (1, 3))  # converted or transposed
    check_memory(header.nbytes + (math.prod(shape) if copied else 0),
                 f"'{path}': images {key!r} {header.describe()}")


def read_image_file(f: Path) -> np.ndarray:
    """One image file as uint8 (H, W, C); ValueError naming it when truncated, unreadable or not a regular
    file (a named pipe would block forever). 16-bit gray is scaled to 8 bits (PIL's ``convert('L')`` would
    clip it to white); a PNG must also end with its IEND chunk (PIL decodes a PNG cut after its pixel data)."""
    from PIL import Image

    from nvae.data.files import to_8_bit

    try:
        if not stat.S_ISREG(os.stat(f).st_mode):
            raise OSError("not a regular file (a named pipe, device or socket?)")
        if f.suffix.lower() == ".png":
            with open(f, "rb") as fh:
                fh.seek(max(0, f.stat().st_size - len(PNG_END)))
                if fh.read() != PNG_END:
                    raise OSError("the file does not end with a PNG's IEND chunk")
        with Image.open(f) as img:
            img = to_8_bit(img)
            a = np.asarray(img.convert("L" if img.mode in ("1", "L", "I;16", "I", "F") else "RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image '{f}': {err} (truncated or not an image: delete or replace it)") from None
    return a[:, :, None] if a.ndim == 2 else a


def _array_to_nchw(a: np.ndarray, source: str) -> Tensor:
    if a.ndim == 3:
        a = a[:, None]  # (N, H, W) -> (N, 1, H, W)
    if a.ndim != 4:
        raise ValueError(f"{source}: expected images (N, H, W, C) or (N, C, H, W), got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"{source}: expected uint8 images (or finite floats in [0, 1]), got {a.dtype}")
        a = np.round(a * 255.0).astype(np.uint8)
    if a.shape[1] in (1, 3):
        return torch.from_numpy(np.ascontiguousarray(a))
    if a.shape[-1] in (1, 3):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
    raise ValueError(f"{source}: cannot find a channel axis of size 1 or 3 in shape {a.shape}")


def load_images(path: Union[str, Path]) -> Tensor:
    """Images as uint8 (N, C, H, W) from an ``.npz`` (key 'images', else its first array; NHWC or
    NCHW; its header checked before the data is read) or from a folder of PNG/JPG files (sorted by
    name, all the same size)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        names = npz_arrays(path)
        if not names:
            raise ValueError(f"{path}: no arrays in the file")
        key = "images" if "images" in names else names[0]
        header = npz_headers(path, [key])[key]
        check_image_header(path, key, header)
        return _array_to_nchw(read_member(path, header), str(path))
    if not path.is_dir():
        raise FileNotFoundError(f"no .npz file or image folder at '{path}'")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no PNG/JPG images in '{path}'")
    arrays: list[np.ndarray] = []
    for f in files:
        a = read_image_file(f)  # (H, W, C)
        if arrays and a.shape[:2] != arrays[0].shape[:2]:
            raise ValueError(f"image size mismatch: {f} is {a.shape[0]}x{a.shape[1]}, "
                             f"expected {arrays[0].shape[0]}x{arrays[0].shape[1]} (as {files[0].name})")
        arrays.append(a)
    if len({a.shape[2] for a in arrays}) > 1:  # mixed gray and colour: promote gray to RGB
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())  # (N, H, W, C) -> (N, C, H, W)
