"""The paper's presets, the quickstart and the debug overlay, found by name (``--config cifar10``).

The YAML files live in the repository's ``configs/`` (the place people read them); a wheel ships
the same files as package data in ``nvae/configs/`` (pyproject.toml maps one onto the other), so
``nvae-train fit --config cifar10 --config debug`` works from any folder after ``pip install``.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Optional

SUFFIX = ".yaml"


def preset_folder() -> Path:
    """Where the preset files are: ``nvae/configs`` in an installed wheel, ``configs/`` in a checkout."""
    packaged = resources.files("nvae").joinpath("configs")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "configs"  # source checkout or editable install


def preset_names() -> list[str]:
    """Names of the shipped presets, sorted (file names without ``.yaml``)."""
    folder = preset_folder()
    return sorted(p.stem for p in folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []


def preset_path(name: str) -> Optional[Path]:
    """The file of preset ``name``, or None when there is no such preset."""
    path = preset_folder() / f"{name}{SUFFIX}"
    return path if name in preset_names() else None


def resolve_config_args(args: list[str]) -> list[str]:
    """``args`` with each ``--config NAME`` / ``-c NAME`` / ``--config=NAME`` that is a preset name (and
    not an existing file) replaced by the preset's path; ValueError naming an unknown bare name."""
    out = list(args)
    for i, token in enumerate(out):
        if token in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = _resolve(out[i + 1])
        elif token.startswith("--config="):
            out[i] = "--config=" + _resolve(token.split("=", 1)[1])
    return out


def _resolve(value: str) -> str:
    if Path(value).exists() or "/" in value or "\\" in value or value.endswith((".yaml", ".yml", ".json")):
        return value  # a path: jsonargparse reads it (and reports a missing file)
    if value.lstrip().startswith(("{", "[")) or ":" in value:
        return value  # an inline YAML/JSON config
    path = preset_path(value)
    if path is None:
        raise ValueError(f"--config {value!r}: no such file and no preset of that name "
                         f"(presets: {', '.join(preset_names())})")
    return str(path)


def summary(name: str) -> str:
    """The preset's paper result (its header's 'Paper ...:' line), or its first header line."""
    lines = [line[1:].strip() for line in (preset_folder() / f"{name}{SUFFIX}").read_text().splitlines()
             if line.startswith("#")]
    paper = next((re.sub(r"^Paper \([^)]*\):\s*", "", line) for line in lines if re.match(r"Paper \(.*table", line)),
                 None)
    return paper or (lines[0] if lines else "")


def describe() -> str:
    """The table ``nvae-train presets`` prints: name, paper result, file."""
    rows = [(name, summary(name), str(preset_folder() / f"{name}{SUFFIX}")) for name in preset_names()]
    width = max((len(r[0]) for r in rows), default=4)
    lines = [f"{name:<{width}}  {what}\n{'':<{width}}  {path}" for name, what, path in rows]
    usage = ("use a preset by name (nvae-train fit --config cifar10 --config debug) or copy its file to edit it")
    return "\n".join(lines + ["", usage])
