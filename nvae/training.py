"""What a training run needs around the objective, built in one place from its settings.

:class:`NVAEModule <nvae.lightning.NVAEModule>` holds the objective and the optimizer. Everything
else a run needs is made here: the step guard and the weight EMA (:mod:`nvae.callbacks`), every
process's RNG states, atomic finite-only checkpoint writes and the checkpoint on preemption
(:mod:`nvae.resilience`), the trainer checks before any work (precision, SyncBatchNorm under CPU
DDP, DDP's gradient buckets), and ``--gpu_recipe official``, the official code's GPU settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from nvae.callbacks import EMAWeights, GuardedSteps
from nvae.compat import cpu_capability, cpu_has_bf16, ddp_kwargs, sync_batchnorm_requested
from nvae.hparams import GuardConfig
from nvae.resilience import PreemptionCheckpoint, RNGState, SafeCheckpointIO

SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # trainer.precision as Lightning spells it


class TrainerChecks(L.Callback):
    """Before any work: refuse precisions the model does not run in and SyncBatchNorm under CPU DDP;
    under DDP make gradients views of DDP's all-reduce buckets (``gradient_as_bucket_view``, unless
    the strategy was given that argument: otherwise every process holds the gradients twice); warn
    about bf16 on a CPU without bf16 instructions."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        precision = str(trainer.precision)
        if precision not in SUPPORTED_PRECISIONS:
            raise ValueError(f"trainer.precision {precision!r} is not supported: use 32, bf16-mixed or 16-mixed "
                             "(float32 weights; the KL, likelihood and spectral norms are computed in float32)")
        strategy = trainer.strategy
        on_cpu = strategy.root_device.type == "cpu"
        if sync_batchnorm_requested(strategy) and trainer.world_size > 1 and on_cpu:  # DDP would fail later
            raise ValueError("trainer.sync_batchnorm needs GPUs: PyTorch's SyncBatchNorm does not run under CPU DDP "
                             "(gloo); drop --trainer.sync_batchnorm on CPU (each process then keeps its own statistics)")
        ddp_args = ddp_kwargs(strategy)  # DDPStrategy's DistributedDataParallel args
        if ddp_args is not None:
            ddp_args.setdefault("gradient_as_bucket_view", True)
        if stage == "fit" and precision in ("bf16-mixed", "16-mixed") and on_cpu and not cpu_has_bf16():  # once a run
            rank_zero_warn(f"trainer.precision {precision} on a CPU without bf16 instructions (capability "
                           f"{cpu_capability()}): bf16 runs ~10x slower than float32 here; use --trainer.precision 32")


@dataclass
class TrainingCallbacks:
    """The stateful callbacks of one module's runs (fit, then test, share them)."""

    guard: GuardedSteps
    ema: Optional[EMAWeights]
    rng: RNGState

    @classmethod
    def build(cls, guard: GuardConfig, ema_decay: Optional[float], ema_bn_batches: int = 20) -> "TrainingCallbacks":
        """From the run's ``model.guard``, ``model.ema_decay`` (None: no weight average) and
        ``model.ema_bn_batches`` (the batches the average's BatchNorm statistics are estimated on)."""
        guarded = GuardedSteps(guard)
        return cls(guarded, EMAWeights(ema_decay, guarded, ema_bn_batches) if ema_decay else None, RNGState())

    def all(self) -> list[L.Callback]:
        """The trainer checks, the guard, the EMA, RNG states, atomic finite-only checkpoint writes and a
        checkpoint on SIGTERM/SIGINT."""
        found = [TrainerChecks(), self.guard, self.ema, self.rng, SafeCheckpointIO(), PreemptionCheckpoint(self.rng)]
        return [c for c in found if c is not None]


def runs_on_gpu(accelerator: object) -> bool:
    """Whether Lightning's ``trainer.accelerator`` setting picks a CUDA GPU on this machine."""
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator in (None, "auto") and torch.cuda.is_available()


def apply_gpu_recipe(config: Any) -> str:
    """``gpu_recipe: official`` on a GPU (``config``: LightningCLI's parsed namespace): bf16-mixed
    (16-mixed without bf16 support) unless another mixed precision is set, and synchronized
    BatchNorm; returns what changed ('' when nothing did)."""
    if config.get("gpu_recipe") != "official" or not runs_on_gpu(config.get("trainer.accelerator")):
        return ""
    changes = []
    if str(config.get("trainer.precision")) in ("32", "32-true", "None"):
        config["trainer.precision"] = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        changes.append(f"trainer.precision {config['trainer.precision']}")
    if not config.get("trainer.sync_batchnorm"):
        config["trainer.sync_batchnorm"] = True
        changes.append("trainer.sync_batchnorm true")
    return ", ".join(changes)


__all__ = ["SUPPORTED_PRECISIONS", "TrainerChecks", "TrainingCallbacks", "apply_gpu_recipe", "runs_on_gpu"]
