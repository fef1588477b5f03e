"""Image files from folders others made: listing that survives symlink loops and special files, and
reading that refuses decompression bombs and truncated files and keeps 16-bit images' levels.

Every failure to read is a :class:`~nvae.data.base.DataError` naming the file, which
``skip_unreadable`` skips like any other unreadable file.
"""
from __future__ import annotations

import os
import stat
import struct
import warnings
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from nvae.data.base import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

MAX_IMAGE_PIXELS = 2**27
"""Largest image (width x height, 134 million pixels) read; checked on the header, before decoding.

The paper's largest images are 1024 x 1024 (CelebA-HQ, FFHQ): this is 128 times that, and a
100-megapixel camera's 11648 x 8736 photos fit. Decoded as RGB it is 400 MB held by one loader
worker before the resize, which a training machine can afford per worker; a larger header is a
decompression bomb or no picture of a data set. PIL refuses images from 2 x 89.5 million pixels
itself (``Image.MAX_IMAGE_PIXELS``), but that is a process-wide setting any library may lift
(``= None``): this bound does not depend on it."""

SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
"""PIL modes of 16-bit gray PNGs ('I;16*', or 'I' in older Pillow versions). PNG, the only format
among :data:`IMAGE_EXTENSIONS` PIL reads into them, has at most 16 bits per sample, so their
levels are read as k / 65535. 16-bit RGB(A) PNGs PIL reads as 8-bit 'RGB'/'RGBA' itself."""

READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
"""What PIL raises on a file it cannot decode (its UnidentifiedImageError and 'image file is
truncated' are OSErrors; a header over PIL's own pixel limit is a DecompressionBombError)."""


# ------------------------------------------------------------------------------------------ listing
def file_id(st: os.stat_result) -> tuple[int, int]:
    """The identity of a file or folder: the same for every path (symlink, hard link) to it."""
    return st.st_dev, st.st_ino


def walk_dirs(folder: str) -> Iterator[tuple[str, list[os.DirEntry]]]:
    """(path, entries sorted by name) of ``folder`` and every folder under it, symlinks followed.

    Each folder is visited once, by the first path to it in sorted depth-first order: a symlink
    back to a folder already visited (a loop such as ``root/sub/loop -> root``) is not entered
    again. Unreadable folders are left out, as :func:`os.walk` does.
    """
    visited: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        path = stack.pop()
        try:
            key = file_id(os.stat(path))
            if key in visited:
                continue
            visited.add(key)
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        yield path, entries
        stack += reversed([e.path for e in entries if is_dir(e)])  # popped in sorted order


def is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder, following symlinks (False for a broken link)."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def list_images(folder: str) -> list[str]:
    """Every image file under ``folder`` (recursive, symlinks followed, case-insensitive
    extensions), sorted, each file once.

    A file reached by several paths (symlinks, hard links) is listed once, under the first of its
    paths in sorted order: a held-out split never holds a copy of a training image. Names with an
    image extension that are no regular file (a named pipe, which would block the reader forever; a
    device; a socket) are left out with a warning. A broken symlink stays listed: reading it names it.
    """
    candidates: list[tuple[str, tuple]] = []  # (path, identity)
    special: list[str] = []
    for _, entries in walk_dirs(folder):
        for entry in entries:
            if not entry.name.lower().endswith(IMAGE_EXTENSIONS) or is_dir(entry):
                continue
            try:
                st = os.stat(entry.path)  # follows symlinks; does not open the file
            except OSError:
                candidates.append((entry.path, ("path", entry.path)))
                continue
            if stat.S_ISREG(st.st_mode):
                candidates.append((entry.path, file_id(st)))
            else:
                special.append(entry.path)
    if special:
        warnings.warn(f"{len(special)} name(s) with an image extension under '{folder}' are no regular file "
                      f"(named pipe, device or socket) and are left out (first: '{sorted(special)[0]}')", stacklevel=2)
    seen: set[tuple] = set()
    found = []
    for path, key in sorted(candidates):
        if key not in seen:
            seen.add(key)
            found.append(path)
    return found


# ------------------------------------------------------------------------------------------ reading
def read_image(path: str, mode: Optional[str]) -> Image.Image:
    """The image at ``path`` decoded and converted to ``mode`` ('RGB' or 'L'), 8 bits per channel (with
    ``mode`` None: as decoded, its own mode and bit depth).

    Raises :class:`DataError` naming the file when it cannot be decoded, is truncated, or its header
    claims more than :data:`MAX_IMAGE_PIXELS` pixels (checked before decoding: ``Image.open`` only
    reads the header).
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # opening a named pipe would block forever
            raise DataError("not a regular file (a named pipe, device or socket?)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below instead
            img = Image.open(path)
        with img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DataError(f"its header claims {width} x {height} pixels ({width * height:,}), more than the "
                                f"{MAX_IMAGE_PIXELS:,} an image may have here (a decompression bomb?)")
            img.load()  # decodes here, inside the try: a truncated file is an OSError (LOAD_TRUNCATED_IMAGES off)
            return img.copy() if mode is None else to_8_bit(img).convert(mode)
    except (DataError, *READ_ERRORS) as err:
        raise DataError(f"cannot read image '{path}': {err}") from None


def to_8_bit(img: Image.Image) -> Image.Image:
    """16-bit gray images onto the 8-bit grid by their bit depth, k -> round(k * 255 / 65535);
    other images as they are. (PIL's own ``convert('L')`` clips 16-bit levels at 255: white.)"""
    if img.mode not in SIXTEEN_BIT_MODES:
        return img
    levels = np.asarray(img).astype(np.int32).clip(0, 65535)  # 'I' is int32; 'I;16B' big-endian uint16
    return Image.fromarray(((levels + 128) // 257).astype(np.uint8))  # 65535 = 255 * 257: rounds to nearest
