"""``--help`` answers before torch is imported: the entry points read their arguments with parsers that
import neither torch nor Lightning (importing them takes seconds), and import the command only to run it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, sys
import nvae.cli
sys.argv = sys.argv[1:]  # [program, *arguments]
code = None
try:
    getattr(nvae.cli, {entry!r})()
except SystemExit as end:
    code = end.code
print(json.dumps({{"exit": code, "heavy": [m for m in ("torch", "lightning") if m in sys.modules]}}))
"""


def entry_point_help(entry: str, args: list[str]) -> tuple[str, dict]:
    """Run ``nvae.cli.<entry>()`` with ``args`` in a fresh interpreter: its output, and what the probe saw after."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NVAE_MALLOC": "default"}  # no tcmalloc re-exec: one process
    proc = subprocess.run([sys.executable, "-c", PROBE.format(entry=entry), entry, *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *output, last = proc.stdout.splitlines()
    return "\n".join(output), json.loads(last)


@pytest.mark.parametrize("entry, args, expect", [
    ("nvae_sample", ["--help"], "--reconstruct"),
    ("nvae_eval", ["--help"], "{nll,fid,recon}"),
    ("nvae_eval", ["nll", "--help"], "--dmol-bins"),
    ("nvae_eval", ["fid", "--help"], "--inception-weights"),
    ("nvae_restore", ["--help"], "--lpips-net"),
    ("nvae_convert", ["--help"], "--data-root"),
    ("nvae_export", ["--help"], "--overwrite"),
])
def test_help_imports_neither_torch_nor_lightning(entry: str, args: list[str], expect: str) -> None:
    output, seen = entry_point_help(entry, args)
    assert seen == {"exit": 0, "heavy": []}
    assert expect in output


def test_the_probe_sees_torch_when_a_command_runs() -> None:
    """The check can fail: parsing a full command line checks --device, which imports torch."""
    _, seen = entry_point_help("nvae_sample", ["--checkpoint", "missing.ckpt", "--device", "cpu", "--num-samples", "0"])
    assert seen["exit"] == 2 and "torch" in seen["heavy"]
