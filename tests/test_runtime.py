"""nvae.runtime.keep_heap_memory: freed memory is reused without new page faults (glibc Linux)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from nvae.runtime import keep_heap_memory
applied = keep_heap_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # a training step's pattern: buffers of many sizes alive together, then all freed
    held = [torch.empty(int(k * 2**18)).fill_(1.0) for k in (1, 3, 17, 40, 5, 64, 9, 130, 2)]
    del held
for _ in range(2):
    step()
before = faults()
for _ in range(5):
    step()
print(applied, (faults() - before) / 5)
"""


def probe(env: dict[str, str]) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_kept_heap_reuses_freed_pages_and_default_opt_out_does_not() -> None:
    applied, kept = probe({})
    default_applied, default = probe({"NVAE_MALLOC": "default"})
    assert applied and not default_applied
    assert default > 30_000  # glibc mmaps the big blocks afresh every step (271 MB = 69,000 pages)
    assert kept < default / 4  # kept: the freed pages are reused (0 on a quiet machine)
