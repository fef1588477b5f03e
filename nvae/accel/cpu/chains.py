"""The CPU backend's BatchNorm-Swish-conv chains (paper sec. 3.1, fig. 3): one autograd node each.

A chain of steps conv(swish(bn(h))) stores only its input and the per-channel batch statistics:
in backward the BN and Swish outputs are recomputed from them with one multiply-add and one Swish
each, and the inner convolutions' outputs by running those convolutions once more. The decoder
cell (fig. 3a) is one chain, BN-conv1x1 / BN-Swish-dwconv5x5 / BN-Swish-conv1x1, storing the
cell input instead of six maps, five of them expanded x6: the CPU backend's memory saving.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nvae.accel.cpu.tokens import strided_like
from nvae.compat import batch_norm_backward, silu_backward
from nvae.ops.chains import BNConvStep


def run_chain(x: torch.Tensor, steps: tuple[BNConvStep, ...]) -> Optional[torch.Tensor]:
    """The steps as one autograd node in CPU training (see the module docstring); None where that does
    not apply: outside training or without gradients, off the CPU, when a convolution has no CPU
    accelerator, or with SyncBatchNorm layers (whose statistics come from all processes)."""
    bns = [step.bn for step in steps]
    on_cpu = x.device.type == "cpu" and all(getattr(s.conv.accel, "chain", None) is not None for s in steps)
    if not (on_cpu and bns[0].training and torch.is_grad_enabled()) or any(isinstance(bn, nn.SyncBatchNorm) for bn in bns):
        return None
    momenta = tuple(_count_batch(bn) for bn in bns)
    params, scales = [], []
    for bn, _, conv in steps:
        accel = conv.accel
        params += [bn.weight, bn.bias, accel.forward_kernel(conv), conv.bias]
        kept = accel.kernel  # (w, s, token) if forward_kernel() made W = s * w just now
        fresh = kept is not None and kept.token is not None and not accel.recomputing
        scales.append(kept.scale if fresh else None)
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
    """A region without autocast; nothing to enter when it is off already (the usual case: entering one costs more than the call it wraps)."""
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext()


def _laid_out_as(grad: torch.Tensor | None, kernel: torch.Tensor) -> torch.Tensor | None:
    """A kernel's gradient with the kernel's strides (:func:`nvae.accel.cpu.tokens.strided_like`):
    the convolutions' weight gradients come back contiguous for channels_last 1x1 and depthwise kernels."""
    return grad if grad is None else strided_like(grad, kernel)


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def _normalize(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
               invstd: torch.Tensor, eps: float) -> torch.Tensor:
    """The BatchNorm output from saved batch statistics: h * scale + shift per channel.

    Maps in another dtype than the statistics (bf16 under autocast) go through BatchNorm's own
    inference kernel: a mixed-dtype addcmul takes TensorIterator's slow scalar casting path
    (docs/performance.md).
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
    def forward(ctx: Any, x: torch.Tensor, steps: tuple[BNConvStep, ...],
                momenta: tuple[float, ...], scales: tuple[Optional[torch.Tensor], ...],
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
                h = conv.accel.convolve(conv, _cast(a, dtype), _cast(w, dtype), _cast(b, dtype))
                # float32 statistics whatever the compiled graph returns (BN backward on bf16 maps expects them)
                stats += [mean.to(bn.running_var.dtype), invstd.to(bn.running_var.dtype)]
        # Kernels are made again in backward from the parameters (a kernel bank's too, layer by layer:
        # kept, they would hold their whole stack for the step)
        kernels_dropped = [None if i % 4 == 2 else t for i, t in enumerate(params)]
        ctx.save_for_backward(x, *stats, *kernels_dropped)
        ctx.steps, ctx.dtype, ctx.scales = steps, dtype, scales  # scales: (out, 1, 1, 1) each, no gradient
        return h

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, *saved = ctx.saved_tensors
        steps, dtype, n = ctx.steps, ctx.dtype, len(ctx.steps)
        stats, params = saved[:2 * n], list(saved[2 * n:])
        for i, ((_, _, conv), scale) in enumerate(zip(steps, ctx.scales)):  # the weights are those of forward
            accel = conv.accel
            params[4 * i + 2] = (accel.normalized_weight(conv) if scale is None else accel.masked_weight(conv) * scale).detach()
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
                    h = conv.accel.convolve(conv, _cast(a, dtype), _cast(w, dtype), _cast(b, dtype))
            for i in reversed(range(n)):
                (bn, swish, conv), (h, y, a) = steps[i], acts.pop()
                bn_w, bn_b, w, b = params[4 * i:4 * i + 4]
                mask = (True, need[6 + 4 * i], need[7 + 4 * i] and b is not None)
                grad_a, grad_w, grad_b = conv.accel.convolve_backward(conv, grad, _cast(a, dtype), _cast(w, dtype), mask)
                del a
                grad_y = silu_backward(grad_a.to(y.dtype), y) if swish else grad_a
                del y, grad_a
                grad, grad_bn_w, grad_bn_b = batch_norm_backward(
                    grad_y, h, bn_w, None, None, *stats[2 * i:2 * i + 2], True, bn.eps,
                    [i > 0 or need[0], need[4 + 4 * i], need[5 + 4 * i]])
                del grad_y, h
                grads[4 * i:4 * i + 4] = [grad_bn_w, grad_bn_b, _laid_out_as(_cast(grad_w, w.dtype), w),
                                          None if b is None else _cast(grad_b, b.dtype)]
        return (grad, None, None, None, *grads)
