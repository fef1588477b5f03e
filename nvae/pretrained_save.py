"""Writing a model directory (:mod:`nvae.pretrained` reads one): where it may be written, and how.

A model directory is written only to a folder that does not exist yet, is empty, or already holds a
model directory (then only with ``overwrite``); never into a folder of other files (a repository's
README.md is not replaced by a model card). Its member files, where they exist, must be regular
files, and none may be the file being converted or exported. Every file is written to a fresh
temporary name first (O_EXCL) and all are renamed only when all are complete, ``config.json`` last:
a failure leaves the folder as it was, or (a rename failing midway) without a config that points at
the new weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch

from nvae.pretrained import CARD, CONFIG, FORMAT, RAW_WEIGHTS, WEIGHTS

if TYPE_CHECKING:  # the model calls this module (NVAE.save_pretrained): a type here, no import
    from nvae.model import NVAE

MEMBERS = (WEIGHTS, RAW_WEIGHTS, CARD, CONFIG)  # in the order they are renamed into place
KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))


def sha256(path: Path) -> str:
    """The sha256 of a file (for a model directory: of its ``model.safetensors``)."""
    path = path / WEIGHTS if path.is_dir() else path
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _kind(path: Path) -> Optional[str]:
    """What ``path`` is when it is not a regular file (``os.lstat``: links are not followed), else None."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return next((name for test, name in KINDS if test(mode)), None)


def check_destination(folder: Path, overwrite: bool, sources: Sequence[Path] = ()) -> None:
    """ValueError (one line) unless a model directory may be written to ``folder`` (module docstring)."""
    kind = _kind(folder)
    if folder.exists() and not folder.is_dir() or kind not in (None, "a folder"):
        raise ValueError(f"'{folder}' is {kind or 'a file'}; a model directory is written to a folder (or name "
                         "a .ckpt to write a training checkpoint)")
    if not folder.exists():
        return
    for name in MEMBERS:
        member_kind = _kind(folder / name)
        if member_kind:
            raise ValueError(f"'{folder / name}' is {member_kind}, not a file; nvae never replaces it")
        for source in sources:
            if (folder / name).exists() and source.exists() and os.path.samefile(source, folder / name):
                raise ValueError(f"'{source}' is the file being converted, and it is '{folder / name}' in the "
                                 "destination; write to another folder")
    entries = [entry.name for entry in folder.iterdir()]
    if (folder / CONFIG).exists():
        if not overwrite:
            raise ValueError(f"'{folder}' already holds a model directory; pass --overwrite to replace it")
    elif entries:
        raise ValueError(f"'{folder}' holds {len(entries)} other file(s) ({entries[0]!r}, ...); a model directory "
                         "is written to a new or empty folder, never among other files")


def save_model_dir(model: "NVAE", folder: str | Path, raw_state: Optional[Mapping[str, torch.Tensor]] = None,
                   data: Optional[dict[str, Any]] = None, provenance: Optional[dict[str, Any]] = None,
                   card: str = "", channels_last: bool = False, overwrite: bool = False,
                   sources: Sequence[Path] = ()) -> Path:
    """Write ``model`` (its current weights: the EMA ones when ``raw_state`` holds the raw) as a model
    directory once :func:`check_destination` allows it. ``channels_last`` records the memory format the
    model ran in (the same numbers need the same convolution kernels)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    check_destination(folder, overwrite, sources)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "image_spec": vars(model.spec).copy(), "arch": vars(model.cfg).copy(),
              "likelihood": model.likelihood_name, "weights": "ema" if raw_state is not None else "raw",
              "channels_last": bool(channels_last), "data": data, "provenance": provenance or {}}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    writers: dict[str, Callable[[Path], Any]] = {
        WEIGHTS: lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}),
        CONFIG: lambda tmp: tmp.write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")}
    if raw_state is not None:
        raw = {k: v.detach().cpu().contiguous() for k, v in raw_state.items()}
        writers[RAW_WEIGHTS] = lambda tmp: save_file(raw, str(tmp), metadata={"format": FORMAT})
    if card:
        writers[CARD] = lambda tmp: tmp.write_text(card)
    write_all(folder, writers)
    if raw_state is None:
        (folder / RAW_WEIGHTS).unlink(missing_ok=True)  # an earlier export's raw weights are not this model's
    return folder


def write_all(folder: Path, writers: Mapping[str, Callable[[Path], Any]]) -> None:
    """Each ``writers[name](tmp)`` to a fresh temporary file in ``folder`` (mkstemp: O_EXCL, never an
    existing file or link), then every one renamed over its name in :data:`MEMBERS` order; the
    temporary files are removed if anything fails."""
    temps: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            temps[name] = Path(tmp)
            write(temps[name])
            os.chmod(temps[name], 0o644)  # after writing: safetensors recreates the file (mkstemp gives 0600)
        for name in (n for n in MEMBERS if n in temps):
            os.replace(temps.pop(name), folder / name)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
