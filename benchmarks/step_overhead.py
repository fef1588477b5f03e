"""Per-layer overhead of a training step: ATen operator calls per step, and step time at small and
large batches, with the kernel bank (batched weight normalization and power iteration, the default)
against the per-layer form, measured in the same run.

    python benchmarks/step_overhead.py [--config configs/<preset>.yaml ...] [--time configs/<preset>.yaml ...]
        [--batch-sizes 1 32] [--steps N] [--threads T] [--backends plain default] [--memory configs/<preset>.yaml]

Operator calls. One optimizer step as Lightning runs it (zero_grad, the regularized loss, backward,
Adamax; benchmarks/throughput.py's ``Stepper``) under a ``TorchDispatchMode`` that counts every ATen
call reaching the dispatcher below autograd, views excluded (they launch no kernel). On a GPU
each such call is a kernel launch of several microseconds whatever its size; the count is a
property of the code and the model, not of the machine or the batch (it is taken at batch 2).
``plain`` is ``model.arch.backend plain`` with the optimizer's masked update (what GPUs run),
``default`` the backend ``auto`` resolves to here (``cpu`` where the CPU backend imports) with the
CPU's update (torch's Adamax, whose per-parameter step counters are read on the host).

Step time. For each ``--time`` preset and batch size, two models (bank on, bank off) of the same
initial weights step in turn, one step each, ``--steps`` times after two warm-up steps each; the
medians and their ratio are printed (the ratio is the number to compare across machines). Threads
are set by ``--threads`` (default 1: on a shared machine more threads than free cores slow a step
3-60x).

The process runs with the allocator train.py would take (``NVAE_MALLOC``, default ``auto``: tcmalloc
where installed, else glibc keeping its heap; :mod:`nvae.allocator`): under glibc's defaults every
step faults in fresh pages for its large temporaries, which weighs on the stacked kernels most.

Memory. For each ``--memory`` preset, backend and form, a fresh process builds the step, runs 3 steps
at the first of ``--batch-sizes`` and reports its peak resident set size (``ru_maxrss``: the
interpreter and libraries included, so compare the two forms, not the absolute figures).

The last line of stdout is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from nvae.allocator import allocator_name, keep_heap_memory, select_allocator  # noqa: E402 (no torch)

if __name__ == "__main__":
    select_allocator("step_overhead.py")  # as train.py: a re-execution with tcmalloc happens before torch loads

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import throughput  # noqa: E402

DEFAULT_COUNT = ("configs/quickstart.yaml", "configs/mnist.yaml", "configs/cifar10.yaml")
DEFAULT_TIME = ("configs/quickstart.yaml", "configs/mnist.yaml")


class OperatorCount(TorchDispatchMode):
    """Counts ATen calls by name (views excluded) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[dict] = None) -> Any:
        if not func.is_view:
            self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def stepper(config: str, backend: str, batched: bool, batch_size: int, seed: int = 0) -> throughput.Stepper:
    """A training step of ``config`` (the project's CLI builds it) with the kernel bank on or off."""
    torch.manual_seed(seed)
    cli = throughput.build([config], None, plain=["ops"] if backend == "plain" else [])
    module = cli.model.train()
    module.model.kernel_bank.batched = batched
    x = throughput.random_batch(cli.datamodule.image_spec, batch_size, torch.device("cpu"))
    step = throughput.Stepper(module, x, "32")
    step.optimizer.masked = backend == "plain"  # GPUs cancel skipped updates by arithmetic, the CPU reads the flag
    return step


def count_step(step: throughput.Stepper) -> collections.Counter[str]:
    """Operator calls of one full step, after two untimed ones (the first runs 10x power iterations)."""
    for _ in range(2):
        step.forward_backward()
        step.optimizer_step()
    with OperatorCount() as counter:
        step.forward_backward()
        step.optimizer_step()
    return counter.calls


def time_pair(config: str, batch_size: int, steps: int) -> dict[str, Any]:
    """Median step seconds with the bank on and off, stepping in turn (same weights at the start)."""
    pair = {name: stepper(config, "default", name == "batched", batch_size) for name in ("batched", "per_layer")}
    times: dict[str, list[float]] = {name: [] for name in pair}
    for i in range(steps + 2):
        for name, step in pair.items():
            seconds = step.timed_step()
            if i >= 2:
                times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"config": config, "batch_size": batch_size, **{f"{k}_s": v for k, v in medians.items()},
            "ratio": medians["batched"] / medians["per_layer"]}


def peak_rss_mb(config: str, backend: str, batched: bool, batch_size: int, steps: int, threads: int) -> int:
    """Peak resident memory (MB) of a fresh process that builds the step and runs ``steps`` of it."""
    code = ("import resource, sys, torch; sys.path.insert(0, sys.argv[1]); import step_overhead as s; s.keep_heap_memory(); "
            "torch.set_num_threads(int(sys.argv[7])); "
            "step = s.stepper(sys.argv[2], sys.argv[3], sys.argv[4] == '1', int(sys.argv[5])); "
            "[step.timed_step() for _ in range(int(sys.argv[6]))]; "
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks"), config, backend, str(int(batched)),
                          str(batch_size), str(steps), str(threads)], capture_output=True, text=True, check=True)
    return int(out.stdout.split("RSS")[-1])


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=None, help=f"presets to count (default: {', '.join(DEFAULT_COUNT)})")
    p.add_argument("--time", action="append", default=None, help=f"presets to time (default: {', '.join(DEFAULT_TIME)}); "
                   "--time none skips timing")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes to time")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model and batch size")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--backends", nargs="+", default=["plain", "default"], choices=["plain", "default"])
    p.add_argument("--memory", action="append", default=[], help="presets whose peak resident memory to measure "
                   "(3 steps at the first --batch-sizes, one fresh process per backend and form)")
    args = p.parse_args(argv)
    keep_heap_memory()  # as train.py does; a no-op where select_allocator preloaded tcmalloc
    torch.set_num_threads(args.threads)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, threads {args.threads}, torch {torch.__version__}, "
          f"allocator {allocator_name()}")
    result: dict[str, Any] = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
                              "allocator": allocator_name(), "counts": [], "times": []}
    print(f"{'operator calls per step':<28}{'backend':>9}{'per layer':>11}{'batched':>9}{'ratio':>7}  most frequent (batched)")
    for config in args.config or DEFAULT_COUNT:
        for backend in args.backends:
            counts = {name: count_step(stepper(config, backend, name == "batched", 2))
                      for name in ("per_layer", "batched")}
            totals = {name: sum(c.values()) for name, c in counts.items()}
            top = ", ".join(f"{n} {v}" for n, v in counts["batched"].most_common(4))
            print(f"{Path(config).stem:<28}{backend:>9}{totals['per_layer']:>11,}{totals['batched']:>9,}"
                  f"{totals['batched'] / totals['per_layer']:>7.2f}  {top}")
            result["counts"].append({"config": config, "backend": backend, **totals,
                                     "top_batched": dict(counts["batched"].most_common(10))})
    timed = [] if args.time == ["none"] else (args.time or DEFAULT_TIME)
    if timed:
        print(f"{'step seconds (default backend)':<32}{'batch':>6}{'per layer':>11}{'batched':>9}{'ratio':>7}")
    for config in timed:
        for batch_size in args.batch_sizes:
            row = time_pair(config, batch_size, args.steps)
            print(f"{Path(config).stem:<32}{batch_size:>6}{row['per_layer_s']:>11.4f}{row['batched_s']:>9.4f}"
                  f"{row['ratio']:>7.3f}")
            result["times"].append(row)
    if args.memory:
        print(f"{'peak resident memory, MB':<28}{'backend':>9}{'batch':>6}{'per layer':>11}{'batched':>9}")
    for config in args.memory:
        for backend in args.backends:
            mb = {name: peak_rss_mb(config, backend, name == "batched", args.batch_sizes[0], 3, args.threads)
                  for name in ("per_layer", "batched")}
            print(f"{Path(config).stem:<28}{backend:>9}{args.batch_sizes[0]:>6}{mb['per_layer']:>11,}{mb['batched']:>9,}")
            result.setdefault("memory", []).append({"config": config, "backend": backend,
                                                    "batch_size": args.batch_sizes[0], **{f"{k}_mb": v for k, v in mb.items()}})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
