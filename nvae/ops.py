"""Building blocks of NVAE's cells (paper sec. 3.1, fig. 3; appendix A).

Weight-normalized convolution, fused BatchNorm-Swish-conv steps (sec. 3.1), squeeze-excitation,
the down-sampling skip (factorized reduce), the up-sampling skip (bilinear x2 + 1x1 conv), the
masked convolution used by the autoregressive flow cells (sec. 3.2, "normalizing flows") and a
cell sequence with optional activation checkpointing (sec. 3.3 discusses NVAE's memory cost).
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nvae.compat import BatchNormBase, batch_norm_backward, conv_backward, silu_backward

BN_MOMENTUM = 0.05
BN_EPS = 1e-5
# Ways to take the depthwise weight gradient on CPU, tried once per map shape (see DepthwiseConv2d):
# "folded" (one forward depthwise conv with the batch folded into the channels) or oneDNN's
# weight-gradient kernel over blocks of this many channels per call (0: all at once).
DEPTHWISE_GRAD_METHODS: tuple[str | int, ...] = ("folded", 0, 256, 128)
# The method under torch.use_deterministic_algorithms (trainer.deterministic): the methods sum in
# different orders, so a choice by timing could differ between runs in the last bits.
DETERMINISTIC_WEIGHT_GRAD = "folded"


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with the paper's momentum (0.05); sec. 3.1 notes the default 0.1 hurts sampling."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


Step = tuple[nn.BatchNorm2d, bool, "Conv2d"]  # (BatchNorm, Swish after it?, convolution)


def bn_swish_conv(x: torch.Tensor, *steps: Step) -> torch.Tensor:
    """``conv(swish(bn(x)))`` (Swish where the step says so) for each step, as one autograd node in training.

    Swish belongs to the step, not to the BatchNorm module: converting BatchNorm layers to
    SyncBatchNorm (``trainer.sync_batchnorm``) and back replaces the modules and keeps the model.
    The node saves only ``x`` and the per-channel batch statistics (not even the weight-normalized
    kernels: recomputing them is one multiply per weight). In backward, the BN and Swish
    outputs are recomputed from them with one multiply-add and one Swish each, and the inner
    convolutions' outputs by running those convolutions once more (the last conv's output is the
    result; the batch statistics are not recomputed and the running statistics move once).
    One step stores one map instead of three. The decoder cell (sec. 3.1, fig. 3a) is one chain,
    BN-conv1x1 / BN-Swish-dwconv5x5 / BN-Swish-conv1x1, storing only the cell input instead of
    six maps, five of them expanded x6, for one more 1x1 and depthwise convolution in backward.
    SyncBatchNorm layers run as modules, step by step: their statistics come from all processes.
    """
    bns = [bn for bn, _, _ in steps]
    if not (bns[0].training and torch.is_grad_enabled()) or any(isinstance(bn, nn.SyncBatchNorm) for bn in bns):
        for bn, swish, conv in steps:
            x = bn(x)
            x = conv(F.silu(x) if swish else x)
        return x
    momenta = tuple(_count_batch(bn) for bn in bns)
    params, scales = [], []
    for bn, _, conv in steps:
        params += [bn.weight, bn.bias, conv.kernel(), conv.bias]
        kept = conv.__dict__.get("last_weight")  # (w, s, token) if kernel() made W = s * w just now
        fresh = kept is not None and kept[2] is not None and not _recomputing  # recomputation stashes nothing
        scales.append(kept[1] if fresh else None)
    return _BNSwishConvs.apply(x, steps, momenta, tuple(scales), *params)


def _count_batch(bn: nn.BatchNorm2d) -> float:
    """What nn.BatchNorm2d.forward does before normalizing: count the batch; the running-average factor."""
    momentum = bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative average
            momentum = 1.0 / float(bn.num_batches_tracked)
    return momentum or 0.0


def _autocast_off(device: str) -> AbstractContextManager[Any]:
    """A region without autocast; nothing to enter when it is off already (the usual case: ~4 us saved per call)."""
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext()


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def _normalize(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
               invstd: torch.Tensor, eps: float) -> torch.Tensor:
    """The BatchNorm output from saved batch statistics: h * scale + shift per channel.

    Maps in another dtype than the statistics (bf16 under autocast) go through BatchNorm's own
    inference kernel: a mixed-dtype addcmul takes TensorIterator's scalar casting path, 6.8 ms
    against 0.2 ms on (8, 1536, 16, 16) bf16.
    """
    if h.dtype != invstd.dtype:
        return torch.native_batch_norm(h, weight, bias, mean, invstd.pow(-2) - eps, False, 0.0, eps)[0]
    scale = weight * invstd
    shift = bias - mean * scale
    return torch.addcmul(shift.view(1, -1, 1, 1), h, scale.view(1, -1, 1, 1))


class _BNSwishConvs(torch.autograd.Function):
    """Autograd of a chain of conv(swish(batch_norm(h))) that recomputes its insides (see bn_swish_conv).

    Under autocast the convolutions run in the autocast dtype (explicit casts, as autocast would)
    and BatchNorm in its input's dtype; gradients come back in the parameters' dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, steps: tuple[Step, ...],
                momenta: tuple[float, ...], scales: tuple[torch.Tensor | None, ...],
                *params: torch.Tensor | None) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        stats: list[torch.Tensor] = []
        h = x
        with _autocast_off(device):
            for i, ((bn, swish, conv), momentum) in enumerate(zip(steps, momenta)):
                bn_w, bn_b, w, b = params[4 * i:4 * i + 4]
                y, mean, invstd = torch.native_batch_norm(h, bn_w, bn_b, bn.running_mean, bn.running_var, True,
                                                          momentum, bn.eps)
                a = F.silu(y, inplace=True) if swish else y
                h = conv.convolve(_cast(a, dtype), _cast(w, dtype), _cast(b, dtype))
                # float32 statistics whatever the compiled graph returns (BN backward on bf16 maps expects them)
                stats += [mean.to(bn.running_var.dtype), invstd.to(bn.running_var.dtype)]
        kernels_dropped = [None if i % 4 == 2 else t for i, t in enumerate(params)]  # recomputed in backward
        ctx.save_for_backward(x, *stats, *kernels_dropped)
        ctx.steps, ctx.dtype, ctx.scales = steps, dtype, scales  # scales: (out, 1, 1, 1) each, no gradient
        return h

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *saved = ctx.saved_tensors
        steps, dtype, n = ctx.steps, ctx.dtype, len(ctx.steps)
        stats, params = saved[:2 * n], list(saved[2 * n:])
        for i, ((_, _, conv), scale) in enumerate(zip(steps, ctx.scales)):  # the weights are those of forward
            params[4 * i + 2] = (conv.normalized_weight() if scale is None else conv._masked() * scale).detach()
        need = ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * (4 * n)
        with _autocast_off(x.device.type):
            acts = []  # per step: its input h, BN output y, Swish output a (recomputed)
            h = x
            for i, (bn, swish, conv) in enumerate(steps):
                bn_w, bn_b, w, b = params[4 * i:4 * i + 4]
                y = _normalize(h, bn_w, bn_b, *stats[2 * i:2 * i + 2], bn.eps)
                a = F.silu(y) if swish else y
                acts.append((h, y, a))
                if i < n - 1:
                    h = conv.convolve(_cast(a, dtype), _cast(w, dtype), _cast(b, dtype))
            for i in reversed(range(n)):
                (bn, swish, conv), (h, y, a) = steps[i], acts.pop()
                bn_w, bn_b, w, b = params[4 * i:4 * i + 4]
                mask = (True, need[6 + 4 * i], need[7 + 4 * i] and b is not None)
                grad_a, grad_w, grad_b = conv.convolve_backward(grad, _cast(a, dtype), _cast(w, dtype), mask)
                del a
                grad_y = silu_backward(grad_a.to(y.dtype), y) if swish else grad_a
                del y, grad_a
                grad, grad_bn_w, grad_bn_b = batch_norm_backward(
                    grad_y, h, bn_w, None, None, *stats[2 * i:2 * i + 2], True, bn.eps,
                    [i > 0 or need[0], need[4 + 4 * i], need[5 + 4 * i]])
                del grad_y, h
                grads[4 * i:4 * i + 4] = [grad_bn_w, grad_bn_b, _cast(grad_w, w.dtype),
                                          None if b is None else _cast(grad_b, b.dtype)]
        return (grad, None, None, None, *grads)


WEIGHT_NORM_EPS = 1e-5


class _WeightNorm(torch.autograd.Function):
    """w * exp(log_g) / (||w|| + eps) per output channel, with a hand-written backward.

    Autograd's backward of the composition takes ~8 kernel-sized passes and ~15 small ops per
    conv; this one takes 4 passes (MNIST preset, 150 convs, forward and backward: 35 -> 26 ms per
    step on 2 cores).
    With n = ||w||, s = exp(log_g) / (n + eps) and t = <G, w> per output channel:
    dL/dlog_g = s * t and dL/dw = s * G - s * t / (n * (n + eps)) * w.

    Given an ``owner`` conv, two more outputs serve the spectral regularizer (sec. 3.2): the scale
    s (no gradient), so that it can run its power iteration on w and s instead of keeping the
    kernel-sized W from the forward pass, and a zero scalar "spectral token" that it adds to
    sigma = u^T W v, leaving its u, v in ``owner.__dict__["spectral_uv"]``. The token's gradient c
    adds c * u v^T to G here, when the conv's own gradient arrives, instead of a kernel-sized
    gradient that autograd would hold from the start of backward until the conv is reached (all
    kernels at once: 0.5 GB for the CIFAR-10 preset).
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, log_g: torch.Tensor, owner: nn.Module | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        norm = torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)  # (out, 1, 1, 1); no copy if NHWC
        scale = torch.exp(log_g) / (norm + WEIGHT_NORM_EPS)
        ctx.save_for_backward(w, norm, scale)
        ctx.owner = owner
        ctx.set_materialize_grads(False)
        if owner is None:
            return w * scale
        out_scale = scale.detach().clone()
        ctx.mark_non_differentiable(out_scale)
        return w * scale, w.new_zeros(()), out_scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None, grad_token: torch.Tensor | None = None,
                 grad_scale: None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        w, norm, scale = ctx.saved_tensors
        grad, own = _add_spectral_grad(grad, grad_token, ctx.owner, w)  # own: a new tensor, free to be scaled in place
        if grad is None:
            return None, None, None
        dot = (grad * w).sum(dim=(1, 2, 3), keepdim=True)  # (out, 1, 1, 1)
        grad_log_g = scale * dot
        # A kernel row of zeros (a masked conv's) has t = 0: its coefficient is 0, not 0 / 0.
        coef = grad_log_g / (norm * (norm + WEIGHT_NORM_EPS)).clamp_min(torch.finfo(norm.dtype).tiny)
        return torch.addcmul(grad.mul_(scale) if own else grad * scale, w, coef, value=-1), grad_log_g, None


def _add_spectral_grad(grad: torch.Tensor | None, grad_token: torch.Tensor | None, owner: nn.Module | None,
                       like: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """G + c u v^T for a spectral token's gradient c (u, v left by the regularizer in ``owner``);
    v laid out as one kernel row of ``like``. Returns (G', whether G' is a new tensor)."""
    uv = None if grad_token is None or owner is None else owner.__dict__.get("spectral_uv")
    if uv is None:
        return grad, False
    u, v = uv
    cu = (grad_token * u).view(-1, 1, 1, 1)  # (out, 1, 1, 1)
    v_row = kernel_row(v, like)
    return (cu * v_row if grad is None else torch.addcmul(grad, cu, v_row)), True


class _SpectralToken(torch.autograd.Function):
    """The kernel of a convolution without weight normalization, and its spectral token.

    As in :class:`_WeightNorm`: sigma's gradient c u v^T joins the convolution's own gradient in
    this node's backward, so the weight receives one gradient, not two that autograd would add up
    at the end (holding the regularizer's kernel-sized one from the start of backward). That one
    gradient is laid out exactly as the weight (:func:`strided_like`; DDP's buckets compare strides).
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, owner: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(w)
        ctx.owner = owner
        ctx.set_materialize_grads(False)
        return w.view_as(w), w.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None,
                 grad_token: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        (w,) = ctx.saved_tensors
        grad, _ = _add_spectral_grad(grad, grad_token, ctx.owner, w)
        return (None if grad is None else strided_like(grad, w)), None


class _Masked(torch.autograd.Function):
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


def kernel_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """The (C_out, C_in*k*k) matrix of a kernel, its columns in memory order (a view, no copy).

    Permuting columns leaves the singular values unchanged, so a channels_last kernel is read as
    (C_out, k*k*C_in) rather than copied into (C_out, C_in*k*k).
    """
    if _is_nhwc(kernel):
        return kernel.permute(0, 2, 3, 1).flatten(1)  # (out, k*k*in)
    return kernel.flatten(1)


def kernel_row(row: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (cols,) row of ``kernel_matrix(like)`` as a (1, C_in, k, k) kernel in ``like``'s layout (a view)."""
    out, cin, kh, kw = like.shape
    if _is_nhwc(like):
        return row.view(1, kh, kw, cin).permute(0, 3, 1, 2)
    return row.view(1, cin, kh, kw)


def _is_nhwc(kernel: torch.Tensor) -> bool:
    return kernel.dim() == 4 and not kernel.is_contiguous() and kernel.is_contiguous(memory_format=torch.channels_last)


class Conv2d(nn.Conv2d):
    """Convolution with optional weight normalization w = g * v / ||v|| (sec. 3.1; Salimans & Kingma).

    The gain is stored as ``log_weight_norm`` (one per output channel). With ``mask`` given, the
    kernel is multiplied by it before normalization (autoregressive convolutions of the flows).
    ``normalized_weight()`` is also what the spectral regularizer reads (sec. 3.2).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = True, weight_norm: bool = True,
                 mask: torch.Tensor | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.register_buffer("mask", mask, persistent=False)
        self.log_weight_norm: nn.Parameter | None = None
        if weight_norm:
            norm = self._masked().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            self.log_weight_norm = nn.Parameter(torch.log(norm + 1e-2))

    def _masked(self) -> torch.Tensor:
        if self.mask is None:
            return self.weight
        return _Masked.apply(self.weight, self.mask) if torch.is_grad_enabled() else self.weight * self.mask

    def normalized_weight(self) -> torch.Tensor:
        """The kernel actually applied: masked, then scaled to norm exp(log g) per output channel."""
        w = self._masked()
        if self.log_weight_norm is None:
            return w
        return _WeightNorm.apply(w, self.log_weight_norm)

    def kernel(self) -> torch.Tensor:
        """``normalized_weight()``, kept (in training) for the spectral regularizer's :meth:`take_weight`.

        In eager training the kernel comes with a spectral token (see :class:`_WeightNorm`, and
        :class:`_SpectralToken` for a convolution without weight normalization); under
        torch.compile it does not (a compiled backward cannot read the u, v set after the forward).
        """
        if not (self.training and torch.is_grad_enabled()):
            return self.normalized_weight()
        if self.log_weight_norm is None and not torch.compiler.is_compiling():
            # The token's node runs in recomputation too (checkpointing expects the same saved tensors)
            w = self._masked()
            weight, token = _SpectralToken.apply(w, None if _recomputing else self)
            if not _recomputing:
                self.__dict__["last_weight"] = (w.detach(), None, token)
            return weight
        if _recomputing:
            return self.normalized_weight()
        if torch.compiler.is_compiling():
            weight = self.normalized_weight()
            self.__dict__["last_weight"] = (weight, None, None)  # reused (and released) by the spectral regularizer
        else:
            w = self._masked()
            weight, token, scale = _WeightNorm.apply(w, self.log_weight_norm, self)
            self.__dict__["last_weight"] = (w.detach(), scale, token)  # w and s: no kernel-sized copy kept
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(x, self.kernel(), self.bias)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This layer's convolution of ``x`` with the given kernel and bias."""
        return self._conv_forward(x, weight, bias)

    def convolve_backward(self, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          mask: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
        """Gradients (input, weight, bias; those selected by ``mask``) of :meth:`convolve` at ``x``."""
        bias_sizes = [self.out_channels] if mask[2] else None
        return conv_backward(grad_out, x, weight, bias_sizes, self.stride, self.padding,
                                                   self.dilation, False, [0, 0], self.groups, list(mask))

    def take_weight(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What the spectral regularizer reads, released: (w, s, token) if this training step's
        forward pass made the kernel W = s * w with a spectral token (see :class:`_WeightNorm`);
        (W, None, None) with W from the forward pass under torch.compile, or made now otherwise."""
        kept = self.__dict__.pop("last_weight", None)
        return kept if kept is not None else (self.normalized_weight(), None, None)


class DepthwiseConv2d(Conv2d):
    """Depthwise convolution (one filter per channel) of the decoder cells (sec. 3.1, fig. 3a).

    On CPU it runs in channels_last memory format whatever the layout of its input: oneDNN's
    depthwise kernels are ~8x faster forward and ~3x faster backward in NHWC than in NCHW
    (CIFAR-10 decoder shape (8, 768, 32, 32): 22 ms -> 2.8 ms forward, 74 ms -> 27 ms backward on
    2 cores), which pays for the two layout copies. The output keeps the input's layout. No weight
    normalization (BatchNorm follows it); spectrally regularized like every :class:`Conv2d`.
    The input gradient (used by :func:`bn_swish_conv`) is the forward convolution of the output
    gradient with the flipped kernel, which oneDNN runs ~3.5x faster on CPU than its own
    input-gradient kernel ((8, 1536, 16, 16): 4.6 -> 1.3 ms). The weight gradient is taken in
    float32 (oneDNN's bf16 kernel for it is about 2x slower) by whichever of
    :data:`DEPTHWISE_GRAD_METHODS` ran fastest (best of three) the first time a map shape came by:
    oneDNN's weight-gradient kernel, whole or by blocks of channels, or :meth:`weight_grad_folded`,
    a forward depthwise convolution over batch x channels. Measured alone (2 cores, NHWC, batch 8,
    float32, ms): 768 channels at 8x8: whole 0.98, blocks of 128 1.52, folded 0.82; 1536 at 4x4:
    0.85, 1.87, 0.48; 1536 at 16x16: 11.3, 9.0, 9.5; 768 at 32x32: 19.8, 19.0, 17.9. Without
    ``keep_heap_memory`` oneDNN's scratchpad for whole maps is mmapped anew on every call (1536 at
    4x4: 11 ms instead of 1 ms), which blocks also avoid.
    """

    def __init__(self, channels: int, kernel_size: int, padding: int) -> None:
        if kernel_size % 2 == 0 or padding != kernel_size // 2:
            raise ValueError(f"DepthwiseConv2d keeps the size: odd kernel and padding kernel_size // 2, "
                             f"got kernel_size {kernel_size}, padding {padding}")
        super().__init__(channels, channels, kernel_size, padding=padding, groups=channels, bias=False,
                         weight_norm=False)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.device.type != "cpu" or x.is_contiguous(memory_format=torch.channels_last):
            return self._conv_forward(x, weight, bias)
        nhwc = x.contiguous(memory_format=torch.channels_last)
        return self._conv_forward(nhwc, weight, bias).contiguous()

    def convolve_backward(self, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          mask: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
        if x.device.type != "cpu":
            return super().convolve_backward(grad_out, x, weight, mask)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        x = x.contiguous(memory_format=torch.channels_last)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_x = None
        if mask[0]:  # stride 1, 'same' padding: the transposed conv is a conv with the flipped kernel
            grad_x = self._conv_forward(grad_out, weight.flip(2, 3), None).contiguous(memory_format=layout)
        grad_w = self._weight_grad(grad_out, x) if mask[1] else None
        return grad_x, grad_w, None  # no bias (see __init__)

    def _weight_grad(self, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Weight gradient on CPU in float32, by the fastest of :data:`DEPTHWISE_GRAD_METHODS` for this shape."""
        if torch.are_deterministic_algorithms_enabled():  # trainer.deterministic: no choice by timing
            return self.weight_grad_by(grad_out, x, DETERMINISTIC_WEIGHT_GRAD)
        key = (tuple(x.shape), x.dtype, torch.get_num_threads())
        method = _FASTEST_WEIGHT_GRAD.get(key)
        if method is None:
            timings = {}
            candidates = [m if isinstance(m, str) or 0 < m < x.shape[1] else 0 for m in DEPTHWISE_GRAD_METHODS]
            for candidate in dict.fromkeys(candidates):
                self.weight_grad_by(grad_out, x, candidate)  # oneDNN builds its kernel on the first call
                runs = []
                for _ in range(3):  # the best of three: a single run is easily disturbed on a busy CPU
                    start = time.perf_counter()
                    self.weight_grad_by(grad_out, x, candidate)
                    runs.append(time.perf_counter() - start)
                timings[candidate] = min(runs)
            method = _FASTEST_WEIGHT_GRAD[key] = min(timings, key=timings.__getitem__)
        return self.weight_grad_by(grad_out, x, method)

    def weight_grad_by(self, grad_out: torch.Tensor, x: torch.Tensor, method: str | int) -> torch.Tensor:
        """Weight gradient in float32 by one of :data:`DEPTHWISE_GRAD_METHODS`."""
        if method == "folded":
            return self.weight_grad_folded(grad_out, x)
        return self.weight_grad_by_blocks(grad_out, x, int(method))

    def weight_grad_by_blocks(self, grad_out: torch.Tensor, x: torch.Tensor, block: int) -> torch.Tensor:
        """Weight gradient in float32 by oneDNN calls over ``block`` channels each (0: all at once)."""
        pieces = []
        block = block or self.in_channels
        for start in range(0, self.in_channels, block):
            stop = min(start + block, self.in_channels)
            x_block = x[:, start:stop].to(torch.float32, memory_format=torch.channels_last)  # (B, block, H, W)
            g_block = grad_out[:, start:stop].to(torch.float32, memory_format=torch.channels_last)
            pieces.append(conv_backward(
                g_block, x_block, self.weight[start:stop].float(), None, self.stride, self.padding, self.dilation,
                False, [0, 0], stop - start, [False, True, False])[1])
        return torch.cat(pieces).to(self.weight.dtype)  # (channels, 1, k, k)

    def weight_grad_folded(self, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Weight gradient in float32 as one forward depthwise convolution, the batch folded into the channels.

        dW[c, i, j] = sum_b sum_(y, x) x_pad[b, c, y + i, x + j] * g[b, c, y, x]: for each (c, b) that is
        the correlation of the padded map x[b, c] with the H x W kernel g[b, c], a k x k output; the
        batch is then summed.
        """
        b, c, h, w = x.shape
        folded_x = torch.empty((1, h, w, c, b), dtype=torch.float32, device=x.device)
        folded_x.copy_(x.permute(2, 3, 1, 0).unsqueeze(0))  # one pass: cast and transpose
        folded_x = folded_x.view(1, h, w, c * b).permute(0, 3, 1, 2)  # (1, C*B, H, W) NHWC; channel c*B + b
        kernels = torch.empty((c, b, h, w), dtype=torch.float32, device=x.device)
        kernels.copy_(grad_out.permute(1, 0, 2, 3))
        out = F.conv2d(folded_x, kernels.view(c * b, 1, h, w), padding=self.padding, groups=c * b)  # (1, C*B, k, k)
        k = self.kernel_size
        return out.view(c, b, *k).sum(dim=1, keepdim=True).to(self.weight.dtype)  # (C, 1, k, k)


# (shape, dtype, threads) -> the fastest of DEPTHWISE_GRAD_METHODS
_FASTEST_WEIGHT_GRAD: dict[tuple[tuple[int, ...], torch.dtype, int], str | int] = {}


class ELU(nn.Module):
    """ELU (alpha 1) as exp(min(x, 0)) - 1 + max(x, 0), storing only its output for backward.

    Same function as ``nn.ELU`` to within 3e-7 (absolute; exp(x) - 1 instead of expm1 near 0),
    but torch's CPU ELU evaluates expm1 without vector instructions: on (8, 120, 16, 16) it takes
    1.3 ms against 0.14 ms here (and 2.8 ms on the (8, 256, 16, 16) maps of the prior heads).
    The gradient is 1 for x > 0 and exp(x) = y + 1 otherwise, so the output suffices; the input
    (the conv output before it) is not kept.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _ELUFunction.apply(x)
        return _elu(x)


def _elu(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.clamp_max(0)).sub_(1).add_(x.clamp_min(0))


class _ELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = _elu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * y.clamp_max(0).add_(1)  # 1 where x > 0, exp(x) = y + 1 elsewhere


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


_recomputing = 0  # > 0 while a checkpointed region runs again during backward (see once_then_frozen)


@contextmanager
def _recomputation() -> Iterator[None]:
    """Marks a checkpoint recomputation: kernels made then are not kept for the spectral regularizer
    (they would stay alive until the next step's; see Conv2d.kernel)."""
    global _recomputing
    _recomputing += 1
    try:
        yield
    finally:
        _recomputing -= 1


@contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` normalize with batch statistics but leave running stats alone."""
    layers = [m for m in module.modules() if isinstance(m, BatchNormBase)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


class CellStack(nn.Sequential):
    """A sequence of cells that can trade compute for memory (activation checkpointing).

    ``checkpoint`` is ``"none"``, ``"cell"`` (each cell's activations are freed after the forward
    pass and recomputed during backward; the stack keeps every cell's input) or ``"stack"`` (the
    whole stack is recomputed as one unit; only its input is kept). Recomputation does not update
    BatchNorm running statistics a second time.
    """

    checkpoint: str = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint == "none" or not torch.is_grad_enabled():
            return self._run(x)
        if self.checkpoint == "stack":
            return checkpoint(once_then_frozen(self._run, self), x, use_reentrant=False)
        for cell in self:
            x = checkpoint(once_then_frozen(cell, cell), x, use_reentrant=False)
        return x

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        for cell in self:
            x = cell(x)
        return x


def once_then_frozen(fn: Callable[..., Any], owner: nn.Module) -> Callable[..., Any]:
    """``fn``; calls after the first (checkpoint recomputation) keep the BN running stats of ``owner`` fixed."""
    calls = 0

    def run(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1 or not owner.training:
            return fn(*args)
        with frozen_batchnorm_stats(owner), _recomputation():
            return fn(*args)

    return run
