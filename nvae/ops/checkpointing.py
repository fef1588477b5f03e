"""Activation checkpointing of NVAE's cell stacks and latent groups (paper sec. 3.3 discusses the
memory cost): recompute activations in backward instead of storing them, without moving the
BatchNorm running statistics twice and without keeping kernels for the spectral regularizer."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nvae.compat import BatchNormBase
from nvae.ops.conv import Conv2d


@contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` normalize with batch statistics but leave running stats alone."""
    layers = [m for m in module.modules() if isinstance(m, BatchNormBase)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


@contextmanager
def recomputing(module: nn.Module) -> Iterator[None]:
    """Marks the backend accelerators of ``module``'s convolutions as running again in backward
    (``recomputing``): kernels made then are not kept for the spectral regularizer (they would stay
    alive until the next step's). Nested regions restore what they found."""
    slots = [m.accel for m in module.modules() if isinstance(m, Conv2d) and m.accel is not None]
    before = [slot.recomputing for slot in slots]
    for slot in slots:
        slot.recomputing = True
    try:
        yield
    finally:
        for slot, was in zip(slots, before):
            slot.recomputing = was


@contextmanager
def step_kernels(kernels: list[tuple[Conv2d, Optional[torch.Tensor]]]) -> Iterator[None]:
    """The convolutions' ``step_kernel`` set as given (a kernel bank's, recorded when the region first
    ran: the bank's block has ended by the time backward recomputes), restored afterwards."""
    before = [conv.step_kernel for conv, _ in kernels]
    for conv, kernel in kernels:
        conv.step_kernel = kernel
    try:
        yield
    finally:
        for (conv, _), was in zip(kernels, before):
            conv.step_kernel = was


def once_then_frozen(fn: Callable[..., Any], owner: nn.Module) -> Callable[..., Any]:
    """``fn``; calls after the first (checkpoint recomputation) run with the kernels of the first,
    keep the BN running stats of ``owner`` fixed and keep no kernels."""
    calls = 0
    kernels: list[tuple[Conv2d, Optional[torch.Tensor]]] = []

    def run(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            kernels[:] = [(m, m.step_kernel) for m in owner.modules() if isinstance(m, Conv2d)]
        if calls == 1 or not owner.training:
            return fn(*args)
        with frozen_batchnorm_stats(owner), recomputing(owner), step_kernels(kernels):
            return fn(*args)

    return run


class CellStack(nn.Sequential):
    """A sequence of cells that can trade compute for memory (activation checkpointing).

    ``checkpoint`` is ``"none"``, ``"cell"`` (each cell's activations are freed after the forward
    pass and recomputed during backward; the stack keeps every cell's input) or ``"stack"`` (the
    whole stack is recomputed as one unit; only its input is kept).
    """

    checkpoint: Literal["none", "cell", "stack"] = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint == "none" or not torch.is_grad_enabled():
            return self._run(x)
        if self.checkpoint == "stack":
            return checkpoint(once_then_frozen(self._run, self), x, use_reentrant=False)
        for cell in self:
            x = checkpoint(once_then_frozen(cell, cell), x, use_reentrant=False)
        return x

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        for cell in self:
            x = cell(x)
        return x
