"""Data-parallel scaling on CPU: training images/s of P DDP processes x T threads vs one process.

    python benchmarks/ddp_scaling.py --config configs/quickstart.yaml --batch-size 32
        [--processes 1 2] [--threads 1] [--steps 5] [--warmup 2]

Each setting runs Lightning's own ``Trainer(strategy="ddp", accelerator="cpu", devices=P)`` (gloo,
one OS process per rank, launched by Lightning) in a fresh interpreter, on random images of the
preset's shape; the per-process batch is fixed (weak scaling), so the global batch is P x batch.
A callback on rank 0 times each optimizer step (forward, backward with DDP's gradient all-reduce,
Adamax, the scalar all-reduce of the logged metrics); the median after ``--warmup`` steps is
reported, with rank 0's peak resident memory. Linear scaling means images/s grows P times: ``efficiency`` is the speed-up over the
first setting divided by the ratio of process counts. Use no more processes x threads than idle
cores, or the numbers measure contention, not scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

HERE = Path(__file__).resolve().parent


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", required=True, help="preset YAML (repeat for overlays)")
    p.add_argument("--batch-size", type=int, default=32, help="images per process per step")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one setting
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.threads < 1 or args.steps < 1 or args.warmup < 0 or min(args.processes) < 1:
        p.error("--batch-size, --threads, --steps and --processes must be >= 1, --warmup >= 0")
    return args


def worker(args: argparse.Namespace, processes: int) -> None:
    """One setting: Lightning DDP with ``processes`` ranks; rank 0 prints one JSON line."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(HERE))
    from throughput import build, random_batch

    torch.set_num_threads(args.threads)
    from nvae.allocator import keep_heap_memory

    keep_heap_memory()  # as train.py does; a no-op where select_allocator (below) preloaded tcmalloc

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
            self.times.append(time.perf_counter() - self._start)

    cli = build(args.config, channels_last=None)  # the preset's layout, as train.py runs it
    spec = cli.datamodule.image_spec
    total = args.warmup + args.steps
    images = random_batch(spec, args.batch_size * processes * total, torch.device("cpu"))
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=processes, strategy="ddp", max_steps=total, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(cli.model, DataLoader(images, batch_size=args.batch_size, shuffle=False))
    if trainer.global_rank == 0:
        step = statistics.median(timer.times[args.warmup:])
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # rank 0's peak resident set (Linux: KiB)
        print(json.dumps({"processes": processes, "threads": args.threads, "batch_per_process": args.batch_size,
                          "step_s": step, "images_per_s": processes * args.batch_size / step,
                          "peak_mem_mb": peak_mb}), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args, args.worker)
        return
    rows = []
    for processes in args.processes:
        cmd = [sys.executable, __file__, *sum((["--config", c] for c in args.config), []),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--worker", str(processes)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{processes} process(es) failed:\n{proc.stderr.strip()[-2000:]}")
        rows.append(json.loads(lines[-1]))
        print(f"{processes} process(es) x {args.threads} thread(s): {rows[-1]['step_s']:.3f} s/step, "
              f"{rows[-1]['images_per_s']:.1f} images/s", flush=True)
    base = rows[0]
    print(f"{' + '.join(args.config)}, {args.batch_size} images per process, median of {args.steps} steps")
    print("| processes x threads | global batch | s / step | images/s | speed-up | efficiency | peak memory per process |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = r["images_per_s"] / base["images_per_s"]
        r["efficiency"] = speedup / (r["processes"] / base["processes"])
        print(f"| {r['processes']} x {r['threads']} | {r['processes'] * r['batch_per_process']} | {r['step_s']:.3f} | "
              f"{r['images_per_s']:.1f} | {speedup:.2f}x | {r['efficiency']:.0%} | {r['peak_mem_mb'] / 1024:.2f} GiB |")
    print(json.dumps(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    from nvae.allocator import select_allocator

    select_allocator("ddp_scaling.py")  # NVAE_MALLOC, as train.py; workers inherit LD_PRELOAD
    main()
