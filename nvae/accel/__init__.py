"""Backends: other implementations of NVAE's layers behind one switch, ``model.arch.backend``.

``plain`` is the core: ordinary PyTorch modules (:mod:`nvae.ops`), what GPUs run. ``cpu`` gives
each convolution an accelerator from :mod:`nvae.accel.cpu` (hand-written autograd, fused
BN-Swish-conv chains, spectral tokens), the way diffusers swaps attention processors; the layers,
their parameters and the function computed stay the same. ``auto`` is ``cpu`` when that package
is there, else ``plain``; the accelerators themselves fall back to plain PyTorch off the CPU.
"""
from __future__ import annotations

from torch import nn

from nvae.arch import BACKEND_NAMES as BACKENDS
from nvae.ops.conv import Conv2d


def install(model: nn.Module, backend: str) -> str:
    """Set ``model``'s layer implementations to ``backend``; returns the one installed (``auto`` resolved).
    ValueError for ``cpu`` when :mod:`nvae.accel.cpu` cannot be imported."""
    if backend not in BACKENDS:
        raise ValueError(f"model.arch.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "plain":
        try:
            from nvae.accel import cpu
        except ImportError as err:
            if backend == "cpu":
                raise ValueError(f"model.arch.backend cpu: the CPU backend cannot be imported ({err}); use auto "
                                 "or plain") from None
        else:
            cpu.install(model)
            return "cpu"
    for m in model.modules():
        if isinstance(m, Conv2d):
            m.accel = None
    return "plain"


__all__ = ["BACKENDS", "install"]
