"""Spectral tokens (paper sec. 3.2, spectral regularization, on the CPU backend): sigma's gradient
joins each convolution's own gradient in its backward.

The regularizer (:class:`nvae.spectral.SpectralRegularizer`) computes sigma = u^T W v. On the plain
path W is made again from the parameters and autograd gives the weight two gradients, sigma's held
from the start of backward. Here a training step's forward keeps what it made (w and the weight
norm's scale s, with a zero scalar *token*) in the convolution's accelerator; the regularizer
iterates on that, sets u, v there, and adds the tokens to the loss; each token's gradient c becomes
c u v^T inside the convolution's backward (:func:`add_token_grad`). So the weight receives one
gradient, and no kernel-sized gradient waits for the convolution.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from nvae.spectral import kernel_row

if TYPE_CHECKING:
    from nvae.accel.cpu.conv import ConvAccel


def strided_like(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` with exactly ``like``'s strides: a view when they differ only in size-1 dimensions.

    Autograd's layout contract ignores the strides of size-1 dimensions, DDP's gradient buckets do
    not: a 1x1 kernel's gradient laid out as (C, 1, 1, 1) for a channels_last parameter with strides
    (C, 1, C, C) draws "Grad strides do not match bucket view strides". Such a view addresses the
    same elements; any other difference is copied into ``like``'s layout.
    """
    if grad.stride() == like.stride():
        return grad
    if grad.shape == like.shape and all(n == 1 or a == b for n, a, b in zip(grad.shape, grad.stride(), like.stride())):
        return grad.as_strided(like.shape, like.stride())
    return torch.empty_like(like, dtype=grad.dtype).copy_(grad)


def add_token_grad(grad: Optional[torch.Tensor], grad_token: Optional[torch.Tensor], slot: Optional["ConvAccel"],
                   like: torch.Tensor) -> tuple[Optional[torch.Tensor], bool]:
    """G + c u v^T for a spectral token's gradient c (u, v from ``slot``), v laid out as one kernel row
    of ``like``. Returns (G', whether G' is a new tensor)."""
    uv = None if grad_token is None or slot is None else slot.uv
    if uv is None:
        return grad, False
    u, v = uv
    cu = (grad_token * u).view(-1, 1, 1, 1)  # (out, 1, 1, 1)
    v_row = kernel_row(v, like)
    return (cu * v_row if grad is None else torch.addcmul(grad, cu, v_row)), True


class SpectralToken(torch.autograd.Function):
    """The kernel of a convolution without weight normalization, and its spectral token.

    Sigma's gradient c u v^T joins the convolution's own gradient in this node's backward, laid out
    exactly as the weight (:func:`strided_like`; DDP's buckets compare strides). Weight-normalized
    convolutions get their token from :class:`nvae.accel.cpu.conv.WeightNorm` instead.
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, slot: Optional["ConvAccel"]) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(w)
        ctx.slot = slot
        ctx.set_materialize_grads(False)
        return w.view_as(w), w.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: Optional[torch.Tensor],
                 grad_token: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], None]:
        (w,) = ctx.saved_tensors
        grad, _ = add_token_grad(grad, grad_token, ctx.slot, w)
        return (None if grad is None else strided_like(grad, w)), None
