"""The fused BatchNorm-Swish-conv step (nvae.ops.bn_swish_conv) against plain autograd."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nvae import ops
from nvae.ops import BNSwish, Conv2d, DepthwiseConv2d, bn_swish_conv

CONVS = {
    "3x3 weight-normed, bias": lambda c: Conv2d(c, 6, 3, padding=1),
    "3x3 stride 2": lambda c: Conv2d(c, 6, 3, stride=2, padding=1),
    "1x1 no bias": lambda c: Conv2d(c, 5, 1, bias=False, weight_norm=False),
    "depthwise 5x5": lambda c: DepthwiseConv2d(c, 5, padding=2),
}


def _pair(conv_name: str, channels: int = 4) -> tuple[BNSwish, Conv2d]:
    torch.manual_seed(0)
    bn = BNSwish(channels)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
    return bn.train(), CONVS[conv_name](channels).train()


def _run(bn: BNSwish, conv: Conv2d, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().requires_grad_(True)
    out = bn_swish_conv(bn, conv, x) if fused else conv(F.silu(torch.nn.BatchNorm2d.forward(bn, x)))
    params = [x, *bn.parameters(), *conv.parameters()]
    grads = torch.autograd.grad(out, params, torch.linspace(-1, 1, out.numel()).view_as(out))
    return out, list(grads)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("conv_name", list(CONVS))
def test_fused_bn_swish_conv_matches_plain_autograd(conv_name: str, layout: torch.memory_format) -> None:
    bn, conv = _pair(conv_name)
    bn_ref, conv_ref = copy.deepcopy(bn), copy.deepcopy(conv)
    x = (torch.randn(3, 4, 8, 8) * 2 + 1).contiguous(memory_format=layout)
    out, grads = _run(bn, conv, x, fused=True)
    ref, ref_grads = _run(bn_ref, conv_ref, x, fused=False)
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous(memory_format=layout)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(a, b, msg=f"gradient {i}")
    for (name, a), b in zip([*bn.named_buffers(), *conv.named_buffers()], [*bn_ref.buffers(), *conv_ref.buffers()]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # running stats moved once, counter at 1


def test_fused_step_stores_only_its_input() -> None:
    """What autograd keeps for backward: the BN input (and per-channel vectors and the kernel), not
    the BN output or the Swish output the plain composition stores (two more maps of x's size)."""
    bn, conv = _pair("1x1 no bias", channels=8)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)

    def saved_map_elements(fused: bool) -> int:
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 4 and t.shape[1:] == x.shape[1:]:  # a map of x's size
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            bn_swish_conv(bn, conv, x) if fused else conv(bn(x))
        return sum(sizes)

    assert saved_map_elements(fused=True) == x.numel()
    assert saved_map_elements(fused=False) >= 3 * x.numel()


@pytest.mark.parametrize("conv_name", ["3x3 weight-normed, bias", "depthwise 5x5"])
def test_fused_step_under_bf16_autocast(conv_name: str) -> None:
    """Under CPU bf16 autocast the conv runs in bfloat16 as in the plain composition; gradients
    come back in the parameters' float32 and agree with the plain path to bf16 precision."""
    bn, conv = _pair(conv_name)
    bn_ref, conv_ref = copy.deepcopy(bn), copy.deepcopy(conv)
    x = torch.randn(3, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run(bn, conv, x, fused=True)
        ref, ref_grads = _run(bn_ref, conv_ref, x, fused=False)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item(), msg=f"gradient {i}")


def test_depthwise_conv_needs_same_padding() -> None:
    with pytest.raises(ValueError, match="odd kernel and padding"):
        DepthwiseConv2d(4, 5, padding=1)


def test_elu_matches_torch_and_keeps_only_its_output() -> None:
    x = torch.linspace(-20, 5, 2001, dtype=torch.float64).view(1, 1, 1, -1).requires_grad_(True)
    torch.testing.assert_close(ops.ELU()(x), F.elu(x), rtol=0, atol=3e-16)  # float64: exp(x) - 1 is exact enough
    assert torch.autograd.gradcheck(ops.ELU(), (x[..., ::50].detach().requires_grad_(True),))
    x32 = x.detach().float().requires_grad_(True)
    y = ops.ELU()(x32)
    torch.testing.assert_close(y, F.elu(x32), rtol=0, atol=3e-7)
    (grad,) = torch.autograd.grad(y, x32, torch.ones_like(y))
    (ref,) = torch.autograd.grad(F.elu(x32), x32, torch.ones_like(y))
    torch.testing.assert_close(grad, ref, rtol=1e-6, atol=3e-7)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.ELU()(x32)
    assert len(saved) == 1 and saved[0] is out
