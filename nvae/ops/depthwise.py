"""The depthwise 5x5 convolution of the decoder cells (paper sec. 3.1, fig. 3a)."""
from __future__ import annotations

from nvae.ops.conv import Conv2d


class DepthwiseConv2d(Conv2d):
    """Depthwise convolution (one filter per channel), 'same' padding, no bias, no weight normalization
    (BatchNorm follows it); spectrally regularized like every :class:`Conv2d`. The CPU backend runs
    it through channels_last, with its own gradients (:mod:`nvae.accel.cpu.depthwise`)."""

    def __init__(self, channels: int, kernel_size: int, padding: int) -> None:
        if kernel_size % 2 == 0 or padding != kernel_size // 2:
            raise ValueError(f"DepthwiseConv2d keeps the size: odd kernel and padding kernel_size // 2, "
                             f"got kernel_size {kernel_size}, padding {padding}")
        super().__init__(channels, channels, kernel_size, padding=padding, groups=channels, bias=False,
                         weight_norm=False)
