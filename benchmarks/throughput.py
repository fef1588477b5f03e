"""Training throughput of an NVAE preset: seconds per optimizer step, images/s, peak memory, FLOPs.

    python benchmarks/throughput.py --config configs/<preset>.yaml --batch-size B --steps N
        [--config configs/<overlay>.yaml ...] [--device D] [--warmup W] [--threads T]
        [--precision 32|bf16-mixed|16-mixed] [--channels-last | --no-channels-last]

What is measured. The model is built exactly as ``train.py fit`` builds it: the YAML files go
through the project's command line (:class:`nvae.cli.train.NVAECLI`, parsed and instantiated but not
run, with the logger off so nothing is written), so the architecture, the regularizers and the
data module's ``image_spec`` (linked into the model) are those of a real run. Batches are random
images of the preset's shape on its n-bit grid (no data on disk is read). One step is what the
Lightning training loop does per batch: ``zero_grad``, the regularized loss of
:meth:`nvae.lightning.NVAEModule.training_loss` (under ``torch.autocast`` for mixed precision),
``backward`` (through a ``GradScaler`` for ``16-mixed`` on CUDA) and an Adamax step (the
optimizer of ``configure_optimizers``, without the learning-rate scheduler, which needs a
trainer); CUDA is synchronized before the clock stops. ``--warmup`` steps (default 2) run
untimed, then ``--steps`` timed steps; the median is reported. One more untimed step runs under
``torch.utils.flop_counter.FlopCounterMode`` to count the FLOPs of a forward + backward pass
(matmuls and convolutions, 2 per multiply-add; elementwise work, normalization and the optimizer
are not counted; the backward of grouped convolutions is counted with a corrected formula, see
:func:`conv_backward_flops`), so ``achieved_tflops`` is ``flops_per_step / step_s``. Peak memory is
the process's peak resident set size on CPU (``ru_maxrss``; it includes the Python interpreter and
libraries) and
``torch.cuda.max_memory_allocated`` on CUDA. ``--steps 0`` only builds the model (on the meta
device, so even the 330M-parameter presets take seconds) and reports its parameter count.

The last line of stdout is one JSON object (``config``, ``device``, ``threads``, ``precision``,
``channels_last``, ``batch_size``, ``params``, ``step_s``, ``step_s_all``, ``train_images_per_s``,
``peak_mem_mb``, ``flops_per_step``, ``achieved_tflops``); the lines before it are for people.
Several ``--config`` files are reported as one string joined by " + ".

The numbers need a quiet machine. ``--threads`` defaults to the CPUs this process may run on
(``os.sched_getaffinity``); when other processes hold some of those cores, PyTorch's intra-op
threads wait on each other and a step gets 3-60x slower, so on a shared machine pass
``--threads`` no larger than the number of idle cores, and compare only numbers taken on the same
machine, with the same thread count, under the same load.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence
from unittest import mock

import torch
from torch.profiler import record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark this checkout's nvae, installed or not

from nvae.cli.common import resolve_device  # noqa: E402
from nvae.cli.parsers import device_arg  # noqa: E402
from nvae.cli.train import NVAECLI  # noqa: E402
from nvae.compat import conv_backward  # noqa: E402
from nvae.data import ImageDataModule  # noqa: E402
from nvae.lightning import NVAEModule  # noqa: E402
from nvae.model import CHECKPOINT_MODES  # noqa: E402
from nvae.optim import Adamax  # noqa: E402
from nvae.accel.cpu.depthwise import WEIGHT_GRAD_METHODS  # noqa: E402
from nvae.allocator import allocator_name, keep_heap_memory, select_allocator  # noqa: E402
from nvae.spec import ImageSpec  # noqa: E402

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
PLAIN_CHOICES = ("ops", "depthwise")  # --plain: the mechanisms benchmarks/options.py weighs
PHASES = ("nvae::forward", "nvae::backward", "nvae::optimizer")  # forward includes the regularizers' forward
# Lightning spellings of the precisions above (a preset's trainer.precision may use any of them).
_PRECISION_ALIASES = {"32": "32", "32-true": "32", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
                      "16": "16-mixed", "16-mixed": "16-mixed"}


def default_threads() -> int:
    """CPUs this process may run on (its affinity mask), or os.cpu_count() where that is unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    """The options of a benchmarked step (benchmarks/profile_step.py adds its own to them)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True,
                   help="preset YAML; repeat to add overlays (applied in order, as with train.py)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: the preset's data.batch_size)")
    p.add_argument("--steps", type=int, default=10, help="timed steps; 0 only counts the parameters")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--device", default="auto", type=device_arg, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: CPUs in this process's affinity mask)")
    p.add_argument("--precision", default=None, choices=sorted(_PRECISION_ALIASES),
                   help="32, bf16-mixed or 16-mixed (default: the preset's trainer.precision)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="build with model.channels_last=true (--no-channels-last: false; "
                        "default: the preset's setting)")
    p.add_argument("--checkpointing", nargs="?", const="group", default=None,
                   choices=[m for m in CHECKPOINT_MODES if m != "none"],
                   help="build with model.gradient_checkpointing=MODE (activation checkpointing per latent group "
                        "and cell stack, the default, or per cell)")
    p.add_argument("--compile", action="store_true",
                   help="build with model.compile=true (torch.compile of the forward pass)")
    p.add_argument("--plain", action="append", default=[], choices=PLAIN_CHOICES,
                   help="replace one CPU mechanism by the plain PyTorch path (repeatable): ops = "
                        "model.arch.backend plain (no CPU backend), depthwise = "
                        "oneDNN's own depthwise weight gradient (no choice by timing)")
    p.add_argument("--sample-steps", type=int, default=3,
                   help="timed sampling passes of batch-size images (eval mode, temperature 1); 0 skips")
    return p


def parse_args(argv: Optional[Sequence[str]] = None,
               parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    p = parser or build_parser()
    args = p.parse_args(argv)
    if args.steps < 0 or args.warmup < 0:
        p.error("--steps and --warmup must be >= 0")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def build(configs: Sequence[str], channels_last: Optional[bool], meta: bool = False,
          checkpointing: Optional[str] = None, compile: bool = False, plain: Sequence[str] = ()) -> NVAECLI:
    """Parse and instantiate the presets through the project's CLI, without running anything.

    The logger is switched off so no log directory is created; ``meta`` builds the model on the
    meta device (parameter shapes only, no memory, no initialization cost).
    """
    args = [a for c in configs for a in ("--config", str(c))]
    args.append("--trainer.logger=false")
    if channels_last is not None:  # else the preset's setting
        args.append(f"--model.channels_last={str(channels_last).lower()}")
    if checkpointing:
        args.append(f"--model.gradient_checkpointing={checkpointing}")
    if compile:
        args.append("--model.compile=true")
    if "ops" in plain:
        args.append("--model.arch.backend=plain")
    # LightningCLI warns when it is given args while sys.argv has some: they are this script's own.
    with torch.device("meta") if meta else nullcontext(), mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = NVAECLI(NVAEModule, ImageDataModule, subclass_mode_data=True, run=False, args=args,
                      auto_configure_optimizers=False)
    spec: ImageSpec = cli.datamodule.image_spec
    if cli.model.spec != spec:
        raise RuntimeError(f"the data module's image_spec {spec} did not reach the model ({cli.model.spec})")
    WEIGHT_GRAD_METHODS.fixed = 0 if "depthwise" in plain else None  # 0: oneDNN's kernel on all channels
    return cli


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def resolve_precision(requested: Optional[str], cli: NVAECLI, device: torch.device) -> str:
    """The precision to run in: ``requested``, else the preset's trainer.precision, as in PRECISIONS."""
    raw = requested if requested is not None else str(cli.config.get("trainer", {}).get("precision") or "32")
    if raw not in _PRECISION_ALIASES:
        raise SystemExit(f"precision {raw!r} is not benchmarked; use --precision one of {', '.join(PRECISIONS)}")
    precision = _PRECISION_ALIASES[raw]
    if precision == "16-mixed" and device.type == "cpu":  # Lightning refuses this too
        raise SystemExit("16-mixed (fp16 AMP) is not supported on CPU; use --precision bf16-mixed")
    return precision


def random_batch(spec: ImageSpec, batch_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] on the spec's n-bit grid, as the data modules produce them."""
    levels = 2 ** spec.num_bits
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (batch_size, spec.channels, spec.size, spec.size), generator=g)
    return (x.float() / (levels - 1)).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Stepper:
    """One training step of NVAEModule as Lightning runs it, without a trainer."""

    def __init__(self, module: NVAEModule, x: torch.Tensor, precision: str) -> None:
        h = module.optim
        self.module, self.device = module, x.device
        self.x = module._prepare(x)  # channels_last input when the module asks for it, as training_step does
        self.optimizer = Adamax(module.parameters(), lr=h.learning_rate, weight_decay=h.weight_decay,
                                eps=h.adamax_eps)  # as NVAEModule.configure_optimizers
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" and x.device.type == "cuda" else None

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward_backward(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with record_function(PHASES[0]), self._autocast():  # labels for torch.profiler (profile_step.py)
            loss = self.module.training_loss(self.x)[0]
        with record_function(PHASES[1]):
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss

    def optimizer_step(self) -> None:
        with record_function(PHASES[2]):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()

    def timed_step(self) -> float:
        """Seconds of one full step (zero_grad, forward, backward, optimizer step), device synchronized."""
        synchronize(self.device)
        start = time.perf_counter()
        self.forward_backward()
        self.optimizer_step()
        synchronize(self.device)
        return time.perf_counter() - start

    def count_flops(self) -> int:
        """FLOPs of one forward + backward pass (an extra, untimed step)."""
        from torch.utils.flop_counter import FlopCounterMode

        mapping = {conv_backward: conv_backward_flops}
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            self.forward_backward()
        self.optimizer_step()
        synchronize(self.device)
        return int(counter.get_total_flops())


def conv_backward_flops(grad_out_shape: Sequence[int], x_shape: Sequence[int], w_shape: Sequence[int],
                        bias: Any, stride: Any, padding: Any, dilation: Any, transposed: bool,
                        output_padding: Any, groups: int, output_mask: Sequence[bool], **kwargs: Any) -> int:
    """FLOPs of ``aten.convolution_backward``: the forward's FLOPs for each of grad_input and grad_weight.

    Replaces torch's formula, whose grad_weight term ignores ``groups`` (pytorch/pytorch PR #183405)
    and so counts a depthwise convolution's weight gradient ``channels`` times over; NVAE's decoder
    cells are built around depthwise 5x5 convolutions, which made the total ~25x too large.
    Both gradients of a convolution are convolutions with the forward's multiply-adds.
    """
    spatial = (x_shape if transposed else grad_out_shape)[2:]  # positions the kernel visits
    forward = 2 * x_shape[0] * math.prod(spatial) * math.prod(w_shape)  # w: (C_out, C_in / groups, *k)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors on CUDA; peak resident set size of the process otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}"


@torch.no_grad()
def time_sampling(module: NVAEModule, batch_size: int, steps: int, device: torch.device,
                  autocast: Any) -> Optional[float]:
    """Median seconds to draw ``batch_size`` images from the prior (eval mode, t = 1), or None."""
    if steps <= 0:
        return None
    module.eval()
    times = []
    for i in range(steps + 1):  # the first pass is a warm-up
        synchronize(device)
        start = time.perf_counter()
        with autocast():
            module.model.sample(batch_size, 1.0)
        synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    module.train()
    median = statistics.median(times)
    print(f"sampling: {median:.4f} s per {batch_size} images ({batch_size / median:.1f} images/s)")
    return median


def prepare(args: argparse.Namespace, threads: int, allocator: str) -> tuple[Stepper, dict[str, Any]]:
    """Build the preset's model on the device, print what runs; return its step and a summary."""
    device = resolve_device(args.device)
    cli = build(args.config, args.channels_last, checkpointing=args.checkpointing, compile=args.compile,
                plain=args.plain)
    module: NVAEModule = cli.model
    spec: ImageSpec = cli.datamodule.image_spec
    info = {"precision": resolve_precision(args.precision, cli, device), "params": count_params(module),
            "batch_size": args.batch_size or int(cli.datamodule.batch_size),
            "channels_last": bool(module.channels_last)}
    print(f"config: {' + '.join(args.config)}")
    print(f"device: {device} ({device_name(device)}), threads: {threads} "
          f"(of {default_threads()} in the affinity mask), precision: {info['precision']}, "
          f"channels_last: {info['channels_last']}, allocator: {allocator}")
    print(f"model: {info['params']:,} parameters; batch: {info['batch_size']} x {spec.channels}x{spec.size}"
          f"x{spec.size}, {spec.num_bits} bit(s)")
    module.to(device).train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stepper = Stepper(module, random_batch(spec, info["batch_size"], device), info["precision"])
    return stepper, info


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = " + ".join(args.config)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    keep_heap_memory()  # as train.py does, unless NVAE_MALLOC=default or tcmalloc is loaded
    allocator = allocator_name()

    if args.steps == 0:
        cli = build(args.config, args.channels_last, meta=True)
        params = count_params(cli.model)
        print(f"config: {config}")
        print(f"params: {params:,}")
        return {"config": config, "params": params}

    stepper, info = prepare(args, threads, allocator)
    module, device, precision, batch_size = stepper.module, stepper.device, info["precision"], info["batch_size"]
    params, channels_last = info["params"], info["channels_last"]

    for i in range(args.warmup):
        print(f"warm-up {i + 1}/{args.warmup}: {stepper.timed_step():.4f} s", flush=True)
    times = []
    for i in range(args.steps):
        times.append(stepper.timed_step())
        print(f"step {i + 1}/{args.steps}: {times[-1]:.4f} s ({batch_size / times[-1]:.1f} images/s)", flush=True)
    peak = peak_memory_mb(device)
    flops = stepper.count_flops()
    sample_s = time_sampling(module, batch_size, args.sample_steps, device, stepper._autocast)

    median = statistics.median(times)
    result = {"config": config, "device": str(device), "threads": threads, "precision": precision,
              "channels_last": channels_last, "batch_size": batch_size, "params": params,
              "step_s": median, "step_s_all": times, "train_images_per_s": batch_size / median,
              "peak_mem_mb": peak, "flops_per_step": flops, "achieved_tflops": flops / median / 1e12,
              "checkpointing": args.checkpointing, "compile": args.compile, "allocator": allocator,
              "plain": sorted(args.plain),
              "sample_images_per_s": batch_size / sample_s if sample_s else None,
              "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(f"median step: {median:.4f} s, {batch_size / median:.1f} images/s, peak memory {peak:.0f} MB, "
          f"{flops / 1e9:.2f} GFLOP/step, {flops / median / 1e12:.4f} TFLOP/s")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    result = run(parse_args(argv))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    select_allocator("throughput.py")  # NVAE_MALLOC, as train.py: may re-execute with tcmalloc preloaded
    main()
