"""Entry points of train.py, sample.py, evaluate.py and the nvae-train/-sample/-eval/-convert commands.

Each picks the memory allocator first (:func:`nvae.runtime.select_allocator`: the process may
re-execute itself with tcmalloc preloaded), then imports torch and runs its command line.
"""
from __future__ import annotations

import os
import sys

from nvae.runtime import select_allocator


def _program() -> str:
    return os.path.basename(sys.argv[0]) or "nvae"


def train() -> None:
    """``python train.py`` / ``nvae-train``: see :func:`nvae.cli.main`."""
    select_allocator(_program())
    from nvae.cli import main

    main()


def sample() -> None:
    """``python sample.py`` / ``nvae-sample``: see :func:`nvae.sample_cli.main`."""
    select_allocator(_program())
    from nvae.sample_cli import main

    main()


def evaluate() -> None:
    """``python evaluate.py`` / ``nvae-eval``: see :func:`nvae.eval_cli.main`."""
    select_allocator(_program())
    from nvae.eval_cli import main

    main()


def convert() -> None:
    """``nvae-convert``: see :func:`nvae.convert.main` (no allocator choice: a one-off file conversion)."""
    from nvae.convert import main

    main()
