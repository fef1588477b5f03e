"""BatchNorm-Swish-conv chains of NVAE's cells (paper sec. 3.1, fig. 3): conv(swish(bn(h))) step after step.

The cells describe their branches as chains of :class:`BNConvStep`; plain PyTorch runs them layer
by layer. A backend may run a whole chain as one autograd node (the CPU backend does, storing only
the chain's input: :mod:`nvae.accel.cpu.chains`); the function computed stays this one.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nvae.ops.conv import Conv2d


class BNConvStep(NamedTuple):
    """One step of a chain: BatchNorm, then Swish if ``swish``, then the convolution."""

    bn: nn.BatchNorm2d
    swish: bool
    conv: Conv2d


def bn_swish_conv(x: torch.Tensor, *steps: BNConvStep) -> torch.Tensor:
    """``conv(swish(bn(x)))`` (Swish where the step says so) for each step.

    Swish belongs to the step, not to the BatchNorm module: converting BatchNorm layers to
    SyncBatchNorm (``trainer.sync_batchnorm``) and back replaces the modules and keeps the model.
    When the first convolution has a backend accelerator with a ``chain`` method, it may run the
    chain (it returns None where it does not apply).
    """
    steps = tuple(BNConvStep(*step) for step in steps)  # plain (bn, swish, conv) tuples too
    chain = getattr(steps[0].conv.accel, "chain", None)
    if chain is not None:
        out = chain(x, steps)
        if out is not None:
            return out
    for bn, swish, conv in steps:
        x = bn(x)
        x = conv(F.silu(x) if swish else x)
    return x
