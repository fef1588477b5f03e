"""The weight-normalized convolution of every NVAE cell (paper sec. 3.1; Salimans & Kingma 2016).

W = exp(log g) * w / (||w|| + eps) per output channel, by plain autograd. A backend
(:mod:`nvae.accel`) may give a convolution an accelerator that runs it otherwise on the device the
accelerator knows (the CPU backend: hand-written autograd and spectral tokens); the function
computed stays this one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from nvae.spectral import SpectralKernel

WEIGHT_NORM_EPS = 1e-5


def weight_norm(w: torch.Tensor, log_g: torch.Tensor) -> torch.Tensor:
    """w * exp(log_g) / (||w|| + eps) per output channel, by plain autograd."""
    norm = torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)  # (out, 1, 1, 1)
    return w * (torch.exp(log_g) / (norm + WEIGHT_NORM_EPS))


class ConvAccelerator(Protocol):
    """What a backend gives one convolution (:mod:`nvae.accel`); each convolution has its own."""

    recomputing: bool
    """True while an activation-checkpointed region runs again in backward."""
    uv: Optional[tuple[torch.Tensor, torch.Tensor]]
    """The spectral regularizer's current (u, v) for this convolution."""

    def forward(self, conv: "Conv2d", x: torch.Tensor) -> torch.Tensor:
        """``conv(x)``."""
        ...

    def take_kernel(self) -> Optional["SpectralKernel"]:
        """The kernel this step's forward made, if it kept one for the regularizer (then forgotten)."""
        ...


class Conv2d(nn.Conv2d):
    """Convolution with optional weight normalization w = g * v / ||v|| (sec. 3.1).

    The gain is stored as ``log_weight_norm`` (one per output channel). With ``mask`` given, the
    kernel is multiplied by it before normalization (autoregressive convolutions of the flows).
    ``accel`` is a backend's accelerator for this layer (None: plain PyTorch). ``step_kernel`` is
    the kernel a :class:`nvae.ops.kernel_bank.KernelBank` made for the current training step (the
    same values as :meth:`normalized_weight`, made together with the other layers'), else None.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = True, weight_norm: bool = True,
                 mask: Optional[torch.Tensor] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.register_buffer("mask", mask, persistent=False)
        self.accel: Optional[ConvAccelerator] = None
        self.step_kernel: Optional[torch.Tensor] = None
        self.log_weight_norm: Optional[nn.Parameter] = None
        if weight_norm:
            norm = (self.weight if mask is None else self.weight * mask).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            self.log_weight_norm = nn.Parameter(torch.log(norm + 1e-2))

    def masked_weight(self) -> torch.Tensor:
        """The raw weight, times the autoregressive mask if there is one."""
        return self.weight if self.mask is None else self.weight * self.mask

    def normalized_weight(self) -> torch.Tensor:
        """The kernel this convolution applies: masked, then scaled to norm exp(log g) per output channel."""
        w = self.masked_weight()
        return w if self.log_weight_norm is None else weight_norm(w, self.log_weight_norm)

    def kernel(self) -> torch.Tensor:
        """The kernel of this forward pass: the bank's for this step, else made here."""
        return self.normalized_weight() if self.step_kernel is None else self.step_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.accel is not None:
            return self.accel.forward(self, x)
        return self._conv_forward(x, self.kernel(), self.bias)
