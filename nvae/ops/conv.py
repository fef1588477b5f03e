"""The weight-normalized convolution of every NVAE cell (paper sec. 3.1; Salimans & Kingma 2016).

W = exp(log g) * w / (||w|| + eps) per output channel. On CPU with ``fused`` on (the default,
``NVAEConfig.fused_ops``), the normalization runs as :class:`WeightNorm`, an autograd node with a
hand-written backward (4 passes over the kernel instead of autograd's ~8) that also hands the
spectral regularizer its token (:mod:`nvae.spectral`). Elsewhere it is the plain composition.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from nvae.compat import conv_backward
from nvae.spectral import SpectralKernel, SpectralSlot, SpectralToken, add_token_grad, strided_like

WEIGHT_NORM_EPS = 1e-5


def weight_norm(w: torch.Tensor, log_g: torch.Tensor) -> torch.Tensor:
    """w * exp(log_g) / (||w|| + eps) per output channel, by plain autograd."""
    norm = torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)  # (out, 1, 1, 1)
    return w * (torch.exp(log_g) / (norm + WEIGHT_NORM_EPS))


class WeightNorm(torch.autograd.Function):
    """:func:`weight_norm` with a hand-written backward (fewer passes over the kernel on CPU).

    With n = ||w||, s = exp(log_g) / (n + eps) and t = <G, w> per output channel:
    dL/dlog_g = s * t and dL/dw = s * G - s * t / (n * (n + eps)) * w.

    Given a ``slot``, two more outputs serve the spectral regularizer (sec. 3.2): the scale s (no
    gradient), so that it can iterate on w and s instead of keeping the kernel-sized W, and a zero
    scalar token whose gradient c adds c u v^T (u, v from the slot) to G here.
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, log_g: torch.Tensor, slot: Optional[SpectralSlot] = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        norm = torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)  # (out, 1, 1, 1); no copy if NHWC
        scale = torch.exp(log_g) / (norm + WEIGHT_NORM_EPS)
        ctx.save_for_backward(w, norm, scale)
        ctx.slot = slot
        ctx.set_materialize_grads(False)
        if slot is None:
            return w * scale
        out_scale = scale.detach().clone()
        ctx.mark_non_differentiable(out_scale)
        return w * scale, w.new_zeros(()), out_scale

    @staticmethod
    def backward(ctx: Any, grad: Optional[torch.Tensor], grad_token: Optional[torch.Tensor] = None,
                 grad_scale: None = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        w, norm, scale = ctx.saved_tensors
        grad, own = add_token_grad(grad, grad_token, ctx.slot, w)  # own: a new tensor, free to be scaled in place
        if grad is None:
            return None, None, None
        dot = (grad * w).sum(dim=(1, 2, 3), keepdim=True)  # (out, 1, 1, 1)
        grad_log_g = scale * dot
        # A kernel row of zeros (a masked conv's) has t = 0: its coefficient is 0, not 0 / 0.
        coef = grad_log_g / (norm * (norm + WEIGHT_NORM_EPS)).clamp_min(torch.finfo(norm.dtype).tiny)
        return torch.addcmul(grad.mul_(scale) if own else grad * scale, w, coef, value=-1), grad_log_g, None


class Masked(torch.autograd.Function):
    """weight * mask (an autoregressive convolution's kernel) with the gradient laid out as the
    weight; a multiplication's backward returns the canonical strides of its broadcast instead."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight, mask = ctx.saved_tensors
        return strided_like(grad * mask, weight), None


class Conv2d(nn.Conv2d):
    """Convolution with optional weight normalization w = g * v / ||v|| (sec. 3.1).

    The gain is stored as ``log_weight_norm`` (one per output channel). With ``mask`` given, the
    kernel is multiplied by it before normalization (autoregressive convolutions of the flows).
    ``spectral`` is this convolution's link to the spectral regularizer (sec. 3.2).
    """

    fused: bool = True
    """Hand-written autograd on CPU (see the module docstring); set by :func:`nvae.ops.fused.use_fused_ops`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = True, weight_norm: bool = True,
                 mask: Optional[torch.Tensor] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.register_buffer("mask", mask, persistent=False)
        self.spectral = SpectralSlot()
        self.log_weight_norm: Optional[nn.Parameter] = None
        if weight_norm:
            norm = (self.weight if mask is None else self.weight * mask).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            self.log_weight_norm = nn.Parameter(torch.log(norm + 1e-2))

    def uses_cpu_autograd(self) -> bool:
        """Whether this layer runs the hand-written CPU autograd now (``fused`` on and the weight on the CPU)."""
        return self.fused and self.weight.device.type == "cpu"

    def masked_weight(self) -> torch.Tensor:
        """The raw weight, times the autoregressive mask if there is one."""
        if self.mask is None:
            return self.weight
        if self.uses_cpu_autograd() and torch.is_grad_enabled():
            return Masked.apply(self.weight, self.mask)
        return self.weight * self.mask

    def normalized_weight(self) -> torch.Tensor:
        """The kernel this convolution applies: masked, then scaled to norm exp(log g) per output channel."""
        w = self.masked_weight()
        if self.log_weight_norm is None:
            return w
        return WeightNorm.apply(w, self.log_weight_norm) if self.uses_cpu_autograd() else weight_norm(w, self.log_weight_norm)

    def forward_kernel(self) -> torch.Tensor:
        """:meth:`normalized_weight` for this forward pass; in a fused training step on CPU it is also
        recorded in ``self.spectral`` (w and s with a token; W itself under torch.compile, whose
        compiled backward cannot read the u, v set after the forward)."""
        slot = self.spectral
        if not (self.training and torch.is_grad_enabled() and self.uses_cpu_autograd()):
            return self.normalized_weight()
        compiling = torch.compiler.is_compiling()
        if self.log_weight_norm is None and not compiling:
            # The token's node runs in recomputation too (checkpointing expects the same saved tensors)
            w = self.masked_weight()
            weight, token = SpectralToken.apply(w, None if slot.recomputing else slot)
            if not slot.recomputing:
                slot.kernel = SpectralKernel(w.detach(), None, token)
            return weight
        if slot.recomputing:
            return self.normalized_weight()
        if compiling:
            weight = self.normalized_weight()
            slot.kernel = SpectralKernel(weight, None, None)
            return weight
        w = self.masked_weight()
        weight, token, scale = WeightNorm.apply(w, self.log_weight_norm, slot)
        slot.kernel = SpectralKernel(w.detach(), scale, token)  # w and s: no kernel-sized copy kept
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(x, self.forward_kernel(), self.bias)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """This layer's convolution of ``x`` with the given kernel and bias."""
        return self._conv_forward(x, weight, bias)

    def convolve_backward(self, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          mask: tuple[bool, bool, bool]) -> tuple[Optional[torch.Tensor], ...]:
        """Gradients (input, weight, bias; those selected by ``mask``) of :meth:`convolve` at ``x``."""
        bias_sizes = [self.out_channels] if mask[2] else None
        return conv_backward(grad_out, x, weight, bias_sizes, self.stride, self.padding,
                             self.dilation, False, [0, 0], self.groups, list(mask))
