"""Which data module a name read from a file may become; nothing is imported to find out.

A checkpoint records the class path of the data module that trained it, and Lightning's own
checkpoint entries name classes too. A file from someone else must not choose the code nvae runs.
So such a name resolves only to a class that already exists in this process and that nvae allows:

- a subclass of :class:`ImageDataModule` defined under ``nvae.data``;
- a class the user registered in their own code with :func:`register_datamodule`.

The lookup walks the subclasses of :class:`ImageDataModule` that are already defined. It never
imports a module, so a name from a file cannot trigger any module's import-time code.
"""
from __future__ import annotations

import sys
from typing import TypeVar

from nvae.data.base import ImageDataModule

REGISTERED = "nvae_registered_datamodule"
"""Class attribute set by :func:`register_datamodule`. Only the class's own ``__dict__`` counts,
so subclasses are not registered by inheritance."""

D = TypeVar("D", bound=type)


class UntrustedName(ValueError):
    """A name read from a file that nvae will not import or call."""


def register_datamodule(cls: D) -> D:
    """Let checkpoints and configs name ``cls``, a subclass of :class:`ImageDataModule` from your own code.

    Use it as a decorator (``@register_datamodule``) in the module that defines the class, and
    import that module before loading a checkpoint that names the class.
    """
    if not (isinstance(cls, type) and issubclass(cls, ImageDataModule)) or cls is ImageDataModule:
        raise TypeError(f"register_datamodule: {cls!r} is not a subclass of nvae.data.ImageDataModule")
    setattr(cls, REGISTERED, True)
    return cls


def class_path(cls: type) -> str:
    """``module.QualName``: how checkpoints record a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def subclasses(base: type) -> list[type]:
    """Every subclass of ``base`` already defined in this process (recursively; ``base`` excluded)."""
    found, stack = [], list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        found.append(cls)
    return found


def allowed_datamodules() -> dict[str, type[ImageDataModule]]:
    """Every data module a file may name, by each of its names.

    nvae's own data modules are listed under their full path and as ``nvae.data.<Name>``.
    """
    public = sys.modules["nvae.data"]  # the package (always loaded before its modules): its exported names

    found: dict[str, type[ImageDataModule]] = {}
    for cls in subclasses(ImageDataModule):
        own = cls.__module__ == "nvae.data" or cls.__module__.startswith("nvae.data.")
        if own or cls.__dict__.get(REGISTERED):
            found[class_path(cls)] = cls
            if own and getattr(public, cls.__name__, None) is cls:
                found[f"nvae.data.{cls.__name__}"] = cls
    return found


def datamodule_class(name: object, entry: str) -> type[ImageDataModule]:
    """The allowed data module that ``name`` names; :class:`UntrustedName` naming ``entry`` otherwise."""
    cls = allowed_datamodules().get(name) if isinstance(name, str) else None
    if cls is None:
        raise UntrustedName(
            f"{entry}: {name!r} is not an nvae data module (allowed: the classes in nvae.data and classes "
            "registered with nvae.data.register_datamodule); it was not imported. If it is your own data "
            "module, name it on the command line (--data CLASS_PATH) or register it in your code")
    return cls


def command_line_datamodule(name: str, option: str = "--data") -> type[ImageDataModule]:
    """A data module named on the command line: an allowed name (full path, ``nvae.data.<Name>`` or
    ``<Name>``), else ``module.Class``, imported because the user typed it; it must subclass
    :class:`ImageDataModule`. ValueError naming ``option`` otherwise."""
    import importlib

    allowed = allowed_datamodules()
    by_name = {cls.__name__: cls for cls in allowed.values()}
    if name in allowed or name in by_name:
        return allowed.get(name) or by_name[name]
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"{option}: {name!r} is not a data module of nvae.data; give a class path (module.Class)")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{option}: cannot import {name!r} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, ImageDataModule)):
        raise ValueError(f"{option}: {name!r} is not a subclass of nvae.data.ImageDataModule")
    return cls
