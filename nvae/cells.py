"""Residual cells of NVAE (paper sec. 3.1, fig. 3) and the flow cells (sec. 3.2, appendix).

Every cell returns ``skip(x) + 0.1 * branch(x)``; down cells halve the resolution and double the
channels, up cells do the opposite.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from nvae.ops import (Conv2d, DepthwiseConv2d, FactorizedReduce, SqueezeExcite, BNConvStep, UpsampleConv,
                      autoregressive_mask, batch_norm, bn_swish_conv)

RESIDUAL_SCALE = 0.1


class EncoderCell(nn.Module):
    """BN - Swish - conv3x3 - BN - Swish - conv3x3 - SE (fig. 3b); stride 2 when ``down``.

    ``branch`` holds the layers (its indices are the state-dict keys); Swish is applied by
    :meth:`forward` as part of each step (:class:`nvae.ops.BNConvStep`), so that converting the BatchNorm
    layers, e.g. to SyncBatchNorm, leaves the cell as it is.
    """

    def __init__(self, in_channels: int, out_channels: int, down: bool = False, use_se: bool = True) -> None:
        super().__init__()
        self.skip = FactorizedReduce(in_channels, out_channels) if down else nn.Identity()
        self.branch = nn.Sequential(
            batch_norm(in_channels),  # + Swish
            Conv2d(in_channels, out_channels, 3, stride=2 if down else 1, padding=1),
            batch_norm(out_channels),  # + Swish
            Conv2d(out_channels, out_channels, 3, padding=1),
            SqueezeExcite(out_channels) if use_se else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn1, conv1, bn2, conv2, se = self.branch  # looked up each call: SyncBatchNorm conversion replaces BNs
        h = bn_swish_conv(x, BNConvStep(bn1, True, conv1))
        h = bn_swish_conv(h, BNConvStep(bn2, True, conv2))
        return self.skip(x) + RESIDUAL_SCALE * se(h)


class DecoderCell(nn.Module):
    """BN - conv1x1 (expand) - BN - Swish - dwconv5x5 - BN - Swish - conv1x1 - BN - SE (fig. 3a).

    When ``up``, the input is first upsampled (nearest x2) and the skip is bilinear x2 + conv1x1.
    The convolutions inside are followed by BatchNorm, so they carry no weight normalization.

    The three BN-conv steps run as fused chains (:func:`nvae.ops.bn_swish_conv`; Swish is part of
    the step, as in :class:`EncoderCell`). By default the expanded map after the 1x1 expansion is
    stored and the depthwise part recomputed in backward; with ``recompute_expanded`` (set under
    activation checkpointing, see ``NVAE.set_checkpointing``) the whole branch is one chain that
    stores only the cell input and runs the expansion again in backward: less memory for a little
    more compute (docs/performance.md).
    """

    recompute_expanded = False

    def __init__(self, in_channels: int, out_channels: int, expand: int = 6, up: bool = False,
                 use_se: bool = True) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.skip = UpsampleConv(in_channels, out_channels) if up else nn.Identity()
        self.branch = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest") if up else nn.Identity(),
            batch_norm(in_channels),
            Conv2d(in_channels, hidden, 1, bias=False, weight_norm=False),
            batch_norm(hidden),  # + Swish
            DepthwiseConv2d(hidden, 5, padding=2),
            batch_norm(hidden),  # + Swish
            Conv2d(hidden, out_channels, 1, bias=False, weight_norm=False),
            batch_norm(out_channels),
            SqueezeExcite(out_channels) if use_se else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upsample, bn_in, expand, bn_mid, depthwise, bn_out, project, bn_final, se = self.branch  # state-dict order
        expand_step = BNConvStep(bn_in, False, expand)  # BN - conv1x1 (no Swish)
        depthwise_step = BNConvStep(bn_mid, True, depthwise)  # BN - Swish - dwconv5x5
        project_step = BNConvStep(bn_out, True, project)  # BN - Swish - conv1x1
        h = upsample(x)
        if not self.recompute_expanded:
            h = bn_swish_conv(h, expand_step)  # (B, expand * C, H, W), stored
            h = bn_swish_conv(h, depthwise_step, project_step)
        else:
            h = bn_swish_conv(h, expand_step, depthwise_step, project_step)
        return self.skip(x) + RESIDUAL_SCALE * se(bn_final(h))


class EncoderCombiner(nn.Module):
    """Combines a group's encoder feature with the decoder state: enc + conv1x1(dec) (sec. 3.2)."""

    def __init__(self, enc_channels: int, dec_channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(dec_channels, enc_channels, 1)

    def forward(self, enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return enc + self.conv(dec)


class DecoderCombiner(nn.Module):
    """Feeds a latent sample into the decoder state: conv1x1(concat(dec, z))."""

    def __init__(self, dec_channels: int, latent_channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(dec_channels + latent_channels, dec_channels, 1)

    def forward(self, dec: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([dec, z], dim=1))


class AutoregressiveShift(nn.Module):
    """Volume-preserving IAF cell: z' = z - mu(z), mu autoregressive over (pixels, channels).

    masked conv3x3 (expand 6, strictly earlier) - ELU - masked depthwise conv5x5 - ELU - ELU -
    masked conv1x1 back to the latent channels; the Jacobian is triangular with unit diagonal, so
    log|det| = 0 (appendix, "inverse autoregressive flows"). As in the official code, the two
    hidden convolutions carry no bias and the ELU is applied twice before the last convolution
    (once closing the hidden stack, once opening the mu head), so released checkpoints compute
    the same function.
    """

    def __init__(self, latent_channels: int, mirror: bool, expand: int = 6) -> None:
        super().__init__()
        hidden = latent_channels * expand

        def masked(cin: int, cout: int, k: int, groups: int, zero_diagonal: bool, bias: bool) -> Conv2d:
            mask = autoregressive_mask(cin, cout, k, groups, zero_diagonal, mirror)
            return Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias, mask=mask)

        self.net = nn.Sequential(
            masked(latent_channels, hidden, 3, 1, zero_diagonal=True, bias=False), nn.ELU(),
            masked(hidden, hidden, 5, hidden, zero_diagonal=False, bias=False), nn.ELU(),
        )
        self.mu_act = nn.ELU()
        self.mu = masked(hidden, latent_channels, 1, 1, zero_diagonal=False, bias=True)
        with torch.no_grad():  # start close to the identity map
            self.mu.log_weight_norm.add_(math.log(0.1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.mu(self.mu_act(self.net(z)))


class FlowPair(nn.Module):
    """Two autoregressive shifts in opposite pixel orders (one 'flow' of ``num_flows``)."""

    def __init__(self, latent_channels: int) -> None:
        super().__init__()
        self.forward_order = AutoregressiveShift(latent_channels, mirror=False)
        self.reverse_order = AutoregressiveShift(latent_channels, mirror=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.reverse_order(self.forward_order(z))
