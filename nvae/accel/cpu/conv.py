"""The CPU backend's convolution (paper sec. 3.1-3.2): weight normalization with a hand-written
backward (4 passes over the kernel instead of autograd's ~8), kernels kept for the spectral
regularizer with their tokens (:mod:`nvae.accel.cpu.tokens`), and the fused BN-Swish-conv chains
(:mod:`nvae.accel.cpu.chains`). Off the CPU every call falls back to plain PyTorch.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from nvae.accel.cpu.chains import run_chain
from nvae.accel.cpu.tokens import SpectralToken, add_token_grad, strided_like
from nvae.compat import conv_backward
from nvae.ops.chains import BNConvStep
from nvae.ops.conv import WEIGHT_NORM_EPS, Conv2d, weight_norm
from nvae.spectral import SpectralKernel


class WeightNorm(torch.autograd.Function):
    """:func:`weight_norm` with a hand-written backward (fewer passes over the kernel on CPU).

    With n = ||w||, s = exp(log_g) / (n + eps) and t = <G, w> per output channel:
    dL/dlog_g = s * t and dL/dw = s * G - s * t / (n * (n + eps)) * w.

    Given a ``slot`` (the convolution's :class:`ConvAccel`), two more outputs serve the spectral
    regularizer (sec. 3.2): the scale s (no gradient), so that it can iterate on w and s instead of
    keeping the kernel-sized W, and a zero scalar token whose gradient c adds c u v^T (u, v from the
    slot) to G here.
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, log_g: torch.Tensor, slot: Optional["ConvAccel"] = None
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


class ConvAccel:
    """One convolution's CPU accelerator (:class:`nvae.ops.conv.ConvAccelerator`) and its link to the
    spectral regularizer: the kernel a training forward made, the regularizer's u, v for it, and
    whether an activation-checkpointed region is running again."""

    def __init__(self) -> None:
        self.kernel: Optional[SpectralKernel] = None
        """Set by the forward in a training step, taken (and cleared) by the regularizer."""
        self.uv: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.recomputing = False
        """True while a checkpointed region runs again in backward: nothing is kept then (the record
        would stay alive until the next step)."""

    def take_kernel(self) -> Optional[SpectralKernel]:
        kernel, self.kernel = self.kernel, None
        return kernel

    @staticmethod
    def applies(conv: Conv2d) -> bool:
        return conv.weight.device.type == "cpu"

    def masked_weight(self, conv: Conv2d) -> torch.Tensor:
        """The raw weight times the mask, its gradient laid out as the weight (see :class:`Masked`)."""
        if conv.mask is None:
            return conv.weight
        if self.applies(conv) and torch.is_grad_enabled():
            return Masked.apply(conv.weight, conv.mask)
        return conv.weight * conv.mask

    def normalized_weight(self, conv: Conv2d) -> torch.Tensor:
        """:meth:`Conv2d.normalized_weight` through :class:`WeightNorm` on the CPU."""
        w = self.masked_weight(conv)
        if conv.log_weight_norm is None:
            return w
        return WeightNorm.apply(w, conv.log_weight_norm) if self.applies(conv) else weight_norm(w, conv.log_weight_norm)

    def forward_kernel(self, conv: Conv2d) -> torch.Tensor:
        """The kernel for this forward pass; in a training step on the CPU also kept for the regularizer
        (w and s with a token; W itself under torch.compile, whose compiled backward cannot read the
        u, v set after the forward). A kernel bank's kernel for this step is used as it is."""
        if conv.step_kernel is not None:
            return conv.step_kernel
        if not (conv.training and torch.is_grad_enabled() and self.applies(conv)):
            return self.normalized_weight(conv)
        compiling = torch.compiler.is_compiling()
        if conv.log_weight_norm is None and not compiling:
            # The token's node runs in recomputation too (checkpointing expects the same saved tensors)
            w = self.masked_weight(conv)
            weight, token = SpectralToken.apply(w, None if self.recomputing else self)
            if not self.recomputing:
                self.kernel = SpectralKernel(w.detach(), None, token)
            return weight
        if self.recomputing:
            return self.normalized_weight(conv)
        if compiling:
            weight = self.normalized_weight(conv)
            self.kernel = SpectralKernel(weight, None, None)
            return weight
        w = self.masked_weight(conv)
        weight, token, scale = WeightNorm.apply(w, conv.log_weight_norm, self)
        self.kernel = SpectralKernel(w.detach(), scale, token)  # w and s: no kernel-sized copy kept
        return weight

    def forward(self, conv: Conv2d, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(conv, x, self.forward_kernel(conv), conv.bias)

    def chain(self, x: torch.Tensor, steps: tuple[BNConvStep, ...]) -> Optional[torch.Tensor]:
        """The chain as one autograd node when every step's convolution has this backend (else None)."""
        return run_chain(x, steps)

    def convolve(self, conv: Conv2d, x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``conv``'s convolution of ``x`` with the given kernel and bias."""
        return conv._conv_forward(x, weight, bias)

    def convolve_backward(self, conv: Conv2d, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          mask: tuple[bool, bool, bool]) -> tuple[Optional[torch.Tensor], ...]:
        """Gradients (input, weight, bias; those selected by ``mask``) of :meth:`convolve` at ``x``."""
        bias_sizes = [conv.out_channels] if mask[2] else None
        return conv_backward(grad_out, x, weight, bias_sizes, conv.stride, conv.padding,
                             conv.dilation, False, [0, 0], conv.groups, list(mask))
