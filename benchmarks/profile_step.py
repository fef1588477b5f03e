"""Where a training step's time goes: torch.profiler over a few steps of a preset.

    python benchmarks/profile_step.py --config configs/<preset>.yaml --batch-size B [--steps 3] [--warmup 2]
        [--top 15] [--trace step.json] [--precision ...] [--checkpointing ...] [--device D] [--threads T]

The model and the step are those of ``benchmarks/throughput.py`` (the same options, the same
:class:`throughput.Stepper`: zero_grad, regularized loss, backward, Adamax step). After the
warm-up steps, ``--steps`` steps run under ``torch.profiler``; printed per step:

- the phases: forward (the regularized loss, with the spectral power iteration and the BatchNorm
  penalty), backward, optimizer, in milliseconds of wall time under the profiler;
- the ``--top`` operators by self time (CPU time on a CPU, the device's kernel time on CUDA): calls,
  self and total milliseconds, and their share of all self time. Autograd nodes written in Python
  (``_BNSwishConvsBackward``, ``_WeightNormBackward``, ...) show their own Python time as self time.

The last line of stdout is one JSON object (``phases_ms``, ``top``, ...). ``--trace FILE`` also
writes a Chrome trace of the profiled steps (open it in https://ui.perfetto.dev or chrome://tracing).
The profiler adds a few microseconds per operator, so small operators look costlier than they are:
compare the entries with each other, and take step times from throughput.py.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: throughput.py

from throughput import PHASES, build_parser, default_threads, parse_args, prepare, synchronize  # noqa: E402

from nvae.allocator import allocator_name, keep_heap_memory, select_allocator  # noqa: E402


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser(__doc__.split("\n\n")[0])
    p.set_defaults(steps=3, sample_steps=0)
    p.add_argument("--top", type=int, default=15, help="operators to list, by self time per step")
    p.add_argument("--trace", default=None, help="also write a Chrome trace of the profiled steps to this file")
    args = parse_args(argv, p)
    if args.steps < 1:
        p.error("--steps must be >= 1 (steps to profile)")
    if args.top < 1:
        p.error("--top must be >= 1")
    return args


def top_operators(events: Any, steps: int, top: int, device_time: bool) -> tuple[list[dict[str, Any]], float]:
    """The ``top`` operators by self time per step (our phase labels excluded), and all self time (ms)."""
    def self_us(e: Any) -> float:
        return e.self_device_time_total if device_time else e.self_cpu_time_total

    def total_us(e: Any) -> float:
        return e.device_time_total if device_time else e.cpu_time_total

    ops = [e for e in events if e.key not in PHASES]
    ops.sort(key=self_us, reverse=True)
    rows = [{"name": e.key, "calls": e.count / steps, "self_ms": self_us(e) / 1e3 / steps,
             "total_ms": total_us(e) / 1e3 / steps} for e in ops[:top]]
    return rows, sum(self_us(e) for e in ops) / 1e3 / steps


def table(rows: Sequence[dict[str, Any]], self_total_ms: float, clock: str) -> str:
    lines = [f"| operator | calls / step | self {clock} ms / step | share of self time | total ms / step |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['calls']:.0f} | {r['self_ms']:.1f} | "
                     f"{100 * r['self_ms'] / self_total_ms:.1f}% | {r['total_ms']:.1f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    keep_heap_memory()  # as train.py does, unless NVAE_MALLOC=default or tcmalloc is loaded
    stepper, info = prepare(args, threads, allocator_name())
    for i in range(args.warmup):
        print(f"warm-up {i + 1}/{args.warmup}: {stepper.timed_step():.4f} s", flush=True)
    cuda = stepper.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    times = []
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            synchronize(stepper.device)
            start = time.perf_counter()
            stepper.forward_backward()
            stepper.optimizer_step()
            synchronize(stepper.device)
            times.append(time.perf_counter() - start)
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    phases = {name.split("::")[1]: by_name[name].cpu_time_total / 1e3 / args.steps for name in PHASES}
    rows, self_total = top_operators(events, args.steps, args.top, device_time=cuda)
    clock = "device" if cuda else "CPU"
    print(f"profiled {args.steps} step(s): median {statistics.median(times):.4f} s per step under the profiler")
    print("phases (ms / step): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(table(rows, self_total, clock))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace: {args.trace}")
    return {"config": " + ".join(args.config), "device": str(stepper.device), "threads": threads,
            "precision": info["precision"], "batch_size": info["batch_size"], "steps": args.steps,
            "checkpointing": args.checkpointing, "step_s": statistics.median(times), "phases_ms": phases,
            "clock": clock, "self_total_ms": self_total, "top": rows, "trace": args.trace}


def main(argv: Optional[Sequence[str]] = None) -> None:
    print(json.dumps(run(parse(argv))), flush=True)


if __name__ == "__main__":
    select_allocator("profile_step.py")  # NVAE_MALLOC, as train.py: may re-execute with tcmalloc preloaded
    main()
