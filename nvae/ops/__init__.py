"""Building blocks of NVAE's cells (paper sec. 3.1, fig. 3), one idea a file:

- :mod:`nvae.ops.conv`: the weight-normalized convolution and its autograd;
- :mod:`nvae.ops.depthwise`: the decoder's depthwise convolution and its CPU kernels;
- :mod:`nvae.ops.fused`: BatchNorm-Swish-conv chains as single autograd nodes, and the ``fused_ops`` switch;
- :mod:`nvae.ops.layers`: BatchNorm, squeeze-excitation, the resampling skips, autoregressive masks;
- :mod:`nvae.ops.checkpointing`: cell stacks with activation checkpointing.
"""
from nvae.ops.checkpointing import CellStack, once_then_frozen
from nvae.ops.conv import Conv2d
from nvae.ops.depthwise import DepthwiseConv2d
from nvae.ops.fused import BNConvStep, bn_swish_conv, use_fused_ops
from nvae.ops.layers import FactorizedReduce, SqueezeExcite, UpsampleConv, autoregressive_mask, batch_norm

__all__ = ["CellStack", "Conv2d", "DepthwiseConv2d", "FactorizedReduce", "SqueezeExcite", "BNConvStep",
           "UpsampleConv", "autoregressive_mask", "batch_norm", "bn_swish_conv", "once_then_frozen",
           "use_fused_ops"]
