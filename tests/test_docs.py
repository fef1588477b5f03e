"""docs/architecture.md matches the code: it names every module of the package, and every file it
names exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()


def test_architecture_names_every_module_and_only_real_files() -> None:
    named = set(re.findall(r"(\w+\.py)\b", DOC))
    modules = {p.name for p in (ROOT / "nvae").rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - named) == []  # a module the page does not describe
    files = {p.name for folder in ("nvae", "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")}
    files |= {p.name for p in ROOT.glob("*.py")}
    assert sorted(named - files) == []  # a file the page describes that is gone


def test_the_checkpoint_table_lists_nvae_s_own_entries() -> None:
    """Every ``nvae_*`` entry checkpoint.py defines is in the page's table, and the table names no entry
    that checkpoint.py does not define."""
    from nvae import checkpoint

    defined = {v for k, v in vars(checkpoint).items() if k.endswith("_KEY") and isinstance(v, str)}
    table = set(re.findall(r"^\| `(\w+)` \|", DOC, re.MULTILINE))
    assert table <= defined
    assert {k for k in defined if k.startswith("nvae_")} <= table


def test_the_wheel_lists_every_package() -> None:
    """pyproject.toml names its packages one by one: a new folder of modules must be among them."""
    text = (ROOT / "pyproject.toml").read_text()  # tomllib is Python 3.11+; the list is one literal
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*?)\]", text, re.MULTILINE | re.DOTALL).group(1)))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "nvae").rglob("__init__.py")}
    assert sorted(found - listed) == []
