"""Keeping a run alive: skipped bad steps and rollbacks (the weight EMA is :mod:`nvae.ema`).

NVAE's deep hierarchy occasionally produces a non-finite loss or a gradient spike (the official
code's README admits NaNs, and that resuming rarely helps). :class:`StepGuard` decides, after the
backward pass and before the optimizer step, whether an update is safe:

- a non-finite loss or gradient is skipped; under ``16-mixed`` a non-finite gradient with a finite
  loss is the gradient scaler's overflow: the scaler skips that step and halves its scale, so the
  guard does not count it as a bad step (``'overflow'``) unless the scale fell below
  ``MIN_LOSS_SCALE``, where float16 overflows without any scaling and the gradient itself is bad;
- a gradient norm above ``max(floor, factor x median of the recent norms)`` is skipped. Every finite
  norm, skipped or not, enters the window of recent norms, so a lasting rise in the norm lifts the
  threshold and skipping cannot go on forever;
- after ``rollback_after`` consecutive skips the model and optimizer return to the last good
  snapshot (taken every ``snapshot_every`` good steps) and the learning rate is multiplied by
  ``rollback_lr_factor``; after ``max_rollbacks`` rollbacks the run stops with a message.

The decision is made on the device (:meth:`StepGuard.decide`): the optimizer applies or cancels the
update by a 0-d tensor (:mod:`nvae.optim`) and the counters are read back only every
``model.guard.check_every`` steps (rollbacks, snapshots, repairs: :class:`nvae.callbacks.GuardedSteps`),
so a training step waits for no device value. All counters are buffers, so they are saved in
checkpoints and a resumed run carries on exactly.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

import torch
from torch import nn

from nvae.compat import foreach_norm


MIN_LOSS_SCALE = 1.0  # below it a float16 overflow is the gradient's own, not the loss scale's
REASONS = ("", "spike", "nonfinite", "overflow")  # StepGuard.decide's reason codes


class TrainingDiverged(RuntimeError):
    """Raised when rollbacks did not cure a run."""


class StepGuard(nn.Module):
    """Skip / rollback decisions for one optimizer; its state lives in buffers (checkpointed)."""

    def __init__(self, skip_factor: Optional[float] = 10.0, skip_floor: float = 1.0, window: int = 50,
                 min_history: int = 10, rollback_after: int = 20, rollback_lr_factor: float = 0.5,
                 max_rollbacks: int = 3, snapshot_every: int = 100) -> None:
        super().__init__()
        if skip_factor is not None and skip_factor <= 1.0:
            raise ValueError(f"model.guard.grad_skip_factor must be > 1 (or null to turn it off), got {skip_factor}")
        if skip_floor < 0 or window < 1 or min_history < 1 or min_history > window:
            raise ValueError("model.guard.grad_skip_floor must be >= 0 and 1 <= min_history <= window")
        if rollback_after < 0 or max_rollbacks < 0 or snapshot_every < 1:
            raise ValueError("model.guard.rollback_after and model.guard.max_rollbacks must be >= 0, snapshot_every >= 1")
        if not 0.0 < rollback_lr_factor <= 1.0:
            raise ValueError(f"model.guard.rollback_lr_factor must be in (0, 1], got {rollback_lr_factor}")
        self.skip_factor, self.skip_floor, self.min_history = skip_factor, skip_floor, min_history
        self.rollback_after, self.rollback_lr_factor = rollback_after, rollback_lr_factor
        self.max_rollbacks, self.snapshot_every = max_rollbacks, snapshot_every
        self.register_buffer("norms", torch.zeros(window, dtype=torch.float64))  # ring of recent finite norms
        self.register_buffer("num_norms", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))  # total skipped steps
        self.register_buffer("consecutive", torch.zeros((), dtype=torch.long))
        self.register_buffer("good_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("rollbacks", torch.zeros((), dtype=torch.long))
        self.register_buffer("lr_scale", torch.ones((), dtype=torch.float64))
        self._snapshot: Optional[dict[str, Any]] = None  # last good (module state, optimizer state), on CPU

    # ------------------------------------------------------------------------------- decision
    def threshold(self) -> float:
        """Current gradient-norm limit (inf until ``min_history`` norms were seen or when turned off); reads the device."""
        return float(self._limit())

    def _limit(self) -> torch.Tensor:
        """The limit as a 0-d tensor on the guard's device: max(floor, factor x median of the recent norms)."""
        if self.skip_factor is None:
            return torch.full((), float("inf"), dtype=self.norms.dtype, device=self.norms.device)
        seen = torch.arange(self.norms.numel(), device=self.norms.device) < self.num_norms  # the ring fills from 0
        median = torch.where(seen, self.norms, float("nan")).nanmedian()  # of the first min(n, window) norms
        limit = torch.clamp_min(self.skip_factor * median, self.skip_floor)
        return torch.where(self.num_norms >= self.min_history, limit, float("inf"))

    def decide(self, bad_loss: torch.Tensor, grad_norm: torch.Tensor,
               loss_scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Record one step on the guard's device without reading anything back: returns ``keep`` (0-d float,
        1.0 to update, 0.0 to skip) and the reason code (0-d long, an index into :data:`REASONS`).

        ``bad_loss``: nonzero when the loss (of any process) was not finite. ``loss_scale``: the gradient
        scaler's current scale when one is in use (16-mixed; a host value the caller has). A non-finite
        gradient of a finite loss is then the scaler's overflow ('overflow'), not counted as a skipped
        step, as long as the scale is at least ``MIN_LOSS_SCALE``.
        """
        norm = grad_norm.detach().to(self.norms.dtype)
        loss_finite = bad_loss == 0
        finite = loss_finite & torch.isfinite(norm)
        if loss_scale is not None and loss_scale >= MIN_LOSS_SCALE:
            overflow = loss_finite & ~finite
        else:
            overflow = torch.zeros_like(finite)
        spike = finite & (norm > self._limit())
        counted = (~finite | spike) & ~overflow  # a skipped step
        slot = (self.num_norms % self.norms.numel()).view(1)
        self.norms.scatter_(0, slot, torch.where(finite, norm, self.norms.gather(0, slot)))
        self.num_norms += finite.long()
        self.skipped += counted.long()
        self.consecutive.copy_(torch.where(counted, self.consecutive + 1, torch.where(overflow, self.consecutive, 0)))
        self.good_steps += (~counted & ~overflow).long()
        reason = torch.where(overflow, 3, torch.where(~finite, 2, spike.long()))
        return (~counted & ~overflow).to(torch.float32), reason

    def check(self, loss_finite: bool, grad_norm: float, loss_scale: Optional[float] = None) -> str:
        """:meth:`decide` from host values, read back: '' to step, else why it is skipped ('nonfinite',
        'spike' or 'overflow')."""
        bad = torch.tensor(0.0 if loss_finite else 1.0, device=self.norms.device)
        norm = torch.tensor(grad_norm, dtype=self.norms.dtype, device=self.norms.device)
        return REASONS[int(self.decide(bad, norm, loss_scale)[1])]

    @property
    def should_roll_back(self) -> bool:
        return self.rollback_after > 0 and int(self.consecutive) >= self.rollback_after

    # ------------------------------------------------------------------------------- snapshots
    def take_snapshot(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Keep a CPU copy of ``module`` and ``optimizer`` for rollbacks, unless a value is not finite."""
        state = module.state_dict()
        if nonfinite_entries(state):
            return False  # never keep a poisoned snapshot
        self._snapshot = {"module": _cpu_copy(state), "optimizer": _cpu_copy(optimizer.state_dict())}
        return True

    def roll_back(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Restore the last snapshot and lower the learning rate; raise after ``max_rollbacks``."""
        if int(self.rollbacks) >= self.max_rollbacks or self._snapshot is None:
            why = "no good state was ever reached" if self._snapshot is None else \
                f"{int(self.rollbacks)} rollback(s) (learning rate scaled by {float(self.lr_scale):g}) did not help"
            raise TrainingDiverged(
                f"training diverged: {int(self.consecutive)} consecutive steps had a non-finite loss/gradient or a "
                f"gradient spike, and {why}; lower model.optim.learning_rate, raise model.optim.adamax_eps or "
                "check the data (under trainer.precision 16-mixed, try bf16-mixed)")
        own = {k: v.clone() for k, v in self.state_dict().items()}  # the guard's counters are not rolled back
        module.load_state_dict(self._snapshot["module"])
        self.load_state_dict(own)
        optimizer.load_state_dict(copy.deepcopy(self._snapshot["optimizer"]))  # on CPU it would alias the snapshot
        self.rollbacks += 1
        self.lr_scale *= self.rollback_lr_factor
        self.consecutive.zero_()

    def repair_buffers(self, module: nn.Module) -> list[str]:
        """Put back snapshot values of buffers a bad forward pass made non-finite (BN running stats)."""
        if self._snapshot is None:
            return []
        fixed = []
        for name, buf in module.named_buffers():
            if buf.is_floating_point() and not torch.isfinite(buf).all() and name in self._snapshot["module"]:
                buf.copy_(self._snapshot["module"][name])
                fixed.append(name)
        return fixed


def _cpu_copy(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor copied to CPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def nonfinite_entries(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinity."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Total 2-norm of the gradients (float32; inf/nan when any gradient is not finite)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(foreach_norm([g.float() for g in grads])))
