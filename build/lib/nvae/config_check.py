"""Names a config file may hold before LightningCLI reads it.

LightningCLI (through jsonargparse) imports what a config names: every ``class_path`` and every
string given to an argument typed as a class or a callable. A config received from someone else
(a run's saved ``config.yaml``) could so make ``train.py`` import and call anything, e.g.
``class_path: subprocess.Popen`` or a callback argument ``"os.system"``. Before parsing,
:func:`check_command_line` reads each config file the command line names (``--config FILE``, and
any other value that is a ``.yaml``/``.yml``/``.json`` file, e.g. ``--data data.yaml``) with
``yaml.safe_load`` and refuses a name outside this list, without importing it:

- nvae's data modules and registered ones (:mod:`nvae.data.registry`), ``nvae.lightning.NVAEModule``,
  nvae's callbacks (``nvae.callbacks.*``);
- Lightning's callbacks (except ``LambdaCallback``, which calls the functions it is given), loggers,
  strategies, plugins, profilers, accelerators and cluster environments;
- a bare class name (``TensorBoardLogger``): jsonargparse resolves it only among already-defined
  subclasses of the argument's type;
- a name also typed on the command line (``--data mypkg.MyData``): names a user types are theirs.

Any other dotted string whose top-level module exists (found with ``importlib.util.find_spec``,
which imports nothing for a top-level name) counts as a name and is refused.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

from nvae.data.registry import UntrustedName, allowed_datamodules

ALLOWED_PREFIXES = (
    "nvae.callbacks.",
    "lightning.pytorch.callbacks.", "lightning.pytorch.loggers.", "lightning.pytorch.strategies.",
    "lightning.pytorch.plugins.", "lightning.pytorch.profilers.", "lightning.pytorch.accelerators.",
    "lightning.fabric.plugins.environments.",
)
DENIED_CLASSES = ("LambdaCallback",)  # instantiating it with names from a file calls those functions
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
MAX_DEPTH = 8  # config files naming config files


def allowed(name: str, trusted: frozenset[str]) -> bool:
    """True if a config may name ``name`` (see the module docstring)."""
    if name in trusted or "." not in name:
        return True
    if name.rpartition(".")[2] in DENIED_CLASSES:
        return False
    return name.startswith(ALLOWED_PREFIXES) or name in allowed_datamodules() or name == "nvae.lightning.NVAEModule"


def looks_like_name(text: str) -> bool:
    """A dotted identifier whose top-level module exists (so jsonargparse could import it)."""
    if not DOTTED.fullmatch(text):
        return False
    try:
        return importlib.util.find_spec(text.split(".", 1)[0]) is not None
    except (ImportError, ValueError):
        return False


def names_in(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(where, name) of every class path and name-like string in a parsed config."""
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{key}" if where else str(key)
            if key == "class_path" and isinstance(item, str):
                yield inner, item
            else:
                yield from names_in(item, inner)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from names_in(item, f"{where}[{i}]")
    elif isinstance(value, str) and looks_like_name(value):
        yield where, value


def nested_files(value: Any, base: Path) -> Iterator[Path]:
    """Config files that string values of a parsed config point to (jsonargparse reads them too)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from nested_files(item, base)
    elif isinstance(value, list):
        for item in value:
            yield from nested_files(item, base)
    elif isinstance(value, str) and value.endswith(CONFIG_SUFFIXES):
        for candidate in (Path(value), base / value):
            if candidate.is_file():
                yield candidate
                break


def check_config_file(path: Path, trusted: frozenset[str] = frozenset(), depth: int = 0) -> None:
    """Refuse (:class:`UntrustedName`, naming the file and the entry) a config that names other code."""
    try:
        parsed = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # not readable as YAML: jsonargparse reports it, and imports nothing from it
    for where, name in names_in(parsed, ""):
        if not allowed(name, trusted):
            raise UntrustedName(
                f"config '{path}': {where}: {name!r} is not a class nvae lets a config file name (nvae's data "
                "modules and callbacks, Lightning's callbacks, loggers, strategies and plugins); it was not "
                "imported. If you trust it, give it on the command line instead (e.g. --data CLASS_PATH)")
    if depth < MAX_DEPTH:
        for nested in nested_files(parsed, Path(path).parent):
            check_config_file(nested, trusted, depth + 1)


def command_line_values(args: list[str]) -> list[str]:
    """The values of a command line: each token, and what follows '=' in ``--key=value``."""
    return [token.split("=", 1)[1] if token.startswith("-") and "=" in token else token for token in args]


def check_command_line(args: list[str]) -> None:
    """Check every config file ``args`` names; names typed in ``args`` themselves are trusted."""
    values = command_line_values(args)
    trusted = frozenset(v for v in values if DOTTED.fullmatch(v))
    for value in values:
        if value.endswith(CONFIG_SUFFIXES) and Path(value).is_file():
            check_config_file(Path(value), trusted)


__all__ = ["UntrustedName", "check_command_line", "check_config_file"]
