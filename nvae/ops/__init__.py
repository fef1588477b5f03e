"""Building blocks of NVAE's cells (paper sec. 3.1, fig. 3), in plain PyTorch, one idea a file:

- :mod:`nvae.ops.conv`: the weight-normalized convolution (and the hook a backend accelerates it by);
- :mod:`nvae.ops.depthwise`: the decoder's depthwise convolution;
- :mod:`nvae.ops.chains`: BatchNorm-Swish-conv steps, the cells' branches;
- :mod:`nvae.ops.layers`: BatchNorm, squeeze-excitation, the resampling skips, autoregressive masks;
- :mod:`nvae.ops.checkpointing`: cell stacks with activation checkpointing.

Other implementations of these layers are backends (:mod:`nvae.accel`).
"""
from nvae.ops.chains import BNConvStep, bn_swish_conv
from nvae.ops.checkpointing import CellStack, once_then_frozen
from nvae.ops.conv import Conv2d
from nvae.ops.depthwise import DepthwiseConv2d
from nvae.ops.layers import FactorizedReduce, SqueezeExcite, UpsampleConv, autoregressive_mask, batch_norm

__all__ = ["BNConvStep", "CellStack", "Conv2d", "DepthwiseConv2d", "FactorizedReduce", "SqueezeExcite",
           "UpsampleConv", "autoregressive_mask", "batch_norm", "bn_swish_conv", "once_then_frozen"]
