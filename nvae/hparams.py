"""The training hyper-parameters of :class:`nvae.lightning.NVAEModule`, in groups (paper sec. 3.2, appendix A).

Each group is a dataclass whose attribute docstrings become ``--help`` and whose fields are the
YAML keys under ``model.<group>`` (``model.optim.learning_rate``, ``model.objective.kl_balance``,
``model.guard.rollback_after``). The architecture is :class:`nvae.model.NVAEConfig` (``model.arch``).

Checkpoints before format 3 held these fields flat under ``model``; :func:`group_flat_hparams`
moves them into their groups, so such checkpoints load and resume.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional


@dataclass
class OptimConfig:
    """Adamax with linear learning-rate warm-up, then cosine decay (appendix A)."""

    learning_rate: float = 1e-2
    """Peak learning rate, reached after the warm-up."""
    learning_rate_min: float = 1e-4
    """Final learning rate of the cosine decay."""
    weight_decay: float = 3e-4
    """Adamax weight decay."""
    adamax_eps: float = 1e-3
    """Adamax epsilon (the paper uses 1e-3 for stability)."""
    warmup_epochs: float = 5.0
    """Epochs of linear learning-rate warm-up."""

    def __post_init__(self) -> None:
        if not self.learning_rate > 0 or not self.learning_rate_min >= 0:
            raise ValueError(f"model.optim.learning_rate must be > 0 and learning_rate_min >= 0, got "
                             f"{self.learning_rate} and {self.learning_rate_min}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or not self.adamax_eps > 0:
            raise ValueError("model.optim.warmup_epochs and weight_decay must be >= 0, adamax_eps > 0")


@dataclass
class ObjectiveConfig:
    """The regularized negative ELBO: KL warm-up and balancing, spectral and BatchNorm terms (sec. 3.2)."""

    kl_anneal_portion: float = 0.3
    """Fraction of training over which the KL weight beta rises to 1."""
    kl_const_portion: float = 1e-4
    """Fraction of training at the start with beta held at its minimum."""
    kl_min_coeff: float = 1e-4
    """Minimum KL weight beta."""
    kl_balance: bool = True
    """Balance the KL across groups while beta < 1 (avoids posterior collapse)."""
    spectral_reg_coeff: float = 1e-2
    """lambda: weight of the spectral and BatchNorm regularizers."""
    spectral_reg_coeff_init: Optional[float] = None
    """If set, lambda starts here and anneals geometrically to spectral_reg_coeff as beta goes to 1
    (the paper's ImageNet / CelebA-HQ / FFHQ recipe)."""
    power_iters: int = 4
    """Power iterations per step for the spectral norms (10x on the first step)."""


@dataclass
class GuardConfig:
    """Skipping bad updates and rolling back (:mod:`nvae.guard`); the official code has none of this."""

    grad_skip_factor: Optional[float] = 10.0
    """Skip an update whose gradient norm exceeds this multiple of the median of the last 50 norms
    (and grad_skip_floor); null: skip non-finite steps only."""
    grad_skip_floor: float = 1.0
    """The gradient-norm limit never goes below this."""
    rollback_after: int = 20
    """After this many consecutive skipped steps, return to the last good weights and optimizer
    state and lower the learning rate (0: never)."""
    rollback_lr_factor: float = 0.5
    """Learning-rate multiplier applied at each rollback."""
    max_rollbacks: int = 3
    """Stop with an error after this many rollbacks."""
    snapshot_every: int = 100
    """Good steps between in-memory snapshots for rollbacks (each costs one copy of the weights and
    the optimizer state in CPU memory)."""
    check_every: int = 10
    """Read the guard's counters back from the device every this many steps (rollbacks and snapshots
    happen then; a rollback may come up to this many steps after its ``rollback_after``-th bad step).
    Every step decides on the device; 1 reads every step, a host synchronization each."""


GROUPS: dict[str, type] = {"optim": OptimConfig, "objective": ObjectiveConfig, "guard": GuardConfig}


def as_group(value: Any, cls: type, name: str) -> Any:
    """``value`` as a ``cls``: an instance, a mapping of its fields or None (the defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"model.{name} must be a mapping of {cls.__name__} fields, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"model.{name}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**value)


def group_flat_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyper-parameters of a format-2 checkpoint (flat ``learning_rate``, ``kl_balance``, ...) in groups.

    Keys that belong to no group stay where they are; groups already present are kept.
    """
    out = {k: v for k, v in hparams.items()}
    for group, cls in GROUPS.items():
        moved = {f.name: out.pop(f.name) for f in fields(cls) if f.name in out}
        if moved or group not in out:
            out[group] = {**moved, **(out.get(group) or {})}
    return out
