"""benchmarks/throughput.py runs on the quickstart preset and ends with one parseable JSON line; so do the
other benchmarks, benchmarks/gpu.py included (on the CPU, --tiny)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from nvae.lightning import NVAEModule

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "throughput.py"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def run_benchmark(cwd: Path, *args: str) -> dict[str, Any]:
    """Run the script in ``cwd`` (a scratch folder) and parse its last stdout line."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(QUICKSTART), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) > 1  # human-readable lines, then the JSON
    return json.loads(lines[-1])


def quickstart_params() -> int:
    """Parameters of the quickstart model, built from the YAML without the CLI."""
    cfg = yaml.safe_load(QUICKSTART.read_text())
    module_name, class_name = cfg["data"]["class_path"].rsplit(".", 1)
    data = getattr(importlib.import_module(module_name), class_name)(**cfg["data"].get("init_args", {}))
    with torch.device("meta"):
        model = NVAEModule(**cfg["model"], image_spec=data.image_spec)
    return sum(p.numel() for p in model.parameters())


def _benchmark_module(name: str) -> Any:
    """benchmarks/<name>.py imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steps_0_reports_the_parameter_count_only(tmp_path: Path) -> None:
    result = run_benchmark(tmp_path, "--steps", "0")
    assert result == {"config": str(QUICKSTART), "params": quickstart_params()}
    assert not any(tmp_path.iterdir())  # no log directories or files written


def test_one_timed_step_on_cpu(tmp_path: Path) -> None:
    result = run_benchmark(tmp_path, "--steps", "1", "--warmup", "1", "--batch-size", "2", "--threads", "1",
                           "--device", "cpu")
    assert result["device"] == "cpu" and result["threads"] == 1 and result["batch_size"] == 2
    assert result["precision"] == "32"
    assert result["params"] == quickstart_params()
    assert result["step_s"] > 0 and result["step_s_all"] == [result["step_s"]]
    assert result["train_images_per_s"] == pytest.approx(2 / result["step_s"])
    assert result["peak_mem_mb"] > 0
    assert result["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # every figure says which CPU
    assert result["flops_per_step"] > 0
    assert result["achieved_tflops"] == pytest.approx(result["flops_per_step"] / result["step_s"] / 1e12)
    assert not any(tmp_path.iterdir())


def test_a_device_this_machine_lacks_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    throughput = _benchmark_module("throughput")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU ("cuda:0" on a machine without any)
    with pytest.raises(SystemExit):
        throughput.parse_args(["--config", str(QUICKSTART), "--device", missing])
    assert f"argument --device: device '{missing}': no such CUDA device here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        throughput.parse_args(["--config", str(QUICKSTART), "--device", "gpu"])
    assert "argument --device: device 'gpu'" in capsys.readouterr().err
    assert throughput.parse_args(["--config", str(QUICKSTART)]).device == "auto"


def test_profile_step_splits_the_step_and_ranks_operators(tmp_path: Path) -> None:
    """benchmarks/profile_step.py: phases inside the step's wall time, operators ranked by self time."""
    trace = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--config", str(QUICKSTART),
                           "--batch-size", "2", "--steps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu",
                           "--top", "40", "--trace", str(trace)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "| `aten::convolution_backward` |" in proc.stdout  # the printed table
    phases, wall_ms = result["phases_ms"], result["step_s"] * 1e3
    assert set(phases) == {"forward", "backward", "optimizer"} and all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= wall_ms * 1.02  # nested in the step (zero_grad and the clock outside them)
    top = result["top"]
    assert len(top) == 40 and not [r for r in top if r["name"].startswith("nvae::")]
    assert [r["self_ms"] for r in top] == sorted((r["self_ms"] for r in top), reverse=True)
    assert all(0 <= r["self_ms"] <= r["total_ms"] + 1e-6 for r in top)
    assert sum(r["self_ms"] for r in top) <= result["self_total_ms"] + 1e-6 <= wall_ms * 1.02  # one thread
    names = {r["name"] for r in top}
    assert {"aten::convolution_backward", "aten::mkldnn_convolution"} <= names
    assert "traceEvents" in json.loads(trace.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.json"]  # nothing else written


def test_profile_step_refuses_zero_steps(capsys: pytest.CaptureFixture) -> None:
    profile_step = _benchmark_module("profile_step")
    with pytest.raises(SystemExit):
        profile_step.parse(["--config", str(QUICKSTART), "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert profile_step.parse(["--config", str(QUICKSTART)]).steps == 3


def test_flop_count_of_a_grouped_conv_backward_is_twice_its_forward() -> None:
    """torch's own formula counts a depthwise conv's weight gradient once per channel; ours does not."""
    from torch.utils.flop_counter import FlopCounterMode

    throughput = _benchmark_module("throughput")
    mapping = {torch.ops.aten.convolution_backward: throughput.conv_backward_flops}
    for conv in (torch.nn.Conv2d(24, 24, 5, padding=2, groups=24), torch.nn.Conv2d(8, 16, 3, stride=2),
                 torch.nn.ConvTranspose2d(8, 16, 3, groups=2)):
        x = torch.randn(2, conv.in_channels, 8, 8, requires_grad=True)
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            conv(x).sum().backward()
        flops = counter.get_flop_counts()["Global"]
        assert flops[torch.ops.aten.convolution_backward] == 2 * flops[torch.ops.aten.convolution]


def test_checkpointing_options_reach_the_model_and_recompute() -> None:
    """--checkpointing group / cell build the preset that way; recomputation shows in the FLOP count
    (a group recomputes its heads and flows too, so more than cell by cell)."""
    throughput = _benchmark_module("throughput")
    flops = {}
    for mode in (None, "cell", "group"):
        cli = throughput.build([str(QUICKSTART)], None, checkpointing=mode)
        assert cli.model.hparams.gradient_checkpointing == (mode or False)
        torch.manual_seed(0)
        x = throughput.random_batch(cli.model.spec, 2, torch.device("cpu"))
        stepper = throughput.Stepper(cli.model.train(), x, "32")
        stepper.timed_step()  # first step: 10x power iterations, depthwise weight-gradient timing runs
        flops[mode] = stepper.count_flops()
    assert flops[None] < flops["cell"] < flops["group"], flops


def test_option_words_of_the_options_table(monkeypatch: pytest.MonkeyPatch) -> None:
    options = _benchmark_module("options")
    assert options.flags("bf16 ckptcell live") == ["--precision", "bf16-mixed", "--checkpointing", "cell"]
    assert options.flags("32 ckpt") == ["--precision", "32", "--checkpointing", "group"]
    monkeypatch.setenv("LD_PRELOAD", "/x/libtcmalloc_minimal.so.4:/y/libother.so")
    monkeypatch.setenv("NVAE_MALLOC_PRELOADED", "1")
    live = options.environment("32 live")
    assert (live["GLIBC_TUNABLES"], live["NVAE_MALLOC"]) == (options.LIVE_MALLOC, "default")
    assert live["LD_PRELOAD"] == "/y/libother.so" and "NVAE_MALLOC_PRELOADED" not in live  # glibc serves the child
    assert options.environment("bf16 glibc")["NVAE_MALLOC"] == "heap"
    assert options.environment("32 tcmalloc")["LD_PRELOAD"].startswith("/x/libtcmalloc")
    assert options.environment("32") == dict(os.environ)  # no allocator word: the environment as it is
    with pytest.raises(SystemExit, match="more than one allocator"):
        options.environment("32 tcmalloc live")
    with pytest.raises(SystemExit, match="unknown option word 'ckpt2'"):
        options.flags("32 ckpt2")


@pytest.mark.slow
def test_ddp_scaling_runs_lightning_ddp_with_two_processes(tmp_path: Path) -> None:
    """benchmarks/ddp_scaling.py: both settings run through Lightning DDP and report consistent numbers."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ddp_scaling.py"), "--config", str(QUICKSTART),
                           "--batch-size", "2", "--steps", "1", "--warmup", "0", "--processes", "1", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["processes"] for r in rows] == [1, 2]
    for r in rows:
        assert r["images_per_s"] == pytest.approx(r["processes"] * 2 / r["step_s"])
        assert 100 < r["peak_mem_mb"] < 20000  # MiB of one process (not KiB or bytes)
    assert rows[0]["efficiency"] == pytest.approx(1.0)


def test_plain_switches_replace_each_cpu_mechanism() -> None:
    """--plain ops / depthwise (benchmarks/options.py --mechanisms) build what they say."""
    from nvae.ops import Conv2d
    from nvae.accel.cpu.depthwise import WEIGHT_GRAD_METHODS

    throughput = _benchmark_module("throughput")
    try:
        for plain in ((), ("ops",), ("depthwise",)):
            cli = throughput.build([str(QUICKSTART)], None, plain=plain)
            convs = [m.accel is not None for m in cli.model.modules() if isinstance(m, Conv2d)]
            assert convs and all(convs) == ("ops" not in plain) and not any(convs) == ("ops" in plain)
            assert WEIGHT_GRAD_METHODS.fixed == (0 if "depthwise" in plain else None)
    finally:
        WEIGHT_GRAD_METHODS.fixed = None
    options = _benchmark_module("options")
    assert options.flags("32 plain-ops onednn-dw") == ["--precision", "32", "--plain", "ops", "--plain", "depthwise"]
    assert options.environment("32 glibc-default")["NVAE_MALLOC"] == "default"
    row = {"option": "a", "batch_size": 4}
    assert options.combine([{**row, "step_s": s} for s in (1.0, 3.0, 2.0)])["step_s"] == 2.0  # median round


def test_wall_time_splits_a_real_train_run(tmp_path: Path) -> None:
    """benchmarks/wall_time.py runs train.py fit itself: every step is counted once, and the shares add up."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "wall_time.py"), "--threads", "1", "--batch-size", "4",
         "--output-dir", str(tmp_path / "run"), "--", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1", "--data.init_args.eval_batch_size", "4",
         "--model.arch.num_groups_per_scale", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "held-out negative ELBO" in proc.stdout  # the run is the real command, final test pass included
    assert result["steps"] == 3 and result["images"] == 12
    assert result["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and result["threads"] == 1
    outside = result["outside_s"]
    assert all(v >= 0 for v in outside.values()) and outside["test"] > 0 and outside["startup"] > 0
    # the parts and the steps make up the wall time (each figure is rounded to 0.01 s)
    assert abs(sum(outside.values()) + result["step_time_s"] - result["wall_s"]) < 0.1
    assert abs(result["outside_steps_share"] - (1 - result["step_time_s"] / result["wall_s"])) < 1e-3
    assert (tmp_path / "run").is_dir()  # --output-dir got the logs and checkpoints


def test_gpu_tiny_on_cpu_prints_every_row_and_column(tmp_path: Path) -> None:
    """benchmarks/gpu.py --device cpu --tiny: the table of the quickstart model, the CUDA tests' counts
    (skipped here) and the JSON line; no timing is checked."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gpu = _benchmark_module("gpu")
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("benchmarks/gpu.py: ") and f"torch {torch.__version__}" in lines[0]
    assert f"CPU capability {torch.backends.cpu.get_cpu_capability()}" in lines[0] and "threads " in lines[0]
    assert "| " + " | ".join(gpu.COLUMNS) + " |" in lines
    rows = [line for line in lines if line.startswith("| quickstart | 2 | ")]
    table = rows[len(rows) - len(gpu.MODES):]  # the progress lines come first, then the table
    assert [r.split(" | ")[2] for r in table] == list(gpu.MODES)
    assert all(r.count(" | ") == len(gpu.COLUMNS) - 1 for r in table)
    assert "compile off on CPU" in table[gpu.MODES.index(gpu.COMPILED)]
    assert re.search(r"^pytest -m cuda: 0 passed, 0 failed, \d+ skipped, 0 errors in ", proc.stdout, re.MULTILINE)
    result = json.loads(lines[-1])
    assert {"device", "device_name", "torch", "cuda", "cpu_capability", "threads", "tiny", "deadline_s", "elapsed_s",
            "warmup", "steps", "sample_steps", "tests", "rows"} <= result.keys()
    assert result["device"] == "cpu" and result["tiny"] and result["steps"] == 1
    assert result["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert result["tests"]["status"] == "ran" and result["tests"]["failed"] == 0 and result["tests"]["skipped"] >= 2
    by_mode = {r["mode"]: r for r in result["rows"]}
    assert list(by_mode) == list(gpu.MODES) and all(r["batch_size"] == 2 for r in result["rows"])
    for mode in ("float32", "bf16-mixed"):
        row = by_mode[mode]
        assert row["status"] == "ok" and len(row["step_s_all"]) == 1, row
        assert row["images_per_s"] == pytest.approx(2 * row["steps_per_s"]) and row["peak_mem_mb"] > 0
        assert row["warmup_s"] > 0 and row["params"] == quickstart_params()
    assert by_mode[gpu.SAMPLING]["status"] == "ok" and by_mode[gpu.SAMPLING]["images_per_s"] > 0
    assert by_mode[gpu.COMPILED]["status"] == "skipped"
    assert not any(tmp_path.iterdir())


def test_gpu_rows_report_oom_errors_and_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row's CUDA out-of-memory error, a compiler's error wrapping one, another error and the deadline
    each become the row's status, and the rows after them still get theirs."""
    gpu = _benchmark_module("gpu")
    cpu = torch.device("cpu")
    clock = gpu.Clock(3600)

    def raising(err: BaseException) -> Any:
        def measure() -> dict[str, Any]:
            raise err
        return measure

    assert gpu.guarded(clock, "eager", cpu, raising(torch.OutOfMemoryError("CUDA out of memory.")))["status"] == "OOM"
    wrapped = RuntimeError("backend compiler failed: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert gpu.guarded(clock, "compile", cpu, raising(wrapped))["status"] == "OOM"
    row = gpu.guarded(clock, "eager", cpu, raising(ValueError("bad shape")))
    assert row == {"status": "error", "note": "ValueError: bad shape"}
    assert gpu.guarded(clock, "eager", cpu, lambda: {"status": "ok"}) == {"status": "ok"}

    monkeypatch.setattr(gpu, "RESERVE_S", 0.0)
    monkeypatch.setattr(gpu, "MIN_ROW_S", {"eager": 0.0, "compile": 0.0})
    clock = gpu.Clock(1.0)  # the row starts at once and is stopped a second later

    def forever() -> dict[str, Any]:
        while True:  # ended by the deadline's signal
            time.sleep(0.01)

    assert gpu.guarded(clock, "compile", cpu, forever) == {"status": "skipped", "note": "deadline reached in this row"}
    assert clock.expired
    row = gpu.guarded(clock, "eager", cpu, raising(AssertionError("must not run")))
    assert row["status"] == "skipped" and row["note"].startswith("deadline")


def test_gpu_measures_every_paper_preset() -> None:
    from nvae.presets import preset_names

    gpu = _benchmark_module("gpu")
    assert sorted(gpu.PRESETS) == sorted(set(preset_names()) - set(gpu.TINY))
    assert gpu.parse_args([]).presets == list(gpu.PRESETS)
    assert gpu.parse_args(["--tiny"]).presets == ["quickstart"]


def test_step_overhead_counts_fewer_calls_batched_and_measures_memory(tmp_path: Path) -> None:
    """benchmarks/step_overhead.py on the quickstart's plain path: the bank's step makes fewer ATen
    calls than the per-layer one (the property it measures; a bank that stopped batching would not),
    and the timing and memory rows come out for each form."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_overhead.py"), "--config", str(QUICKSTART),
                           "--backends", "plain", "--time", str(QUICKSTART), "--batch-sizes", "2", "--steps", "1",
                           "--memory", str(QUICKSTART)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (count,) = result["counts"]
    assert 0 < count["batched"] < 0.7 * count["per_layer"]  # 2,499 against 4,719 on 2026-12-08
    (timing,) = result["times"]
    assert timing["batch_size"] == 2 and timing["batched_s"] > 0 and timing["per_layer_s"] > 0
    (memory,) = result["memory"]
    assert memory["batched_mb"] > 0 and memory["per_layer_mb"] > 0
    assert result["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
