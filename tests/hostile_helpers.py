"""What the tests of files from others share: the one-line refusal and device or pipe nodes made here."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Callable

import pytest


def one_line(run: Callable[[], Any]) -> str:
    """The one-line message a refusal ends with (a command's SystemExit, or the exception)."""
    try:
        run()
    except SystemExit as exit_:
        message = str(exit_.code)
    except ValueError as err:
        message = str(err)
    else:
        raise AssertionError("the crafted input was accepted")
    assert "\n" not in message.strip(), message
    return message


def special_file(path: Path, kind: str) -> Path:
    """A named pipe, or a character device like /dev/null (1, 3) made here: the real one is never touched."""
    if kind == "named pipe":
        os.mkfifo(path)
    else:
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("this container may not make device nodes")
    return path
