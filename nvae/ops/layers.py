"""Small layers of NVAE's cells (paper sec. 3.1, fig. 3; appendix A): BatchNorm with the paper's
momentum, squeeze-excitation, the down- and up-sampling skips, and the autoregressive mask
of the flow cells (sec. 3.2, "normalizing flows")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nvae.ops.conv import Conv2d

BN_MOMENTUM = 0.05
BN_EPS = 1e-5


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with the paper's momentum (0.05); sec. 3.1 notes the default 0.1 hurts sampling."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate: mean pool -> Linear(C, max(C//16, 4)) -> ReLU -> Linear -> sigmoid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(x.mean(dim=(2, 3)))  # (B, C)
        return x * gate[:, :, None, None]


class FactorizedReduce(nn.Module):
    """Down-sampling skip: Swish, then four strided 1x1 convs on shifted grids, concatenated."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        quarter = out_channels // 4
        sizes = [quarter, quarter, quarter, out_channels - 3 * quarter]
        self.convs = nn.ModuleList(Conv2d(in_channels, c, 1, stride=2) for c in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(x)
        shifted = [x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :]]
        return torch.cat([conv(s) for conv, s in zip(self.convs, shifted)], dim=1)


class UpsampleConv(nn.Module):
    """Up-sampling skip: bilinear x2 (corners aligned) then a 1x1 conv without bias (halving
    channels), as in the official code."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.conv(x)


def autoregressive_mask(in_channels: int, out_channels: int, kernel_size: int, groups: int,
                        zero_diagonal: bool, mirror: bool) -> torch.Tensor:
    """Mask of a (out, in/groups, k, k) kernel making the conv autoregressive (PixelCNN/IAF order).

    Pixels are ordered in raster order, channels within a pixel in index order; output channel j
    of a pixel may see strictly earlier pixels and, at the same pixel, input channels of earlier
    blocks (or its own block too when ``zero_diagonal`` is False). ``mirror`` reverses the order.
    """
    m = kernel_size // 2
    mask = torch.ones(out_channels, in_channels // groups, kernel_size, kernel_size)
    mask[:, :, m + 1:, :] = 0  # rows below the centre
    mask[:, :, m, m:] = 0  # centre row, centre and right of it
    if groups == in_channels:  # depthwise: a channel may see only itself at the centre
        centre = torch.zeros(out_channels, 1) if zero_diagonal else torch.ones(out_channels, 1)
    else:
        assert groups == 1
        if out_channels >= in_channels:  # each input channel owns a block of outputs
            out_block = torch.arange(out_channels)[:, None] // (out_channels // in_channels)
            in_block = torch.arange(in_channels)[None, :]
        else:  # each output channel owns a block of inputs
            out_block = torch.arange(out_channels)[:, None]
            in_block = torch.arange(in_channels)[None, :] // (in_channels // out_channels)
        centre = ((in_block < out_block) if zero_diagonal else (in_block <= out_block)).float()
    mask[:, :, m, m] = centre
    if mirror:
        mask = mask.flip(2, 3)
    return mask
