"""nvae.allocator: the allocator (NVAE_MALLOC): freed memory reused without new page faults, tcmalloc
preloaded by re-executing the entry point, clear errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import nvae.allocator as allocator

PROBE = """
import resource, sys, torch
from nvae.allocator import keep_heap_memory
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
# What an entry point does first: pick the allocator (may re-execute), then report what it runs with.
ENTRY = """
import sys
from nvae.allocator import select_allocator
print(select_allocator("probe"), "|", " ".join(sys.argv[1:]))
"""
TCMALLOC = allocator.find_tcmalloc() if sys.platform.startswith("linux") else None
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None, reason="no libtcmalloc installed (apt install libtcmalloc-minimal4)")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt, LD_PRELOAD")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NVAE_MALLOC", "NVAE_MALLOC_PRELOADED", "LD_PRELOAD")}
    return {**env, **extra}


def probe(env: dict[str, str]) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean_env(**env), capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", float(out[1])


def entry(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], env=clean_env(**env), capture_output=True, text=True)


@linux
def test_kept_heap_reuses_freed_pages_and_default_opt_out_does_not() -> None:
    applied, kept = probe({})
    default_applied, default = probe({"NVAE_MALLOC": "default"})
    assert applied and not default_applied
    assert default > 30_000  # glibc mmaps the big blocks afresh every step (271 MB = 69,000 pages)
    assert kept < default / 4  # kept: the freed pages are reused (0 on a quiet machine)


@needs_tcmalloc
def test_tcmalloc_reuses_freed_pages_and_the_glibc_setting_stays_off() -> None:
    applied, faults = probe({"LD_PRELOAD": TCMALLOC})
    _, default = probe({"NVAE_MALLOC": "default"})
    assert not applied  # tcmalloc's own mallopt would accept and ignore it
    assert faults < default / 4


@needs_tcmalloc
def test_auto_reexecutes_with_tcmalloc_and_the_same_command_line() -> None:
    for env in ({}, {"NVAE_MALLOC": "auto"}, {"NVAE_MALLOC": "tcmalloc"}):
        proc = entry(env, "fit", "--config", "a b.yaml")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "tcmalloc | fit --config a b.yaml"
    assert entry({"NVAE_MALLOC": "heap"}, "x").stdout.strip() == "glibc, heap kept | x"
    assert entry({"NVAE_MALLOC": "default"}, "x").stdout.strip() == "glibc | x"


@linux
def test_bad_setting_is_a_one_line_error_naming_the_variable() -> None:
    proc = entry({"NVAE_MALLOC": "jemalloc"})
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "probe: error: NVAE_MALLOC must be one of auto, tcmalloc, heap, default, got 'jemalloc'"]


def test_tcmalloc_requested_but_missing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(allocator, "tcmalloc_loaded", lambda: False)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.setenv("NVAE_MALLOC", "tcmalloc")
    with pytest.raises(SystemExit, match="NVAE_MALLOC=tcmalloc but no libtcmalloc was found"):
        allocator.select_allocator("train.py")


class Exec(Exception):
    pass


def test_reexec_preloads_once_and_keeps_other_preloads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, argv, env))
        raise Exec  # never replace the test process

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.setattr(allocator, "tcmalloc_loaded", lambda: False)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/opt/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "keep_heap_memory", lambda: False)
    monkeypatch.setattr(allocator, "_applied", False)  # whatever earlier tests in this process did
    monkeypatch.delenv("NVAE_MALLOC", raising=False)
    monkeypatch.delenv("NVAE_MALLOC_PRELOADED", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/a/libfirst.so /opt/lib/libtcmalloc_minimal.so.4")
    with pytest.raises(Exec):
        allocator.select_allocator()
    path, argv, env = calls[0]
    assert (path, argv) == (sys.executable, sys.orig_argv)
    assert env["LD_PRELOAD"] == "/opt/lib/libtcmalloc_minimal.so.4:/a/libfirst.so"
    assert env["NVAE_MALLOC_PRELOADED"] == "1"
    # In the re-executed process a preload that did not take is not retried (no exec loop) ...
    monkeypatch.setenv("NVAE_MALLOC_PRELOADED", "1")
    assert allocator.select_allocator() == "glibc" and len(calls) == 1
    # ... and is an error where tcmalloc was asked for by name.
    monkeypatch.setenv("NVAE_MALLOC", "tcmalloc")
    with pytest.raises(SystemExit, match="it did not load from LD_PRELOAD"):
        allocator.select_allocator()
