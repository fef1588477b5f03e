"""The command lines: entry points of train.py, sample.py, evaluate.py and nvae-train/-sample/-eval/-convert.

Each entry picks the memory allocator first (:func:`nvae.allocator.select_allocator`: the process may
re-execute itself with tcmalloc preloaded), then reads its arguments without importing torch (parsers:
``--help`` and usage errors answer at once), and only then imports torch and its command module:

    train     (nvae-train,   python train.py)     the LightningCLI over NVAEModule and the data modules
    sample    (nvae-sample,  python sample.py)    images, and the latent API (latent)
    evaluate  (nvae-eval,    python evaluate.py)  nll, recon, and fid (fid)
    restore   (nvae-restore, python restore.py)   image restoration with the model as the prior (restore_io)
    convert   (nvae-convert, python -m nvae.cli.convert)  an official checkpoint as an nvae one
    export    (nvae-export,  python -m nvae.cli.export)   an nvae checkpoint as a model directory
    parsers   the arguments of sample, evaluate and restore, and the argument types they share (no torch)
    common    what several commands share when they run: devices, loading a checkpoint, data loaders, Fabric

This package imports no torch. The entry functions are named after the commands (``nvae_train``, ...):
a function ``train`` here would be replaced by the submodule ``nvae.cli.train`` once that is imported.
"""
from __future__ import annotations

import os
import sys

from nvae.allocator import select_allocator


def _program() -> str:
    return os.path.basename(sys.argv[0]) or "nvae"


def nvae_train() -> None:
    """``python train.py`` / ``nvae-train``: see :func:`nvae.cli.train.main`."""
    select_allocator(_program())
    from nvae.cli.train import main

    main()


def nvae_sample() -> None:
    """``python sample.py`` / ``nvae-sample``: see :func:`nvae.cli.sample.main`."""
    select_allocator(_program())
    from nvae.cli.parsers import parse_sample

    args = parse_sample()
    from nvae.cli.sample import run_parsed

    run_parsed(args)


def nvae_eval() -> None:
    """``python evaluate.py`` / ``nvae-eval``: see :func:`nvae.cli.evaluate.main`."""
    select_allocator(_program())
    from nvae.cli.parsers import evaluate_parser

    args = evaluate_parser().parse_args()
    from nvae.cli.evaluate import run_parsed

    run_parsed(args)


def nvae_restore() -> None:
    """``python restore.py`` / ``nvae-restore``: see :func:`nvae.cli.restore.main`."""
    select_allocator(_program())
    from nvae.cli.parsers import restore_parser

    args = restore_parser().parse_args()
    from nvae.cli.restore import run_parsed

    run_parsed(args)


def nvae_export() -> None:
    """``nvae-export``: see :func:`nvae.cli.export.main` (no allocator choice: a one-off file conversion)."""
    from nvae.cli.export import main

    main()


def nvae_convert() -> None:
    """``nvae-convert``: see :func:`nvae.cli.convert.main` (no allocator choice: a one-off file conversion)."""
    from nvae.cli.convert import main

    main()
