"""What each CPU-only mechanism of nvae is worth: its training step against the plain PyTorch path, same run.

    python benchmarks/mechanisms.py --config configs/mnist.yaml --batch-size 8 [--rounds 8] [--threads 2]
    python benchmarks/mechanisms.py --config configs/mnist.yaml --batch-size 8 --allocator [--steps 5]

Mechanisms: the CPU backend as a whole (``model.arch.backend``: nvae.accel.cpu), its fused
BN-Swish-conv chains alone (each layer its own node, the convolutions' CPU autograd kept), the
depthwise weight-gradient autotuner (against oneDNN's own kernel) and the allocator settings
(``NVAE_MALLOC``). The vectorized ELU and nvae's own Adamax were measured here too and removed
(docs/performance.md; commit 04750d2 has them).

On a shared 2-core machine a step's time drifts by tens of percent within minutes, more than most
of these effects, so the first four are timed in ONE process on one model: each round runs one step
of every variant, back to back, in a rotating order, and a variant's cost is the median over rounds
of its step time over the nvae step of the same round. The allocator cannot be switched inside a
process: ``--allocator`` runs two copies of benchmarks/throughput.py at the same time, one thread
each on cores 0 and 1, nvae's setting against glibc's default, then again with the cores swapped,
and reports the ratio of the two pairings' medians (the geometric mean of both).

The last line of stdout is JSON; the lines before it are a Markdown table with the CPU capability.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import throughput  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from nvae import cells  # noqa: E402
from nvae.accel import install  # noqa: E402
from nvae.accel.cpu.depthwise import WEIGHT_GRAD_METHODS  # noqa: E402
from nvae.ops import BNConvStep, bn_swish_conv  # noqa: E402
from nvae.allocator import REEXECUTED, keep_heap_memory, preloads  # noqa: E402

Switch = tuple[Callable[[], None], Callable[[], None]]  # (to the plain path, back to nvae's)


def switches(stepper: throughput.Stepper) -> dict[str, Switch]:
    """Each mechanism's way to the plain path and back, on the stepper's live model."""
    model = stepper.module.model

    def fixed_depthwise(method: Optional[int]) -> None:
        WEIGHT_GRAD_METHODS.fixed = method

    def layer_by_layer(x: torch.Tensor, *steps: BNConvStep) -> torch.Tensor:
        for bn, swish, conv in steps:  # each layer its own autograd node; the convolutions keep their CPU autograd
            x = conv(F.silu(bn(x)) if swish else bn(x))
        return x

    return {
        "backend plain (no CPU backend)": (lambda: install(model, "plain"), lambda: install(model, "cpu")),
        "BN-Swish-conv chains layer by layer (weight norm, tokens, NHWC depthwise kept)": (
            lambda: setattr(cells, "bn_swish_conv", layer_by_layer), lambda: setattr(cells, "bn_swish_conv", bn_swish_conv)),
        "oneDNN depthwise weight gradient (no autotuner)": (lambda: fixed_depthwise(0), lambda: fixed_depthwise(None)),
    }


def in_process(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    keep_heap_memory()  # as train.py does (unless NVAE_MALLOC says otherwise)
    targs = throughput.parse_args(["--config", *args.config[:1], *[a for c in args.config[1:] for a in ("--config", c)],
                                   "--batch-size", str(args.batch_size), "--device", "cpu", "--threads",
                                   str(args.threads)])
    stepper, info = throughput.prepare(targs, args.threads, "as configured")
    variants = {"nvae": (lambda: None, lambda: None), **switches(stepper)}
    for name, (plain, back) in variants.items():  # warm-up: first steps (autotuning, 10x power iterations) untimed
        plain()
        for _ in range(args.warmup):
            stepper.timed_step()
        back()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no variant always first
            plain, back = variants[name]
            plain()
            times[name].append(stepper.timed_step())
            back()
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{t[-1]:.3f}" for t in times.values()), flush=True)
    base = times["nvae"]
    rows = []
    for name, t in times.items():
        ratio = statistics.median(v / b for v, b in zip(t, base))
        rows.append({"variant": name, "step_s": statistics.median(t), "ratio": ratio,
                     "saved": 1 - 1 / ratio, "steps": t})
    return {"config": " + ".join(args.config), "batch_size": info["batch_size"], "threads": args.threads,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rounds": args.rounds, "rows": rows}


def allocator_pair(args: argparse.Namespace) -> dict[str, Any]:
    """nvae's allocator setting and glibc's default at the same time, one core each, then swapped."""
    cmd = [sys.executable, str(HERE / "throughput.py"), *[a for c in args.config for a in ("--config", c)],
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", "1", "--device", "cpu", "--sample-steps", "0"]

    def env(mode: str) -> dict[str, str]:
        e = dict(os.environ, NVAE_MALLOC=mode)
        e.pop(REEXECUTED, None)
        if mode == "default":
            e["LD_PRELOAD"] = ":".join(p for p in preloads(e) if "tcmalloc" not in p)
        return e

    pairings = []
    for cores in ((0, 1), (1, 0)):
        procs = {mode: subprocess.Popen(["taskset", "-c", str(core), *cmd], stdout=subprocess.PIPE, text=True,
                                        stderr=subprocess.DEVNULL, env=env(mode))
                 for mode, core in zip(("auto", "default"), cores)}
        out = {mode: json.loads(p.communicate()[0].strip().splitlines()[-1]) for mode, p in procs.items()}
        pairings.append(out)
        print(f"cores {cores}: nvae ({out['auto']['allocator']}) {out['auto']['step_s']:.3f} s, "
              f"glibc default {out['default']['step_s']:.3f} s", flush=True)
    ratio = statistics.geometric_mean(p["default"]["step_s"] / p["auto"]["step_s"] for p in pairings)
    return {"config": " + ".join(args.config), "batch_size": args.batch_size, "threads": 1,
            "cpu_capability": pairings[0]["auto"]["cpu_capability"],
            "rows": [{"variant": f"glibc default (nvae: {pairings[0]['auto']['allocator']})", "ratio": ratio,
                      "saved": 1 - 1 / ratio, "step_s": statistics.median(p["default"]["step_s"] for p in pairings),
                      "nvae_step_s": statistics.median(p["auto"]["step_s"] for p in pairings)}]}


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['config']}, batch {result['batch_size']}, {result['threads']} thread(s), CPU capability "
             f"{result['cpu_capability']}, torch {torch.__version__}",
             "| plain path instead of nvae's | s / step | step vs nvae's (median of same-round ratios) | "
             "share of the plain step nvae saves |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['step_s']:.3f} | {r['ratio']:.3f} | {100 * r['saved']:.1f}% |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", required=True, help="preset YAML (repeat for overlays)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8, help="rounds of one step per variant (in-process mode)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allocator", action="store_true", help="the allocator pairing instead (two processes)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (--allocator)")
    args = p.parse_args(argv)
    result = allocator_pair(args) if args.allocator else in_process(args)
    print(table(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
