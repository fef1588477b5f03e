"""How the command lines write their outputs: complete or not at all, and checked before the work.

Every file (PNG, grid, .npz, CSV, .pt) is written to a fresh hidden temporary name in its own folder,
``.NAME.PID-RANDOM.tmp`` (created with O_EXCL: never a link someone placed there), and renamed to NAME
once complete: an interrupted or failed write (disk full, SIGINT) leaves nothing at NAME and removes
the temporary file. A NAME that is a device, named pipe or socket is refused, never replaced
(:func:`not_a_file`; a symlink is fine: the rename replaces the link, not what it points to). A
``.npz`` of images is streamed into its zip member batch by batch (:func:`npz_stream`), so its size is
not bounded by memory.
Output paths are checked before any work (:func:`check_file`, :func:`stale_files`); a folder of
PNGs from an earlier run is replaced only with ``--overwrite``, which removes nvae's own files there
and nothing else. :func:`json_line` writes the last line of every command: strict JSON (a
non-finite number becomes null, said on stderr). :func:`one_line_errors` turns what goes wrong here
into one line (``NVAE_DEBUG=1`` keeps the traceback).
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import stat
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

NVAE_PNG = re.compile(r"\d{6,}\.png")  # the images of sample.py --format pngs: 000000.png, 000001.png, ...
NVAE_TEMP = re.compile(r"\..+\.\d+(-[0-9a-f]+)?\.tmp")  # a temporary file of this module left by a killed run
SPECIAL_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                 (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))


class OutputError(Exception):
    """An output that cannot be written where asked; the message is one line naming the path."""


# ------------------------------------------------------------------------------------------ checks
def not_a_file(path: Path) -> Optional[str]:
    """What ``path`` is when it exists as a device, named pipe or socket itself (``os.lstat``: a symlink
    is not followed, and a rename replaces the link only), e.g. "a character device"; else None."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return next((kind for test, kind in SPECIAL_KINDS if test(mode)), None)


def check_not_special(path: Path, option: str = "--output", expected: str = "a file") -> None:
    """OutputError when ``path`` is a device, named pipe or socket: nvae never replaces one (a rename
    over /dev/null would replace the system's /dev/null)."""
    kind = not_a_file(path)
    if kind:
        prefix = f"{option} " if option else ""
        raise OutputError(f"{prefix}'{path}' is {kind}, not {expected}; nvae never replaces it")


def check_file(path: Path, option: str = "--output") -> None:
    """``path`` can become a file: it is not a folder, a device, a named pipe or a socket, and no folder
    above it is a file."""
    check_not_special(path, option)
    if path.is_dir():
        raise OutputError(f"{option} '{path}' is a folder; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{option} '{path}': '{parent}' is a file, not a folder")
            return


def check_folder(path: Path, option: str = "--output") -> None:
    """``path`` can become a folder: it is not a file (nor a device, pipe or socket), and no folder above
    it is a file."""
    check_not_special(path, option, "a folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} '{path}' is a file; a folder is to be written there")
    check_file(path / "x", option)  # the folders above


def stale_files(path: Path, overwrite: bool, option: str = "--output") -> list[Path]:
    """Check ``path`` as the folder of an image run; the files of an earlier run there, for the caller
    to remove once its new images come (``overwrite`` only).

    A folder holding anything is refused without ``overwrite``; with it, refused when it holds
    anything nvae did not write there (:data:`NVAE_PNG` images, :data:`NVAE_TEMP` leftovers):
    nothing else is ever deleted."""
    check_folder(path, option)
    entries = sorted(path.iterdir()) if path.is_dir() else []
    if entries and not overwrite:
        raise OutputError(f"{option} '{path}' already holds {len(entries)} file(s) (an earlier run?); "
                          f"pass --overwrite to replace nvae's images there, or choose another folder")
    foreign = [p.name for p in entries if not (p.is_file() and (NVAE_PNG.fullmatch(p.name)
                                                                or NVAE_TEMP.fullmatch(p.name)))]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OutputError(f"{option} '{path}' holds {len(foreign)} file(s) nvae did not write ({shown}); "
                          f"--overwrite removes only nvae's NNNNNN.png images: move the others or choose "
                          f"another folder")
    return entries


# ------------------------------------------------------------------------------------------ writing
def temporary_name(path: Path) -> Path:
    """A new empty file beside ``path`` (same folder: the rename is atomic) to write it under until
    complete: a fresh random name created with O_EXCL, so never a file or link that was already there."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask's permissions
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; renamed to ``path`` when the block ends
    normally (unless ``path`` has become a device, pipe or socket meanwhile: refused), removed when it
    does not. An OSError (disk full, permissions) becomes an OutputError."""
    tmp: Optional[Path] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
        yield tmp
        check_not_special(path, "")
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write '{path}': {err.strerror or err}; nothing was written there") from err
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def write_png(image: torch.Tensor, fp: Path) -> None:
    """A uint8 image (C, H, W) as a PNG file: gray (C = 1) as a gray PNG, colour as RGB."""
    from PIL import Image

    array = image.to(torch.uint8).cpu().permute(1, 2, 0).numpy()  # (H, W, C)
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(fp, format="png")


def save_png(image: torch.Tensor, path: Path) -> None:
    """A uint8 image (C, H, W) as one PNG at ``path``, written whole or not at all."""
    with atomic(path) as tmp:
        write_png(image, tmp)


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """Float [0, 1] images (N, C, H, W) as one PNG grid of ``nrow`` columns (grey padding)."""
    with atomic(path) as tmp:
        save_image(make_grid(images.float().cpu(), nrow=nrow, padding=2, pad_value=0.5), tmp, format="png")


def save_text(text: str, path: Path) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through an open file: the zip's record prefix is then "archive", not the random
    temporary name, so the same ``obj`` gives the same bytes."""
    with atomic(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


@contextmanager
def npz_stream(path: Path, shape: tuple[int, ...], name: str = "images") -> Iterator[Callable[[np.ndarray], None]]:
    """Yield ``write(batch)`` that appends uint8 rows to the array ``name`` of ``shape`` in a compressed
    ``.npz`` at ``path``: the .npy header, then each batch's bytes into the zip member, as
    ``np.savez_compressed`` lays it out (``np.load`` reads the same array). Complete or absent:
    fewer or more rows than ``shape[0]`` is an error and leaves no file."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    rows = [0]

    def write(batch: np.ndarray) -> None:
        if batch.dtype != np.uint8 or batch.shape[1:] != shape[1:] or rows[0] + batch.shape[0] > shape[0]:
            raise ValueError(f"batch {batch.dtype} {batch.shape} does not continue uint8 {shape} at row {rows[0]}")
        member.write(np.ascontiguousarray(batch).tobytes())
        rows[0] += batch.shape[0]

    with atomic(path) as tmp, open(tmp, "wb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                yield write
        if rows[0] != shape[0]:
            raise OutputError(f"'{path}': {rows[0]} of {shape[0]} images were made; nothing was written there")


# ------------------------------------------------------------------------------------------ reporting
def finite_json(value: Any, where: str, bad: list[str]) -> Any:
    """``value`` with every non-finite float replaced by None; their field names appended to ``bad``."""
    if isinstance(value, dict):
        return {k: finite_json(v, f"{where}.{k}" if where else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v, f"{where}[{i}]", bad) for i, v in enumerate(value)]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        bad.append(f"{where} ({float(value)})")
        return None
    return value


def json_line(result: dict[str, Any], prog: str) -> str:
    """The last line of a command: strict JSON (``allow_nan=False``); a non-finite number is written as
    null, and one line on stderr names the fields."""
    bad: list[str] = []
    clean = finite_json(result, "", bad)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"{prog}: not finite, written as null in the JSON line: {shown}", file=sys.stderr)
    return json.dumps(clean, allow_nan=False)


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """An OutputError, OSError or DataError -> ``SystemExit("PROG: error: ...")``, Ctrl-C -> "PROG: interrupted"
    (exit status 130); ``NVAE_DEBUG=1`` lets the exception and its traceback through."""
    from nvae.data.base import DataError  # an image that cannot be read, met while the data loads

    try:
        yield
    except (OutputError, OSError, DataError) as err:
        if os.environ.get("NVAE_DEBUG"):
            raise
        raise SystemExit(f"{prog}: error: {err}") from None
    except KeyboardInterrupt:
        if os.environ.get("NVAE_DEBUG"):
            raise
        print(f"{prog}: interrupted (files being written were removed; finished ones are complete)",
              file=sys.stderr)
        raise SystemExit(130) from None
