"""The private parts of Lightning and torch that nvae reads, in one place.

nvae relies on a few attributes that are not public API. Each is reached through one function here.
After an upgrade that removes one, the failure happens here, with a message naming the attribute and
the installed version, not deep inside a training step. tests/test_compat.py checks each one
against the installed versions.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


class IncompatibleVersion(RuntimeError):
    """A private attribute nvae needs is missing from the installed Lightning or torch."""


def _need(obj: Any, attr: str, owner: str) -> Any:
    if not hasattr(obj, attr):
        import lightning

        raise IncompatibleVersion(f"nvae needs {owner}.{attr}, which this install lacks (torch {torch.__version__}, "
                                  f"lightning {lightning.__version__}); install the versions pyproject.toml allows")
    return getattr(obj, attr)


# ------------------------------------------------------------------------------------------ jsonargparse
def jsonargparse_settings() -> dict[str, Any]:
    """jsonargparse's process-wide parsing settings (a dict), so that :func:`nvae.config_check.import_policy`
    can restore the import-path policy it set once the command line is done."""
    from jsonargparse import _common

    settings = _need(_common, "parsing_settings", "jsonargparse._common")
    for key in ("import_path_verdicts", "import_paths_enforced", "instantiate_subclass_spec_in_any"):
        if key not in settings:
            raise IncompatibleVersion(f"nvae needs jsonargparse's parsing setting {key!r}, which this install lacks; "
                                      "install the versions pyproject.toml allows")
    return settings


# ------------------------------------------------------------------------------------------ Lightning
def request_stop(trainer: Any) -> None:
    """Ask the trainer to stop after this step, as Lightning's own SIGTERM handler does."""
    _need(_need(trainer, "_signal_connector", "Trainer"), "received_sigterm", "Trainer._signal_connector")
    trainer._signal_connector.received_sigterm = True


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """The checkpoint dict the trainer would save now (no collective: used for emergency saves)."""
    connector = _need(trainer, "_checkpoint_connector", "Trainer")
    return _need(connector, "dump_checkpoint", "Trainer._checkpoint_connector")(weights_only=False)


def sync_batchnorm_requested(strategy: Any) -> bool:
    """True if ``trainer.sync_batchnorm`` asked the strategy to convert BatchNorm layers."""
    return getattr(strategy, "_layer_sync", None) is not None  # strategies without it never sync


def ddp_kwargs(strategy: Any) -> Optional[dict[str, Any]]:
    """The DistributedDataParallel arguments of a DDP strategy (a live dict), or None for other strategies."""
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    return kwargs if isinstance(kwargs, dict) else None


def writes_logs_this_step(trainer: Any) -> bool:
    """True on the steps Lightning writes to the logger (every ``trainer.log_every_n_steps``)."""
    connector = _need(trainer, "_logger_connector", "Trainer")
    return bool(_need(connector, "should_update_logs", "Trainer._logger_connector"))


def attached_trainer(module: Any) -> Any:
    """The trainer ``module`` (a LightningModule) is attached to, or None (``module.trainer`` raises then)."""
    return getattr(module, "_trainer", None)


def grad_scaler(trainer: Any) -> Optional[torch.amp.GradScaler]:
    """The trainer's gradient scaler under 16-mixed (it unscales the gradients before
    ``on_before_optimizer_step``), or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def completed_batches(trainer: Any) -> int:
    """Training batches of the current epoch already done (restored from a checkpoint on resume)."""
    progress = _need(_need(trainer.fit_loop, "epoch_loop", "Trainer.fit_loop"), "batch_progress",
                     "Trainer.fit_loop.epoch_loop")
    return int(progress.current.completed)


def fit_loop_state(epoch: int, global_step: int) -> dict[str, Any]:
    """Lightning's ``loops`` checkpoint entry of a run stopped at the end of epoch ``epoch`` after
    ``global_step`` optimizer steps (one per batch): resuming from it continues at that step.

    Built from a fresh trainer's own loops, so the layout is that of the installed Lightning; the
    progress counters it sets are private (``_batches_that_stepped`` among them).
    """
    import logging

    import lightning as L

    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no "GPU available" lines for a trainer that never runs
    try:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
    finally:
        quiet.setLevel(level)
    loop = trainer.fit_loop
    epoch_loop = _need(loop, "epoch_loop", "FitLoop")
    optimizer = _need(_need(epoch_loop, "automatic_optimization", "epoch loop"), "optim_progress",
                      "automatic optimization").optimizer
    _count(_need(loop, "epoch_progress", "FitLoop"), epoch, epoch)
    for progress in (epoch_loop.batch_progress, epoch_loop.scheduler_progress, optimizer.step, optimizer.zero_grad):
        _count(progress, global_step, 0)
    _need(epoch_loop, "_batches_that_stepped", "epoch loop")
    epoch_loop._batches_that_stepped = global_step
    return {"fit_loop": loop.state_dict(), "validate_loop": trainer.validate_loop.state_dict(),
            "test_loop": trainer.test_loop.state_dict(), "predict_loop": trainer.predict_loop.state_dict()}


def _count(progress: Any, total: int, current: int) -> None:
    """Every counter of a Lightning progress record: ``total`` over the run, ``current`` in this epoch."""
    for tracker, value in ((progress.total, total), (progress.current, current)):
        for name in ("ready", "started", "processed", "completed"):
            if hasattr(tracker, name):
                setattr(tracker, name, value)


# ------------------------------------------------------------------------------------------ torch
def cpu_has_bf16() -> bool:
    """True if this CPU has bfloat16 instructions (AVX-512 BF16 or AMX); bf16 is ~10x slower without them."""
    cpu = torch.cpu
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(checks):
        raise IncompatibleVersion(f"torch {torch.__version__} has no torch.cpu._is_avx512_bf16_supported")
    return any(bool(check()) for check in checks if check is not None)


def cpu_capability() -> str:
    """``torch.backends.cpu.get_cpu_capability()`` (e.g. 'AVX2', 'AVX512'), printed with every timing."""
    return str(torch.backends.cpu.get_cpu_capability())


# ------------------------------------------------------------------------------------------ torch kernels
# Bound at import, so a torch without one of them fails here, when nvae is imported, naming it.
foreach_norm = _need(torch, "_foreach_norm", "torch")  # (tensors, ord) -> per-tensor norms, one kernel launch
foreach_lerp_ = _need(torch, "_foreach_lerp_", "torch")  # in-place a_i += w * (b_i - a_i) over lists
conv_backward = _need(torch.ops.aten, "convolution_backward", "torch.ops.aten")  # input/weight/bias gradients
batch_norm_backward = _need(torch.ops.aten, "native_batch_norm_backward", "torch.ops.aten")
silu_backward = _need(torch.ops.aten, "silu_backward", "torch.ops.aten")
BatchNormBase = _need(torch.nn.modules.batchnorm, "_BatchNorm", "torch.nn.modules.batchnorm")  # BN and SyncBN
