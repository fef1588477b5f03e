"""The CPU backend (nvae.accel.cpu): its fused BatchNorm-Swish-conv chains and its depthwise and weight-norm
autograd, each against plain PyTorch autograd."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nvae.accel import cpu
from nvae.accel.cpu import conv as conv_ops
from nvae.accel.cpu import depthwise
from nvae.ops import BNConvStep, Conv2d, DepthwiseConv2d, batch_norm, bn_swish_conv

CONVS = {
    "3x3 weight-normed, bias": lambda c: Conv2d(c, 6, 3, padding=1),
    "3x3 stride 2": lambda c: Conv2d(c, 6, 3, stride=2, padding=1),
    "1x1 no bias": lambda c: Conv2d(c, c, 1, bias=False, weight_norm=False),
    "depthwise 5x5": lambda c: DepthwiseConv2d(c, 5, padding=2),
}


Pairs = list[BNConvStep]
CHAINS = [[name] for name in CONVS] + [["depthwise 5x5", "1x1 no bias"], ["3x3 stride 2", "3x3 weight-normed, bias"]]


def _chain(conv_names: list[str], channels: int = 4, swish: bool = True) -> Pairs:
    """(BatchNorm, Swish after it, conv) steps, each conv's output feeding the next step; without
    Swish in the first step when ``swish`` is false (the decoder cell's first step)."""
    torch.manual_seed(0)
    pairs = []
    for name in conv_names:
        bn = batch_norm(channels)
        with torch.no_grad():  # non-trivial affine parameters and running statistics
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-1, 1)
        conv = CONVS[name](channels)
        pairs.append((bn.train(), swish or bool(pairs), conv.train()))
        channels = conv.out_channels
    return pairs


def _run(pairs: Pairs, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().requires_grad_(True)
    for _, _, conv in pairs:  # the CPU backend's accelerators, or none (plain PyTorch)
        if fused:
            cpu.install(conv)
        else:
            conv.accel = None
    if fused:
        out = bn_swish_conv(x, *pairs)
    else:  # layer by layer, plain autograd
        out = x
        for bn, swish, conv in pairs:
            out = conv(F.silu(bn(out)) if swish else bn(out))
    params = [x, *(p for bn, _, conv in pairs for p in (*bn.parameters(), *conv.parameters()))]
    grads = torch.autograd.grad(out, params, torch.linspace(-1, 1, out.numel()).view_as(out))
    return out, list(grads)


def _buffers(pairs: Pairs) -> list[tuple[str, torch.Tensor]]:
    return [(f"{i}.{name}", t) for i, (bn, _, conv) in enumerate(pairs)
            for name, t in (*bn.named_buffers(), *conv.named_buffers())]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("conv_names", CHAINS, ids=[" + ".join(c) for c in CHAINS])
@pytest.mark.parametrize("swish", [True, False], ids=["swish", "first step without swish"])
def test_fused_bn_swish_convs_match_plain_autograd(conv_names: list[str], layout: torch.memory_format,
                                                   swish: bool) -> None:
    pairs = _chain(conv_names, swish=swish)
    ref_pairs = copy.deepcopy(pairs)
    x = (torch.randn(3, 4, 8, 8) * 2 + 1).contiguous(memory_format=layout)
    out, grads = _run(pairs, x, fused=True)
    ref, ref_grads = _run(ref_pairs, x, fused=False)
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous(memory_format=layout)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(a, b, msg=f"gradient {i}")
    for (name, a), (_, b) in zip(_buffers(pairs), _buffers(ref_pairs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # running stats moved once, counter at 1


@pytest.mark.parametrize("conv_names, fused_maps, plain_maps", [
    (["1x1 no bias"], 1, 3),  # BN input | + BN output, Swish output
    (["depthwise 5x5", "1x1 no bias"], 1, 6),  # x | + 2 x (BN output, Swish output) + the depthwise output
])
def test_fused_steps_store_only_their_input(conv_names: list[str], fused_maps: int, plain_maps: int) -> None:
    """What autograd keeps for backward: maps of the input's size, counted over the saved tensors
    (per-channel vectors and kernels aside). The fused chain keeps the input alone."""
    pairs = _chain(conv_names, channels=8)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)

    def saved_maps(fused: bool) -> float:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 4 and t.shape[1:] == x.shape[1:]:  # a map of x's size
                storages[t.untyped_storage().data_ptr()] = t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _run(pairs, x, fused)
        return sum(storages.values()) / x.numel()

    assert saved_maps(fused=True) == fused_maps
    assert saved_maps(fused=False) >= plain_maps


@pytest.mark.parametrize("conv_names", [["3x3 weight-normed, bias"], ["depthwise 5x5", "1x1 no bias"]])
def test_fused_steps_under_bf16_autocast(conv_names: list[str]) -> None:
    """Under CPU bf16 autocast the conv runs in bfloat16 as in the plain composition; gradients
    come back in the parameters' float32 and agree with the plain path to bf16 precision."""
    pairs = _chain(conv_names)
    ref_pairs = copy.deepcopy(pairs)
    x = torch.randn(3, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run(pairs, x, fused=True)
        ref, ref_grads = _run(ref_pairs, x, fused=False)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item(), msg=f"gradient {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_depthwise_gradients_by_channel_blocks(dtype: torch.dtype) -> None:
    """Folded, whole or by blocks of channels with a remainder: the gradients of F.conv2d; the fastest way is kept."""
    channels = 2 * 64 + 3
    conv = DepthwiseConv2d(channels, 5, padding=2)
    x = torch.randn(2, channels, 6, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, channels, 6, 7).to(dtype)
    xr, wr = x.double().requires_grad_(True), conv.weight.detach().double().requires_grad_(True)
    ref_x, ref_w = torch.autograd.grad(F.conv2d(xr, wr, padding=2, groups=channels), (xr, wr), grad_out.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for method in ("folded", 0, 64, 128, channels):
        grad_w = depthwise.weight_grad_by(conv, grad_out, x, method)
        assert grad_w.dtype == torch.float32
        torch.testing.assert_close(grad_w.double(), ref_w, rtol=tol, atol=tol * ref_w.abs().max().item())
    depthwise.WEIGHT_GRAD_METHODS.fastest.clear()
    grad_x, grad_w, _ = depthwise.DepthwiseAccel().convolve_backward(conv, grad_out, x, conv.weight.to(dtype),
                                                                    (True, True, False))
    assert list(depthwise.WEIGHT_GRAD_METHODS.fastest.values())[0] in depthwise.DEPTHWISE_GRAD_METHODS
    assert grad_x.dtype == dtype
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=tol, atol=tol * ref_w.abs().max().item())
    torch.testing.assert_close(grad_x.double(), ref_x, rtol=tol, atol=tol * ref_x.abs().max().item())


@pytest.mark.parametrize("swish", [True, False], ids=["swish", "first step without swish"])
def test_steps_in_eval_mode_use_running_statistics_and_their_swish(swish: bool) -> None:
    """Outside training the steps run layer by layer: BatchNorm on its running statistics, Swish where the step says."""
    chain = _chain(["3x3 weight-normed, bias", "1x1 no bias"], swish=swish)
    steps = [(bn.eval(), s, conv.eval()) for bn, s, conv in chain]
    for _, _, conv in steps:
        cpu.install(conv)
    x = torch.randn(3, 4, 8, 8)
    h = x
    for bn, s, conv in steps:
        y = (h - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
        y = y * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        h = F.conv2d(F.silu(y) if s else y, conv.normalized_weight(), conv.bias, conv.stride, conv.padding)
    with torch.no_grad():
        torch.testing.assert_close(bn_swish_conv(x, *steps), h.detach())


def test_depthwise_gradient_method_is_fixed_under_deterministic_algorithms(monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.deterministic: no choice by timing (the methods sum in different orders)."""
    conv = DepthwiseConv2d(8, 5, padding=2)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(x)
    used = []
    by = depthwise.weight_grad_by
    monkeypatch.setattr(depthwise, "weight_grad_by", lambda conv, g, x, m: used.append(m) or by(conv, g, x, m))
    accel = depthwise.DepthwiseAccel()
    depthwise.WEIGHT_GRAD_METHODS.fastest.clear()
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    accel.convolve_backward(conv, grad_out, x, conv.weight, (False, True, False))
    assert used == [depthwise.DETERMINISTIC_WEIGHT_GRAD] and not depthwise.WEIGHT_GRAD_METHODS.fastest
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    accel.convolve_backward(conv, grad_out, x, conv.weight, (False, True, False))
    assert len(used) > 2 and len(depthwise.WEIGHT_GRAD_METHODS.fastest) == 1  # timed: every candidate ran


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_weight_norm_gradients(layout: torch.memory_format) -> None:
    """The hand-written weight-norm backward against autograd of w * exp(log g) / (||w|| + eps)."""
    conv = Conv2d(3, 5, 3).double().to(memory_format=layout)
    accel = conv_ops.ConvAccel()
    w, log_g = conv.weight.detach().requires_grad_(True), conv.log_weight_norm.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(conv_ops.WeightNorm.apply, (w, log_g))
    expected = w * torch.exp(log_g) / (torch.linalg.vector_norm(w.flatten(1), dim=1).view(-1, 1, 1, 1) + 1e-5)
    grad = torch.randn_like(w)
    torch.testing.assert_close(torch.autograd.grad(accel.normalized_weight(conv), list(conv.parameters())[:1], grad),
                               torch.autograd.grad(expected, w, grad))
    torch.testing.assert_close(accel.normalized_weight(conv), expected)
    with torch.no_grad():  # an all-zero output channel (as a mask can make): finite gradients, not 0 / 0
        conv.weight[0] = 0  # w shares conv.weight's storage
    grads = torch.autograd.grad(accel.normalized_weight(conv), [conv.weight, conv.log_weight_norm], grad)
    expected = w * torch.exp(log_g) / (torch.linalg.vector_norm(w.flatten(1), dim=1).view(-1, 1, 1, 1) + 1e-5)
    assert all(torch.isfinite(g).all() for g in grads) and grads[1][0].item() == 0
    torch.testing.assert_close(grads, torch.autograd.grad(expected, [w, log_g], grad))


def test_depthwise_conv_needs_same_padding() -> None:
    with pytest.raises(ValueError, match="odd kernel and padding"):
        DepthwiseConv2d(4, 5, padding=1)


def test_decoder_cell_stores_the_expanded_map_unless_told_to_recompute_it() -> None:
    """Default: the 1x1 expansion's output (expand x wider) is stored; with ``recompute_expanded``
    only the cell input is. Same output, gradients and running statistics either way."""
    from nvae.cells import DecoderCell

    torch.manual_seed(0)
    cell = DecoderCell(4, 4, expand=3, use_se=False).train()
    cpu.install(cell)
    x = torch.randn(2, 4, 8, 8)
    results = {}
    for recompute in (False, True):
        c = copy.deepcopy(cell)
        c.recompute_expanded = recompute
        sizes: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 4 and t.shape[0] == x.shape[0]:  # maps, not kernels
                sizes[t.untyped_storage().data_ptr()] = t.shape[1]  # channels of each stored map
            return t

        xin = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = c(xin)
        grads = torch.autograd.grad(out, [xin, *c.parameters()], torch.linspace(-1, 1, out.numel()).view_as(out))
        results[recompute] = (out, grads, [b.clone() for b in c.buffers()], sorted(sizes.values()))
    (out, grads, bufs, stored), (out_r, grads_r, bufs_r, stored_r) = results[False], results[True]
    assert 12 in stored and 12 not in stored_r  # the (2, 12, 8, 8) expanded map
    torch.testing.assert_close(out, out_r, rtol=0, atol=0)
    for a, b in zip((*grads, *bufs), (*grads_r, *bufs_r)):
        torch.testing.assert_close(a, b)
