"""nvae.optim.Adamax: torch's Adamax, whose update a 0-d device flag cancels exactly (no host read)."""
from __future__ import annotations

import copy

import pytest
import torch

from nvae.optim import Adamax


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    """A channels_last 3x3 kernel, a channels_last 1x1 kernel (contiguous in both layouts) and a vector."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4, 3, 3), (6, 4, 1, 1), (5,)]
    tensors = [torch.randn(s, generator=g) for s in shapes]
    tensors[:2] = [t.contiguous(memory_format=torch.channels_last) for t in tensors[:2]]
    return [torch.nn.Parameter(t) for t in tensors]


def _grads(params: list[torch.nn.Parameter], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) * 10.0 ** (i - 1) for i, p in enumerate(params)]


HPARAMS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-3, weight_decay=3e-4)


@pytest.mark.parametrize("resume_from_torch", [False, True])
def test_updates_equal_torchs_adamax(resume_from_torch: bool) -> None:
    """Six steps equal torch.optim.Adamax's (foreach), also when the state comes from torch's own
    optimizer (step counters on the host) halfway."""
    ours_p, ref_p = _params(), _params()
    ref = torch.optim.Adamax(ref_p, foreach=True, **HPARAMS)
    ours = torch.optim.Adamax(ours_p, **HPARAMS) if resume_from_torch else Adamax(ours_p, masked=True, **HPARAMS)
    for step in range(6):
        if step == 3 and resume_from_torch:
            state = copy.deepcopy(ours.state_dict())
            ours = Adamax(ours_p, masked=True, **HPARAMS)
            ours.load_state_dict(state)
        for p, q, g in zip(ours_p, ref_p, _grads(ours_p, step)):
            p.grad, q.grad = g.clone(), g.clone()
        if isinstance(ours, Adamax):
            ours.apply_if(torch.ones(()))  # the guard's flag: update
        ours.step()
        ref.step()
    # The same operations in another grouping (m + w (g - m) instead of lerp, a denominator scaled
    # by the bias correction): float32 rounding of ~1e-7, up to ~1e-6 relative in moments that are
    # small differences of their terms.
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        assert p.stride() == q.stride()
    for p, q in zip(ours_p, ref_p):
        for key in ("exp_avg", "exp_inf"):
            torch.testing.assert_close(ours.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-9)
        assert float(ours.state[p]["step"]) == float(ref.state[q]["step"]) == 6


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("bad, before", [(float("nan"), 2), (float("inf"), 2), (1e3, 2), (float("nan"), 0)])
def test_a_cancelled_step_changes_nothing(bad: float, before: int, masked: bool) -> None:
    """apply_if(0): parameters, moments and step counters stay bit-identical, even for NaN or inf
    gradients (0 * NaN is NaN: they are zeroed first) and for a first step (moments 0, no 0 / 0);
    the next step updates again. Masked (as on a GPU) and read (as on the CPU)."""
    params = _params()
    opt = Adamax(params, masked=masked, **HPARAMS)
    for step in range(before):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    kept = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict()["state"])
    for p in params:
        p.grad = torch.full_like(p, bad)
    opt.apply_if(torch.zeros(()))
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, kept))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[i][k], state[i][k]) for i in state for k in ("step", "exp_avg", "exp_inf"))
    if not before:  # the skipped first step made the state (zeros)
        assert all(float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_inf"].any() for s in after.values())
    for p, g in zip(params, _grads(params, 2)):
        p.grad = g
    opt.step()  # the flag holds for one step only
    assert not any(torch.equal(p, b) for p, b in zip(params, kept))
