"""One table of training speed, sampling speed and peak memory for each option of a preset.

    python benchmarks/options.py --config configs/cifar10.yaml --batch-size 8 [--steps 3] [--threads 2]
        [--options "32" "32 ckpt" "bf16" ... | --mechanisms] [--rounds R] [--device D]

Each option runs ``benchmarks/throughput.py`` in its own process (so peak memory is that option's
alone) and the results are printed as a Markdown table, then one JSON line per option.
Option words: a precision (32, bf16 = bf16-mixed, 16 = 16-mixed), ``ckpt`` (activation
checkpointing per latent group), ``ckptcell`` (per cell), ``cl`` / ``nchw`` (channels_last on /
off; default: the preset's), ``compile`` (torch.compile; its compilation is excluded by the
warm-up step but takes minutes on CPU), a CPU mechanism replaced by plain PyTorch (``plain-ops``:
``model.arch.backend plain``; ``onednn-dw``: oneDNN's own depthwise weight gradient instead
of the fastest of several), and the allocator (``NVAE_MALLOC``, see nvae.allocator; by default
whatever this process's environment says, as for train.py): ``tcmalloc``, ``glibc`` (glibc with
freed memory kept in the heap), ``glibc-default`` (glibc as it comes) or ``live`` (glibc giving every freed block of 64 KiB or more back to
the kernel, so the peak resident set follows the memory actually in use: the allocator-independent
peak; steps are much slower then, their times are not comparable).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's nvae (nvae.allocator imports no torch)

from nvae.allocator import REEXECUTED, preloads  # noqa: E402
LIVE_MALLOC = "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=65536"
DEFAULT_OPTIONS = ["32", "32 nchw", "32 ckpt", "bf16", "bf16 nchw", "bf16 ckpt"]
# --mechanisms: nvae's CPU-only mechanisms, each against the plain path it replaces: the first
# row is nvae as it runs; every other row swaps one mechanism for plain PyTorch.
MECHANISM_OPTIONS = ["32", "32 plain-ops", "32 onednn-dw", "32 glibc-default"]
WORDS = {"32": ["--precision", "32"], "bf16": ["--precision", "bf16-mixed"], "16": ["--precision", "16-mixed"],
         "ckpt": ["--checkpointing", "group"], "ckptcell": ["--checkpointing", "cell"],
         "cl": ["--channels-last"], "nchw": ["--no-channels-last"], "compile": ["--compile"],
         "plain-ops": ["--plain", "ops"], "onednn-dw": ["--plain", "depthwise"],
         "tcmalloc": [], "glibc": [], "glibc-default": [], "live": []}  # the allocator words set the environment
MALLOC_WORDS = {"tcmalloc": "tcmalloc", "glibc": "heap", "glibc-default": "default",
                "live": "default"}  # option word -> NVAE_MALLOC


def flags(option: str) -> list[str]:
    """'bf16 ckpt' -> throughput.py flags."""
    out = []
    for word in option.split():
        if word not in WORDS:
            raise SystemExit(f"unknown option word {word!r}; use {', '.join(WORDS)}")
        out += WORDS[word]
    return out


def environment(option: str) -> dict[str, str]:
    """The child's environment: NVAE_MALLOC for an allocator word; with ``live``, glibc also returns
    every freed block of 64 KiB or more to the kernel."""
    env = dict(os.environ)
    words = [w for w in option.split() if w in MALLOC_WORDS]
    if len(words) > 1:
        raise SystemExit(f"option {option!r} names more than one allocator ({', '.join(words)})")
    if words:
        env["NVAE_MALLOC"] = MALLOC_WORDS[words[0]]
        env.pop(REEXECUTED, None)  # the child decides afresh (nvae.allocator.select_allocator)
        if words[0] != "tcmalloc":  # a tcmalloc preloaded into this process would serve the child's mallocs
            env["LD_PRELOAD"] = ":".join(p for p in preloads(env) if "tcmalloc" not in p)
    if "live" in words:
        env["GLIBC_TUNABLES"] = LIVE_MALLOC
    return env


def measure(config: str, option: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "throughput.py"), "--config", config, "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads), *flags(option)]
    if args.device:
        cmd += ["--device", args.device]
    print(f"$ {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environment(option))
    if proc.returncode != 0:
        return {"option": option, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return {"option": option, **json.loads(proc.stdout.strip().splitlines()[-1])}


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown; ``x first`` is the step time over the first option's (> 1: slower than it)."""
    lines = ["| option | s / step | x first | train images/s | sample images/s | peak memory (MB) | TFLOP/s | allocator |",
             "|---|---|---|---|---|---|---|---|"]
    base = next((r["step_s"] for r in rows if "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['option']} | failed: {r['error']} | | | | | | |")
            continue
        sample = f"{r['sample_images_per_s']:.1f}" if r.get("sample_images_per_s") else "-"
        ratio = f"{r['step_s'] / base:.3f}" if base else "-"
        lines.append(f"| {r['option']} | {r['step_s']:.3f} | {ratio} | {r['train_images_per_s']:.2f} | {sample} | "
                     f"{r['peak_mem_mb']:.0f} | {r['achieved_tflops']:.3f} | {r.get('allocator', '-')} |")
    return "\n".join(lines)


def combine(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One option's rounds as one row: the median of the rounds' median step times (the rest from the first)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    row = dict(good[0], step_s=statistics.median(r["step_s"] for r in good), rounds=[r["step_s"] for r in good])
    row["train_images_per_s"] = row["batch_size"] / row["step_s"]
    return row


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="preset YAML")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--options", nargs="+", default=None, help="option sets, e.g. '32' 'bf16 ckpt'")
    p.add_argument("--mechanisms", action="store_true",
                   help=f"the options {' | '.join(MECHANISM_OPTIONS)}: each CPU mechanism against its plain path")
    p.add_argument("--rounds", type=int, default=1,
                   help="run all options this many times, interleaved (A B C A B C), and report the median round")
    args = p.parse_args(argv)
    options = args.options or (MECHANISM_OPTIONS if args.mechanisms else DEFAULT_OPTIONS)
    for option in options:
        flags(option)  # fail early on a typo
        environment(option)
    runs: dict[str, list[dict[str, Any]]] = {o: [] for o in options}
    for _ in range(max(args.rounds, 1)):
        for option in options:
            runs[option].append(measure(args.config, option, args))
    rows = [combine(runs[o]) for o in options]
    capability = next((r.get("cpu_capability") for r in rows if "error" not in r), "?")
    print(f"{args.config}, batch {args.batch_size}, {args.threads} threads, CPU capability {capability}, "
          f"median of {args.steps} steps, median of {args.rounds} interleaved round(s)")
    print(table(rows))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
