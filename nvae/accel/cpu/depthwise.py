"""The CPU backend's depthwise 5x5 convolution of the decoder cells (paper sec. 3.1, fig. 3a).

The main CPU cost of NVAE's decoder. It runs in channels_last whatever the layout of its input,
since oneDNN's depthwise kernels are much faster in NHWC; inside the fused BN-Swish-conv chains
(:mod:`nvae.accel.cpu.chains`) its input gradient is a forward convolution with the flipped kernel
and its weight gradient is taken by whichever of :data:`DEPTHWISE_GRAD_METHODS` ran fastest the
first time a map shape came by. docs/performance.md has the measurements.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F

from nvae.accel.cpu.conv import ConvAccel
from nvae.compat import conv_backward
from nvae.ops.conv import Conv2d
from nvae.ops.depthwise import DepthwiseConv2d

# Ways to take the depthwise weight gradient on CPU, tried once per map shape: "folded" (one
# forward depthwise conv with the batch folded into the channels) or oneDNN's weight-gradient
# kernel over blocks of this many channels per call (0: all at once).
DEPTHWISE_GRAD_METHODS: tuple[str | int, ...] = ("folded", 0, 256, 128)
# The method under torch.use_deterministic_algorithms (trainer.deterministic): the methods sum in
# different orders, so a choice by timing could differ between runs in the last bits.
DETERMINISTIC_WEIGHT_GRAD = "folded"


class WeightGradMethods:
    """The fastest weight-gradient method per (shape, dtype, threads), chosen once by timing (best of three)."""

    def __init__(self, fixed: Optional[str | int] = None) -> None:
        self.fastest: dict[tuple[tuple[int, ...], torch.dtype, int], str | int] = {}
        self.fixed = fixed
        """A method to use always instead of timing (benchmarks/options.py measures the choice against it)."""

    def choose(self, conv: DepthwiseConv2d, grad_out: torch.Tensor, x: torch.Tensor) -> str | int:
        if self.fixed is not None:
            return self.fixed
        if torch.are_deterministic_algorithms_enabled():  # trainer.deterministic: no choice by timing
            return DETERMINISTIC_WEIGHT_GRAD
        key = (tuple(x.shape), x.dtype, torch.get_num_threads())
        if key not in self.fastest:
            timings = {}
            candidates = [m if isinstance(m, str) or 0 < m < x.shape[1] else 0 for m in DEPTHWISE_GRAD_METHODS]
            for candidate in dict.fromkeys(candidates):
                weight_grad_by(conv, grad_out, x, candidate)  # oneDNN builds its kernel on the first call
                runs = []
                for _ in range(3):  # a single run is easily disturbed on a busy CPU
                    start = time.perf_counter()
                    weight_grad_by(conv, grad_out, x, candidate)
                    runs.append(time.perf_counter() - start)
                timings[candidate] = min(runs)
            self.fastest[key] = min(timings, key=timings.__getitem__)
        return self.fastest[key]


WEIGHT_GRAD_METHODS = WeightGradMethods()  # a cache of measurements: it changes speed, never results' meaning


class DepthwiseAccel(ConvAccel):
    """:class:`ConvAccel` for a :class:`DepthwiseConv2d`: NHWC convolutions and their own gradients."""

    def convolve(self, conv: Conv2d, x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The convolution; on the CPU through channels_last, the output in the input's layout."""
        if x.device.type != "cpu" or x.is_contiguous(memory_format=torch.channels_last):
            return conv._conv_forward(x, weight, bias)
        nhwc = x.contiguous(memory_format=torch.channels_last)
        return conv._conv_forward(nhwc, weight, bias).contiguous()

    def convolve_backward(self, conv: Conv2d, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          mask: tuple[bool, bool, bool]) -> tuple[Optional[torch.Tensor], ...]:
        """Gradients on CPU, where the fused chains (the only callers) run: both in channels_last."""
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        x = x.contiguous(memory_format=torch.channels_last)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_x = None
        if mask[0]:  # stride 1, 'same' padding: the transposed conv is a conv with the flipped kernel
            grad_x = conv._conv_forward(grad_out, weight.flip(2, 3), None).contiguous(memory_format=layout)
        grad_w = weight_grad_by(conv, grad_out, x, WEIGHT_GRAD_METHODS.choose(conv, grad_out, x)) if mask[1] else None
        return grad_x, grad_w, None  # no bias (see __init__)


def weight_grad_by(conv: Conv2d, grad_out: torch.Tensor, x: torch.Tensor, method: str | int) -> torch.Tensor:
    """Weight gradient in float32 (oneDNN's bf16 kernel for it is slower) by one of :data:`DEPTHWISE_GRAD_METHODS`."""
    if method == "folded":
        return weight_grad_folded(conv, grad_out, x)
    return weight_grad_by_blocks(conv, grad_out, x, int(method))

def weight_grad_by_blocks(conv: Conv2d, grad_out: torch.Tensor, x: torch.Tensor, block: int) -> torch.Tensor:
    """Weight gradient in float32 by oneDNN calls over ``block`` channels each (0: all at once)."""
    pieces = []
    block = block or conv.in_channels
    for start in range(0, conv.in_channels, block):
        stop = min(start + block, conv.in_channels)
        x_block = x[:, start:stop].to(torch.float32, memory_format=torch.channels_last)  # (B, block, H, W)
        g_block = grad_out[:, start:stop].to(torch.float32, memory_format=torch.channels_last)
        pieces.append(conv_backward(
            g_block, x_block, conv.weight[start:stop].float(), None, conv.stride, conv.padding, conv.dilation,
            False, [0, 0], stop - start, [False, True, False])[1])
    return torch.cat(pieces).to(conv.weight.dtype)  # (channels, 1, k, k)

def weight_grad_folded(conv: Conv2d, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Weight gradient in float32 as one forward depthwise convolution, the batch folded into the channels.

    dW[c, i, j] = sum_b sum_(y, x) x_pad[b, c, y + i, x + j] * g[b, c, y, x]: for each (c, b) that is
    the correlation of the padded map x[b, c] with the H x W kernel g[b, c], a k x k output; the
    batch is then summed.
    """
    b, c, h, w = x.shape
    folded_x = torch.empty((1, h, w, c, b), dtype=torch.float32, device=x.device)
    folded_x.copy_(x.permute(2, 3, 1, 0).unsqueeze(0))  # one pass: cast and transpose
    folded_x = folded_x.view(1, h, w, c * b).permute(0, 3, 1, 2)  # (1, C*B, H, W) NHWC; channel c*B + b
    kernels = torch.empty((c, b, h, w), dtype=torch.float32, device=x.device)
    kernels.copy_(grad_out.permute(1, 0, 2, 3))
    out = F.conv2d(folded_x, kernels.view(c * b, 1, h, w), padding=conv.padding, groups=c * b)  # (1, C*B, k, k)
    k = conv.kernel_size
    return out.view(c, b, *k).sum(dim=1, keepdim=True).to(conv.weight.dtype)  # (C, 1, k, k)
