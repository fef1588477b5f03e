"""Names a config file may hold before LightningCLI reads it.

LightningCLI (through jsonargparse) imports what a config names: every ``class_path`` and every
string given to an argument typed as a class or a callable. A config received from someone else
(a run's saved ``config.yaml``) could so make ``train.py`` import and call anything, e.g.
``class_path: subprocess.Popen``, or the same class reached through a module's attribute
(``lightning.pytorch.accelerators.cuda.subprocess.Popen``). Two locks, each enough alone:

1. :func:`check_command_line` reads, before parsing, every file the command line gives jsonargparse
   (every ``--config`` value whatever its name, any other value that is a file, and the files those
   name) with ``yaml.safe_load``. Each dotted name in them is *resolved* to the object it reaches,
   importing only modules of nvae and Lightning (a name under any other top-level module is refused
   unimported), and allowed only when that object is one of :func:`allowed_classes`, compared by
   identity and by its own ``__module__.__qualname__``: nvae's data modules (and registered ones),
   nvae's callbacks and ``NVAEModule``; Lightning's concrete callbacks (not ``LambdaCallback``,
   which calls what it is given), strategies, profilers, accelerators, precision and checkpoint-IO
   plugins and cluster environments; of the loggers only ``TensorBoardLogger`` and ``CSVLogger``
   (the others send data over the network). Names typed on the command line are the user's.
2. :func:`import_policy` turns on jsonargparse's own enforcement while the CLI runs: every import
   path a value names is denied (``*``) unless it is on the list above, the names the files used
   for those classes, or a name the user typed; jsonargparse also checks the path where the object
   is defined; and a ``class_path`` inside a value typed ``Any`` is never instantiated.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from nvae.data.registry import UntrustedName, allowed_datamodules, class_path, subclasses

TRUSTED_PACKAGES = ("lightning", "nvae")  # modules a name from a file may make us import to resolve it
ALLOWED_LOGGERS = ("TensorBoardLogger", "CSVLogger")  # local files only: the other loggers reach the network
# LambdaCallback calls the functions it is given; OnExceptionCheckpoint makes Lightning resume from the file it
# names (unchecked) and removes that file at teardown
DENIED_CLASSES = ("LambdaCallback", "OnExceptionCheckpoint")
DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
URL = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")
MAX_DEPTH = 8  # config files naming config files
MAX_CONFIG_BYTES = 16 * 2**20  # a config is text of a few kB; a larger file is not read as one
NOT_CONFIG_OPTIONS = ("--ckpt_path", "--resume")  # their file values are checkpoints, checked by nvae.checkpoint


# ------------------------------------------------------------------------------------------ what may be named
def _lightning_bases() -> list[type]:
    from lightning.fabric.plugins.environments import ClusterEnvironment
    from lightning.pytorch.accelerators import Accelerator
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins import CheckpointIO, LayerSync, Precision
    from lightning.pytorch.profilers import Profiler
    from lightning.pytorch.strategies import Strategy

    return [Callback, Strategy, Profiler, Accelerator, ClusterEnvironment, Precision, CheckpointIO, LayerSync]


def _lightning_class_allowed(cls: type) -> bool:
    path = class_path(cls)
    public = not any(part.startswith("_") for part in path.split("."))  # no _graveyard, no private helpers
    return (path.startswith("lightning.") and public and not inspect.isabstract(cls)
            and cls.__name__ not in DENIED_CLASSES)


def allowed_classes() -> dict[str, type]:
    """Every class a config or checkpoint may name, by its own ``__module__.__qualname__``."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    from nvae.arch import NVAEConfig
    from nvae.hparams import GuardConfig, ObjectiveConfig, OptimConfig
    from nvae.lightning import NVAEModule
    from nvae.spec import ImageSpec

    found: dict[str, type] = {}
    for base in _lightning_bases():
        found.update({class_path(c): c for c in [base, *subclasses(base)] if _lightning_class_allowed(c)})
    found.update({class_path(c): c for c in subclasses(Logger)
                  if c.__name__ in ALLOWED_LOGGERS and class_path(c).startswith("lightning.")})
    found.update({class_path(c): c for c in subclasses(Callback) if class_path(c).startswith("nvae.")})
    found.update({class_path(c): c for c in allowed_datamodules().values()})
    for cls in (NVAEModule, ImageSpec, NVAEConfig, OptimConfig, ObjectiveConfig, GuardConfig):  # the model's types
        found[class_path(cls)] = cls
    return found


def resolve(name: str) -> Optional[object]:
    """The object a dotted ``name`` reaches, importing only modules of :data:`TRUSTED_PACKAGES` (or
    ones already imported); None when it reaches nothing or would need another module imported."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        module = sys.modules.get(module_name)
        if module is None and parts[0] in TRUSTED_PACKAGES:
            try:
                if importlib.util.find_spec(module_name) is None:
                    continue
                module = importlib.import_module(module_name)
            except (ImportError, ValueError):
                continue
        if module is None:
            continue
        obj: object = module
        for attr in parts[split:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def allowed(name: str, trusted: frozenset[str] = frozenset()) -> bool:
    """True if a config may name ``name`` (see the module docstring)."""
    if name in trusted or "." not in name:  # a bare class name: jsonargparse looks among the type's subclasses
        return True
    obj = resolve(name)
    if not isinstance(obj, type):
        return False
    return allowed_classes().get(class_path(obj)) is obj


# ------------------------------------------------------------------------------------------ reading the files
def looks_like_name(text: str) -> bool:
    """A dotted identifier whose top-level module exists (so jsonargparse could import it)."""
    if not DOTTED.fullmatch(text):
        return False
    try:
        return importlib.util.find_spec(text.split(".", 1)[0]) is not None
    except (ImportError, ValueError):
        return False


def embedded(text: str) -> Any:
    """The mapping or list a string value holds as YAML (jsonargparse parses such strings for non-str
    arguments, e.g. ``data: "{class_path: ...}"``), else None."""
    if not (text.lstrip()[:1] in ("{", "[") or "\n" in text or "class_path" in text):
        return None
    try:
        inner = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return inner if isinstance(inner, (dict, list)) else None


def strings_in(value: Any, where: str, key: Any = None) -> Iterator[tuple[str, Any, str]]:
    """(where, key, text) of every string in a parsed config, YAML inside strings included."""
    if isinstance(value, dict):
        for k, item in value.items():
            yield from strings_in(item, f"{where}.{k}" if where else str(k), k)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from strings_in(item, f"{where}[{i}]", i)
    elif isinstance(value, str):
        yield where, key, value
        held = embedded(value)
        if held is not None:
            yield from strings_in(held, where)


def names_in(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(where, name) of every class path and name-like string in a parsed config."""
    for inner, key, text in strings_in(value, where):
        if key == "class_path" or looks_like_name(text):
            yield inner, text


def urls_in(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(where, text) of every string that names a location by a URL or fsspec scheme (``http://``,
    ``s3://``, ``local://``, ``a::b``): Lightning reads and writes checkpoints and logs through fsspec."""
    for inner, _, text in strings_in(value, where):
        if URL.match(text) or "::" in text:
            yield inner, text


def nested_files(value: Any, base: Path, key: str = "") -> Iterator[Path]:
    """Files that string values of a parsed config point to (jsonargparse may read them as configs)."""
    if isinstance(value, dict):
        for k, item in value.items():
            yield from nested_files(item, base, str(k))
    elif isinstance(value, list):
        for item in value:
            yield from nested_files(item, base, key)
    elif isinstance(value, str) and key not in ("ckpt_path", "resume") and "\n" not in value:
        for candidate in (Path(value), base / value):
            with contextlib.suppress(OSError, ValueError):
                if candidate.is_file():
                    yield candidate
                    break


def read_config(path: Path) -> Any:
    """``path`` parsed by ``yaml.safe_load``; None when it is not YAML text (jsonargparse then reads
    nothing from it); :class:`UntrustedName` when it is too large to be a config."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UntrustedName(f"config '{path}': {path.stat().st_size} bytes is not a config file (at most "
                                f"{MAX_CONFIG_BYTES // 2**20} MiB); it was not read")
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def check_config_file(path: Path, trusted: frozenset[str] = frozenset(), depth: int = 0) -> list[str]:
    """Refuse (:class:`UntrustedName`, naming the file and the entry) a config that names other code;
    returns the names it holds (all allowed), for :func:`import_policy`."""
    parsed = read_config(Path(path))
    for where, text in urls_in(parsed, ""):
        raise UntrustedName(f"config '{path}': {where}: {text!r} names a network or fsspec location; nvae does not "
                            "let a config file choose where to read or write beyond local paths. If you trust it, "
                            "give it on the command line instead")
    names = []
    for where, name in names_in(parsed, ""):
        if not allowed(name, trusted):
            raise UntrustedName(
                f"config '{path}': {where}: {name!r} is not a class nvae lets a config file name (nvae's data "
                "modules and callbacks, Lightning's callbacks, strategies and plugins, the TensorBoard and CSV "
                "loggers); it was not imported. If you trust it, give it on the command line instead (e.g. "
                "--data CLASS_PATH)")
        names.append(name)
    if depth < MAX_DEPTH:
        for nested in nested_files(parsed, Path(path).parent):
            names += check_config_file(nested, trusted, depth + 1)
    return names


def command_line_values(args: list[str]) -> list[str]:
    """The values of a command line: each token, and what follows '=' in ``--key=value``."""
    return [token.split("=", 1)[1] if token.startswith("-") and "=" in token else token for token in args]


def config_files(args: list[str]) -> list[Path]:
    """Every existing file a command line gives, except checkpoints (``--ckpt_path``, ``--resume``)."""
    files = []
    for i, token in enumerate(args):
        option = token.split("=", 1)[0] if token.startswith("-") else (args[i - 1] if i else "")
        value = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
        if option in NOT_CONFIG_OPTIONS or value.startswith("-"):
            continue
        with contextlib.suppress(OSError, ValueError):
            if Path(value).is_file():
                files.append(Path(value))
    return files


def check_command_line(args: list[str]) -> list[str]:
    """Check every config file ``args`` gives; names typed in ``args`` themselves are trusted.
    Returns every name the files and the command line use, for :func:`import_policy`."""
    trusted = frozenset(v for v in command_line_values(args) if DOTTED.fullmatch(v))
    names = list(trusted)
    for path in config_files(args):
        names += check_config_file(path, trusted)
    return names


# ------------------------------------------------------------------------------------------ jsonargparse's lock
def import_paths(names: list[str]) -> list[str]:
    """The allowlist for jsonargparse: the allowed classes' own paths, the names used for them, and the
    own paths of what typed names reach (imported: the user typed them)."""
    paths = set(allowed_classes())
    for name in names:
        if not DOTTED.fullmatch(name):
            continue
        paths.add(name)
        obj = resolve(name)
        if obj is None and name.rpartition(".")[0]:
            with contextlib.suppress(Exception):  # a name the user typed: theirs to import
                obj = getattr(importlib.import_module(name.rpartition(".")[0]), name.rpartition(".")[2])
        if isinstance(obj, type) or inspect.isroutine(obj):
            paths.add(f"{obj.__module__}.{obj.__qualname__}")
    return sorted(p for p in paths if not p.startswith("jsonargparse"))


@contextlib.contextmanager
def import_policy(names: list[str]) -> Iterator[None]:
    """While the block runs, jsonargparse imports only :func:`import_paths` of ``names`` and never
    instantiates a class spec found in an ``Any`` value; its settings are restored afterwards."""
    from jsonargparse import set_parsing_settings

    from nvae.compat import jsonargparse_settings

    settings = jsonargparse_settings()
    saved = {key: settings[key] for key in ("import_path_verdicts", "import_paths_enforced",
                                            "instantiate_subclass_spec_in_any")}
    try:
        set_parsing_settings(instantiate_subclass_spec_in_any=False, import_path_denylist=["*"],
                             import_path_allowlist=import_paths(names))
        yield
    finally:
        settings.update(saved)


__all__ = ["UntrustedName", "allowed_classes", "check_command_line", "check_config_file", "import_policy"]
