"""One CUDA device, every paper preset, one table, in under 8 minutes: training steps/s, images/s and
peak memory in float32, bf16-mixed and bf16-mixed + torch.compile, sampling images/s, and the tests
marked ``cuda``.

    python benchmarks/gpu.py [--device auto|cuda|cuda:N|cpu] [--presets mnist cifar10 ...]
        [--deadline 7.5] [--warmup 2] [--steps 3] [--sample-steps 2] [--compile | --no-compile]
        [--no-tests] [--threads T] [--tiny]

What is measured. First ``pytest -m cuda`` runs in a subprocess (tests/test_cuda.py: a CUDA step
computes the CPU step) and its passed / failed / skipped counts are printed. Then each preset
(mnist, cifar10, celeba64, imagenet32, celebahq256, ffhq256) is built and stepped as
``benchmarks/throughput.py`` does (:func:`throughput.prepare`, :class:`throughput.Stepper`: the
model of ``train.py fit``, random batches of the preset's shape, zero_grad + regularized loss +
backward + Adamax step, the device synchronized around each step), at its per-GPU batch (its
``data.batch_size``) with channels_last on. Per preset, ``--warmup`` untimed and ``--steps`` timed
steps in float32 (PyTorch's defaults, as ``train.py``: cuDNN convolutions in TF32 on Ampere and
later, which the header says), then the same in bf16-mixed (``torch.autocast``) on the same model
with a fresh optimizer, then ``--sample-steps`` sampling passes of a batch from the prior
(bf16-mixed, t = 1) after an untimed one. The model then waits in host memory; once every preset has
these rows, each comes back in turn, is compiled (``model.compile()``, what ``--model.compile true``
does) and stepped in bf16-mixed, its warm-up (the compilation included) reported on its own. A row
gives the median step as steps/s and images/s, the warm-up's seconds and the peak memory:
``torch.cuda.max_memory_allocated`` since the row began; on CPU the process's peak resident set so
far (it cannot be reset, so only the first row's is its own).

The time is budgeted: a global ``--deadline`` (minutes, default 7.5) is checked before each row and
fires as a signal inside one, a compilation included; the rows it stops or never starts say so.
The compile rows come last because a compilation takes minutes (the quickstart's 136 s on 2 CPU
cores). A CUDA out-of-memory error fills its row with OOM, the memory is freed and the next row
runs. The exit status is 1 when a CUDA test failed or a row ended in another error.

``--device cpu --tiny`` runs the same rows on the quickstart model with the debug overlay (batch 2,
one warm-up and one timed step) in well under a minute, for CI; on CPU the compile row is left out
unless ``--compile`` asks for it. The last line of stdout is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's nvae; throughput.py

from nvae.allocator import allocator_name, keep_heap_memory, select_allocator  # noqa: E402 (no torch)

if __name__ == "__main__":
    select_allocator("gpu.py")  # NVAE_MALLOC as train.py; a re-execution with tcmalloc happens before torch loads
START = time.monotonic()  # as a script, the deadline counts from here

import torch  # noqa: E402

import throughput  # noqa: E402
from throughput import Stepper, default_threads, device_name, peak_memory_mb, random_batch  # noqa: E402

from nvae.cli.common import resolve_device  # noqa: E402
from nvae.cli.parsers import device_arg  # noqa: E402
from nvae.presets import preset_names, preset_path  # noqa: E402

PRESETS = ("mnist", "cifar10", "celeba64", "imagenet32", "celebahq256", "ffhq256")
TINY = ("quickstart", "debug")  # the quickstart model, with the debug overlay's batch of 2
EAGER = (("float32", "32"), ("bf16-mixed", "bf16-mixed"))
COMPILED, SAMPLING = "bf16-mixed + compile", "sampling (bf16-mixed)"
MODES = (*(m for m, _ in EAGER), COMPILED, SAMPLING)
COLUMNS = ("preset", "batch", "mode", "steps/s", "images/s", "peak MiB", "warm-up s", "note")
RESERVE_S = 10.0  # left at the deadline to free memory and print
MIN_ROW_S = {"eager": 15.0, "compile": 60.0}  # a row does not start with less time than this left


class Deadline(BaseException):
    """Raised by the deadline's signal; a BaseException, so that no ``except Exception`` swallows it."""


class Clock:
    """The global deadline: seconds left, and an alarm that interrupts a row when they run out."""

    def __init__(self, seconds: float, start: Optional[float] = None) -> None:
        self.start, self.seconds, self.expired = time.monotonic() if start is None else start, seconds, False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - RESERVE_S - self.elapsed()

    @contextmanager
    def alarm(self) -> Iterator[None]:
        if not hasattr(signal, "setitimer"):  # not on POSIX: rows are only checked before they start
            yield
            return

        def ring(signum: int, frame: Any) -> None:
            self.expired = True
            raise Deadline()

        previous = signal.signal(signal.SIGALRM, ring)
        # Then again every second: an exception raised inside a weakref callback or __del__ is
        # printed and dropped (seen within torch.compile), so the signal repeats until one gets out.
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01), 1.0)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", type=device_arg, help="auto (cuda if available), cuda, cuda:1, cpu")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=[n for n in preset_names() if n != TINY[1]],
                   metavar="NAME",
                   help=f"presets to measure (default: {' '.join(PRESETS)})")
    p.add_argument("--deadline", type=float, default=7.5, help="minutes for everything (default 7.5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row (the compilation's included)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (>= 1)")
    p.add_argument("--sample-steps", type=int, default=2, help="timed sampling passes (>= 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="the bf16-mixed + torch.compile rows (default: on CUDA, not on CPU)")
    p.add_argument("--no-tests", dest="tests", action="store_false", help="do not run pytest -m cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the affinity mask's)")
    p.add_argument("--tiny", action="store_true",
                   help="the quickstart model with the debug overlay, 1 warm-up + 1 timed step (CI)")
    args = p.parse_args(argv)
    if args.tiny:
        args.presets, args.warmup, args.steps, args.sample_steps = [TINY[0]], 1, 1, 1
    if args.steps < 1 or args.sample_steps < 1 or args.warmup < 0 or args.deadline <= 0:
        p.error("--steps and --sample-steps must be >= 1, --warmup >= 0, --deadline > 0")
    return args


def run_tests(clock: Clock) -> dict[str, Any]:
    """``pytest -m cuda`` in a subprocess: its counts, exit status and seconds."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    start = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=max(min(180.0, clock.left() - 60.0), 10.0))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": round(time.monotonic() - start, 1)}
    lines = proc.stdout.strip().splitlines()
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", lines[-1] if lines else ""):
        counts["errors" if word.startswith("error") else word] += int(n)
    if proc.returncode not in (0, 5):  # 5: no test selected
        print("\n".join(lines[-30:]) or proc.stderr[-3000:])
    return {"status": "ran", **counts, "returncode": proc.returncode, "seconds": round(time.monotonic() - start, 1)}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def guarded(clock: Clock, kind: str, device: torch.device, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()`` under the deadline's alarm; OOM, the deadline and other errors become the row's status."""
    if clock.expired or clock.left() < MIN_ROW_S[kind]:
        return {"status": "skipped", "note": f"deadline: {max(clock.left(), 0):.0f} s left"}
    free_memory(device)
    try:
        with clock.alarm():
            row = measure()
    except torch.OutOfMemoryError:
        row = {"status": "OOM", "note": "CUDA out of memory"}
    except Deadline:
        row = {"status": "skipped", "note": "deadline reached in this row"}
    except Exception as err:  # noqa: BLE001 (a compiler's failure wraps OOM; the other rows still run)
        oom = "out of memory" in str(err)
        first = (str(err).splitlines() or [""])[0][:120]
        row = {"status": "OOM" if oom else "error", "note": f"{type(err).__name__}: {first}"}
    if clock.expired and row.get("status") == "ok":  # a compiler that caught the signal: not a measurement
        row = {"status": "skipped", "note": "deadline reached in this row"}
    free_memory(device)  # after the except clauses: the traceback's tensors are gone
    return row


def train_row(stepper: Stepper, batch: int, warmup: int, steps: int, clock: Clock) -> dict[str, Any]:
    """Warm-up steps (timed together), then timed steps: their median as steps/s and images/s."""
    start = time.perf_counter()
    for _ in range(warmup):
        stepper.timed_step()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        times.append(stepper.timed_step())
        if clock.left() < 2 * times[-1]:  # fewer timed steps rather than a missed deadline
            break
    stepper.module.zero_grad(set_to_none=True)
    median = statistics.median(times)
    return {"status": "ok", "steps_per_s": 1 / median, "images_per_s": batch / median,
            "peak_mem_mb": peak_memory_mb(stepper.device), "warmup_s": warmup_s, "step_s_all": times}


def sample_row(module: Any, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    bf16 = partial(torch.autocast, device.type, torch.bfloat16)
    seconds = throughput.time_sampling(module, batch, steps, device, bf16)
    return {"status": "ok", "images_per_s": batch / seconds, "peak_mem_mb": peak_memory_mb(device)}


def eager_rows(preset: str, args: argparse.Namespace, device: torch.device, clock: Clock, bf16: bool,
               rows: dict[tuple[str, str], dict[str, Any]]) -> Optional[tuple[Any, dict[str, Any]]]:
    """Build ``preset``; fill its float32, bf16-mixed and sampling rows; return its model and summary
    (None when it could not be built: then every row of it says why)."""
    configs = [str(preset_path(n)) for n in (TINY if args.tiny else (preset,))]
    argv = [a for c in configs for a in ("--config", c)] + ["--device", str(device), "--precision", "32",
                                                              "--channels-last"]
    built: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        built["stepper"], built["info"] = throughput.prepare(throughput.parse_args(argv), args.threads,
                                                             allocator_name())
        return {"status": "ok"}

    status = guarded(clock, "eager", device, build)
    if status["status"] != "ok":
        rows.update({(preset, m): dict(status) for m in MODES})
        return None
    first, info = built.pop("stepper"), built.pop("info")  # the float32 step
    module, x, batch = first.module, first.x, info["batch_size"]
    no_bf16 = {"status": "skipped", "note": "this GPU has no bf16"}
    for mode, precision in EAGER:
        step, first = first or Stepper(module, x, precision), None  # each row's optimizer state goes with it
        measure = partial(train_row, step, batch, args.warmup, args.steps, clock)
        rows[(preset, mode)] = guarded(clock, "eager", device, measure) if bf16 or precision == "32" else no_bf16
        del step, measure
        print(table_line(preset, batch, mode, rows[(preset, mode)]), flush=True)
    del x
    sampling = partial(sample_row, module, batch, args.sample_steps, device)
    rows[(preset, SAMPLING)] = guarded(clock, "eager", device, sampling) if bf16 else no_bf16
    print(table_line(preset, batch, SAMPLING, rows[(preset, SAMPLING)]), flush=True)
    return module, info


def compile_row(module: Any, batch: int, args: argparse.Namespace, device: torch.device,
                clock: Clock) -> dict[str, Any]:
    """The model back on the device, compiled as ``--model.compile true`` does (the forward pass, in
    place), stepped in bf16-mixed; at least one warm-up step, which compiles."""
    module.to(device).model.compile()
    stepper = Stepper(module, random_batch(module.spec, batch, device), "bf16-mixed")
    return train_row(stepper, batch, max(args.warmup, 1), args.steps, clock)


def run(args: argparse.Namespace, start: Optional[float] = None) -> tuple[dict[str, Any], int]:
    clock = Clock(args.deadline * 60, start)
    device = resolve_device(args.device)
    args.threads = args.threads or default_threads()
    torch.set_num_threads(args.threads)
    keep_heap_memory()  # as train.py does
    compiling = args.compile if args.compile is not None else device.type == "cuda"
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    name, tf32 = device_name(device), torch.backends.cudnn.allow_tf32  # PyTorch's default: TF32 convolutions
    where = (f"threads {args.threads}" if device.type == "cpu"
             else f"CUDA {torch.version.cuda}, TF32 convolutions {tf32}")
    header = f"{name} ({device}), torch {torch.__version__}, {where}"
    print(f"benchmarks/gpu.py: {header}; deadline {args.deadline:g} min", flush=True)

    tests = run_tests(clock) if args.tests else {"status": "not run (--no-tests)"}
    print(tests_line(tests), flush=True)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    parked: dict[str, Any] = {}  # preset -> its model, in host memory until its compile row
    info: dict[str, dict[str, Any]] = {}
    for preset in args.presets:
        built = eager_rows(preset, args, device, clock, bf16, rows)
        if built is not None:
            module, info[preset] = built
            parked[preset] = module.to("cpu") if compiling and bf16 else None
            del module, built
        free_memory(device)

    for preset, module in parked.items():
        if module is None:
            why = ("this GPU has no bf16" if not bf16 else "--no-compile" if args.compile is False
                   else "compile off on CPU (--compile to include it)")
            rows[(preset, COMPILED)] = {"status": "skipped", "note": why}
            continue
        batch = info[preset]["batch_size"]
        rows[(preset, COMPILED)] = guarded(clock, "compile", device, partial(compile_row, module, batch, args, device,
                                                                             clock))
        print(table_line(preset, batch, COMPILED, rows[(preset, COMPILED)]), flush=True)
        parked[preset] = module = None
        torch._dynamo.reset()  # drops the compiled graphs before the next preset
        free_memory(device)

    batches = {p: i["batch_size"] for p, i in info.items()}
    table = [f"{header}; per row {args.warmup} warm-up and {args.steps} timed step(s):", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += [table_line(p, batches.get(p), m, rows[(p, m)]) for p in args.presets for m in MODES]
    print("\n".join(["", *table, "", tests_line(tests), f"elapsed: {clock.elapsed():.0f} s"]), flush=True)
    result = {"device": str(device), "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn_tf32": tf32, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": args.threads, "tiny": args.tiny, "deadline_s": clock.seconds,
              "elapsed_s": round(clock.elapsed(), 1), "warmup": args.warmup, "steps": args.steps,
              "sample_steps": args.sample_steps, "tests": tests,
              "rows": [{"preset": p, "batch_size": batches.get(p), "params": info.get(p, {}).get("params"), "mode": m,
                        **rows[(p, m)]} for p in args.presets for m in MODES]}
    failed = (tests["status"] == "timeout" or tests.get("returncode", 0) not in (0, 5)
              or any(r["status"] == "error" for r in rows.values()))
    return result, int(bool(failed))


def tests_line(tests: dict[str, Any]) -> str:
    if tests["status"] != "ran":
        return f"pytest -m cuda: {tests['status']}"
    return (f"pytest -m cuda: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped, "
            f"{tests['errors']} errors in {tests['seconds']} s")


def table_line(preset: str, batch: Optional[int], mode: str, row: dict[str, Any]) -> str:
    def number(key: str, digits: int) -> str:
        return f"{row[key]:.{digits}f}" if row.get(key) is not None else "—"

    if row["status"] == "ok":
        cells = [number("steps_per_s", 2), number("images_per_s", 1), number("peak_mem_mb", 0), number("warmup_s", 1)]
    else:
        cells = [row["status"], "—", "—", "—"]
    return "| " + " | ".join([preset, str(batch or "—"), mode, *cells, row.get("note", "")]) + " |"


def main(argv: Optional[Sequence[str]] = None, start: Optional[float] = None) -> int:
    result, status = run(parse_args(argv), start)
    print(json.dumps(result), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(start=START))
