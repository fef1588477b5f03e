"""All kernels of a training step in a few batched calls (paper sec. 3.1, weight normalization;
sec. 3.2, spectral regularization).

Per layer, W = exp(log g) * w / (||w|| + eps) costs five small operations per convolution in the
forward pass and about as many in backward: the 255 convolutions of the MNIST model make ~3,000
calls per step, each a kernel launch on a GPU, whatever the size of the convolution. The bank
groups the convolutions by kernel matrix shape (C_out, C_in*k*k) and weight normalization, stacks
each group's weights into one (n, C_out, C_in*k*k) tensor and normalizes (and masks) it in one pass;
each convolution reads its kernel as a view of that stack. The spectral regularizer power-iterates
on the same stacks (:mod:`nvae.spectral`): each kernel is made once per step, and its two
gradients (the convolution's and sigma's) meet in the stack, so that each weight receives one
gradient, laid out as the weight (DDP's buckets compare strides).

The values are those of :meth:`nvae.ops.conv.Conv2d.normalized_weight`. Backward stacks the raw
weights of weight-normalized groups again rather than keeping them (:class:`StackedWeightNorm`);
the groups of plain weights (the decoder's) cost one copy of those weights.

Use: ``with bank.in_use() as stacks:`` around a forward pass (``stacks[i]`` is group ``i``'s stack).
Activation-checkpointed regions recompute with the kernels they first ran with
(:func:`nvae.ops.checkpointing.once_then_frozen`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch

from nvae.ops.conv import WEIGHT_NORM_EPS, Conv2d

GroupKey = tuple[int, int, bool]
"""(C_out, C_in*k*k, weight-normalized): convolutions whose kernel matrices stack together."""


def group_key(conv: Conv2d) -> GroupKey:
    return conv.out_channels, conv.weight[0].numel(), conv.log_weight_norm is not None


def group_convs(convs: Sequence[Conv2d]) -> list[list[Conv2d]]:
    """``convs`` by :func:`group_key`, groups in order of first appearance, convolutions in model order."""
    groups: dict[GroupKey, list[Conv2d]] = {}
    for conv in convs:
        groups.setdefault(group_key(conv), []).append(conv)
    return list(groups.values())


def is_nhwc(kernel: torch.Tensor) -> bool:
    """Whether a 4-d kernel has exactly channels_last strides, (C_in*k*k, 1, k*C_in, C_in).

    Strides, not ``is_contiguous``: a 1x1 kernel is contiguous in both layouts, yet its gradient must
    come back with its own strides (DDP's gradient buckets compare them), which the permuted view
    of :func:`kernel_matrix` gives it.
    """
    if kernel.dim() != 4:
        return False
    _, cin, kh, kw = kernel.shape
    return kernel.stride() == (cin * kh * kw, 1, kw * cin, cin) and kernel.stride() != (cin * kh * kw, kh * kw, kw, 1)


def kernel_matrix(kernel: torch.Tensor, layout_of: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (C_out, C_in*k*k) matrix of a kernel, its columns in the memory order of ``layout_of``
    (default: the kernel itself; then a view, no copy).

    Permuting columns leaves the singular values unchanged, so a channels_last kernel is read as
    (C_out, k*k*C_in) rather than copied into (C_out, C_in*k*k).
    """
    if is_nhwc(kernel if layout_of is None else layout_of):
        return kernel.permute(0, 2, 3, 1).reshape(kernel.shape[0], -1)  # (out, k*k*in)
    return kernel.reshape(kernel.shape[0], -1)


def matrix_as_kernel(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (C_out, cols) matrix of :func:`kernel_matrix` back as a kernel shaped and laid out as ``like`` (a view)."""
    out, cin, kh, kw = like.shape
    if is_nhwc(like):
        return matrix.view(out, kh, kw, cin).permute(0, 3, 1, 2)
    return matrix.view(out, cin, kh, kw)


def _parts(tensors: Sequence[torch.Tensor], n: int, masked: bool) -> tuple[Sequence[torch.Tensor], ...]:
    """:class:`StackedWeightNorm`'s inputs ``(*weights, *masks, *gains)`` as (weights, masks, gains)."""
    return tensors[:n], tensors[n:2 * n] if masked else (), tensors[2 * n if masked else n:]


def _mask_stack(masks: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n, C_out, cols) stack of the masks, each read in its weight's column order."""
    return torch.stack([kernel_matrix(m, layout_of=t) for m, t in zip(masks, weights)])


def _stack(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n, C_out, cols) stack of the kernel matrices m * w (w alone without masks)."""
    w = torch.stack([kernel_matrix(t) for t in weights])  # (n, out, cols)
    return w * _mask_stack(masks, weights) if masks else w


class StackedWeightNorm(torch.autograd.Function):
    """A group's kernels W = s * (m * w), s = exp(log g) / (||m * w|| + eps) per row (eps as
    :func:`nvae.ops.conv.weight_norm`; without gains W = m * w), as one (n, C_out, cols) stack.

    Backward stacks the weights again instead of keeping the forward's stack: what it saves are
    the parameters themselves and per-row norms and scales, so the bank stores no more than the
    per-layer form. With G the gradient of W and t = <G, m * w> per row:
    dL/dlog g = s * t and dL/dw = m * (s * G - s * t / (||m w|| * (||m w|| + eps)) * m w).
    """

    @staticmethod
    def forward(ctx: Any, n: int, masked: bool, *tensors: torch.Tensor) -> torch.Tensor:
        weights, masks, gains = _parts(tensors, n, masked)
        w = _stack(weights, masks)
        norm = scale = None
        if gains:
            norm = torch.linalg.vector_norm(w, dim=2, keepdim=True)  # (n, out, 1)
            scale = torch.exp(torch.stack([g.view(-1) for g in gains])).unsqueeze(2) / (norm + WEIGHT_NORM_EPS)
            w = w * scale
        ctx.n, ctx.masked = n, masked
        ctx.save_for_backward(norm, scale, *tensors)  # parameters (and mask buffers): no copies
        return w

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        norm, scale, *tensors = ctx.saved_tensors
        weights, masks, gains = _parts(tensors, ctx.n, ctx.masked)
        grad_gains: list[Optional[torch.Tensor]] = []
        if gains:
            w = _stack(weights, masks)  # made again: see the class docstring
            grad_log_g = scale * torch.linalg.vecdot(grad, w, dim=2).unsqueeze(2)  # (n, out, 1), no (n, out, cols) temporary
            # A kernel row of zeros (a masked conv's) has t = 0: its coefficient is 0, not 0 / 0.
            coef = grad_log_g / (norm * (norm + WEIGHT_NORM_EPS)).clamp_min(torch.finfo(norm.dtype).tiny)
            grad = (grad * scale).addcmul_(w, coef, value=-1)
            grad_gains = [g_j.view_as(g) for g_j, g in zip(grad_log_g.unbind(0), gains)]
        if masks:
            grad = grad * _mask_stack(masks, weights)
        grad_weights = [matrix_as_kernel(g_j, t) for g_j, t in zip(grad.unbind(0), weights)]  # views, laid out as w
        return (None, None, *grad_weights, *([None] * len(masks)), *grad_gains)


class KernelBank:
    """The batched kernels of ``convs`` (see the module docstring); groups as :func:`group_convs`.

    ``batched``: True (the default) makes the kernels here; False leaves them to the layers
    (``in_use`` then makes nothing), the per-layer form that benchmarks/step_overhead.py compares
    against. On a GPU the bank saves thousands of kernel launches per step; on a CPU it costs about
    what the layers' own weight norms cost (docs/performance.md).
    """

    def __init__(self, convs: Sequence[Conv2d], batched: bool = True) -> None:
        self.groups = group_convs(convs)
        self.batched = batched

    def active(self) -> bool:
        """Whether :meth:`in_use` makes the kernels: batched, and convolutions to make them for."""
        return self.batched and bool(self.groups)

    def make(self) -> list[torch.Tensor]:
        """Each group's (n, C_out, cols) kernel stack."""
        stacks = []
        for convs in self.groups:
            weights = [c.weight for c in convs]
            gains = [c.log_weight_norm for c in convs if c.log_weight_norm is not None]
            masked = any(c.mask is not None for c in convs)
            if not gains and not masked:
                stacks.append(torch.stack([kernel_matrix(w) for w in weights]))  # plain weights: a copy
                continue
            masks = [c.mask if c.mask is not None else torch.ones_like(c.weight) for c in convs] if masked else []
            stacks.append(StackedWeightNorm.apply(len(convs), masked, *weights, *masks, *gains))
        return stacks

    @contextmanager
    def in_use(self) -> Iterator[Optional[list[torch.Tensor]]]:
        """Give every convolution its kernel for the block's duration (``Conv2d.step_kernel``, a view of its
        group's stack); yields the stacks (None when the bank is not :meth:`active`)."""
        if not self.active():
            yield None
            return
        stacks = self.make()
        for convs, stack in zip(self.groups, stacks):
            for conv, matrix in zip(convs, stack.unbind(0)):  # unbind: one backward node for the group
                conv.step_kernel = matrix_as_kernel(matrix, conv.weight)
        try:
            yield stacks
        finally:
            for convs in self.groups:
                for conv in convs:
                    conv.step_kernel = None
