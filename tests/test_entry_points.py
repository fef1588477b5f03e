"""Console entry points: nvae-train / -sample / -eval / -convert / -export / -restore
exist, run, document options."""
from __future__ import annotations

import argparse
import inspect
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import nvae.data as data_modules
from nvae.cli.parsers import evaluate_parser, restore_parser, sample_parser
from nvae.lightning import NVAEModule
from nvae.model import NVAEConfig

SCRIPTS = {"nvae-train": "nvae.cli:nvae_train", "nvae-sample": "nvae.cli:nvae_sample",
           "nvae-eval": "nvae.cli:nvae_eval", "nvae-convert": "nvae.cli:nvae_convert", "nvae-export": "nvae.cli:nvae_export",
           "nvae-restore": "nvae.cli:nvae_restore"}


def test_console_scripts_are_declared() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name in SCRIPTS}
    assert found == SCRIPTS


@pytest.mark.parametrize("script, args, expect", [
    ("nvae-train", ["fit", "--help"], "--model.arch.num_channels"),
    ("nvae-sample", ["--help"], "--reconstruct"),
    ("nvae-eval", ["nll", "--help"], "--num-importance-samples"),
    ("nvae-eval", ["nll", "--help"], "--dmol-bins"),
    ("nvae-convert", ["--help"], "--data-root"),
    ("nvae-restore", ["--help"], "--lpips-weights"),
])
def test_entry_point_help_runs(script: str, args: list[str], expect: str) -> None:
    exe = shutil.which(script, path=str(Path(sys.executable).parent))
    assert exe, f"{script} is not installed next to {sys.executable} (pip install -e .)"
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout


def _argparse_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    actions = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions += _argparse_actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            actions.append(action)
    return actions


def test_every_sample_eval_and_restore_option_has_a_description() -> None:
    for parser in (sample_parser(), evaluate_parser(), restore_parser()):
        undocumented = [a.option_strings or a.dest for a in _argparse_actions(parser) if not (a.help or "").strip()]
        assert not undocumented


def test_every_training_option_of_ours_has_a_description() -> None:
    """LightningCLI's --help reads these docstrings: each argument has its line."""
    def documented(cls: type) -> list[str]:
        doc = inspect.getdoc(cls.__init__) or ""
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
        return [p for p in params if not re.search(rf"^\s*{p}: \S", doc, re.MULTILINE)]

    assert documented(NVAEModule) == []
    for name in dir(data_modules):
        cls = getattr(data_modules, name)
        if isinstance(cls, type) and name.endswith("DataModule") and name != "ImageDataModule":
            assert documented(cls) == [], name
    source = inspect.getsource(NVAEConfig)
    for f in fields(NVAEConfig):  # attribute docstrings right under each field
        assert re.search(rf"{f.name}: .*\n\s+\"\"\"\S", source), f.name
