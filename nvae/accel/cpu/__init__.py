"""The CPU backend: hand-written autograd for NVAE's convolutions and BN-Swish-conv chains.

:func:`install` gives every convolution of a model its accelerator (:class:`ConvAccel`, or
:class:`DepthwiseAccel` for the decoder's depthwise convolutions). The function computed is the
plain path's (tests/test_backends.py: the same losses, gradients and BatchNorm statistics); what
changes is how much a training step stores (the fused chains keep a decoder cell's input instead
of its six maps) and its CPU time. Off the CPU every accelerator falls back to plain PyTorch.
"""
from __future__ import annotations

from torch import nn

from nvae.accel.cpu.conv import ConvAccel
from nvae.accel.cpu.depthwise import DepthwiseAccel
from nvae.ops.conv import Conv2d
from nvae.ops.depthwise import DepthwiseConv2d


def install(model: nn.Module) -> None:
    """Give each convolution of ``model`` a CPU accelerator of its own."""
    for m in model.modules():
        if isinstance(m, Conv2d):
            m.accel = DepthwiseAccel() if isinstance(m, DepthwiseConv2d) else ConvAccel()


__all__ = ["ConvAccel", "DepthwiseAccel", "install"]
