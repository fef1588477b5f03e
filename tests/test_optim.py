"""nvae.optim.Adamax against torch.optim.Adamax: same trajectory, interchangeable state."""
from __future__ import annotations

import io

import pytest
import torch

from nvae.optim import Adamax

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-3, weight_decay=3e-4)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    """Large and small tensors, contiguous and channels_last, as in NVAE (biases, gains, kernels)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 256), (7,), (16, 8, 3, 3), (5, 1, 1, 1), (32, 24, 3, 3), (3, 4), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    params[4].data = params[4].data.contiguous(memory_format=torch.channels_last)  # small, not contiguous
    return params


def _set_grads(params: list[torch.nn.Parameter], step: int, skip: set[int] = frozenset()) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))  # p's layout


def _run(opt_cls: type, params: list[torch.nn.Parameter], steps: range, **kw: object) -> None:
    opt = opt_cls(params, **HYPER, **kw)
    for step in steps:
        _set_grads(params, step, skip={1} if step == 2 else set())  # one parameter misses a step
        for group in opt.param_groups:
            group["lr"] = HYPER["lr"] * (0.5 + 0.1 * step)  # as a scheduler would
        opt.step()
    return opt


@pytest.mark.parametrize("small_numel, bucket_numel", [(1, 1 << 20), (100, 1 << 20), (1 << 16, 1 << 20),
                                                       (1 << 16, 200)])  # all large, mixed, all small; in buckets
def test_same_trajectory_as_torch_adamax(small_numel: int, bucket_numel: int) -> None:
    ours, ref = _params(), _params()
    opt = _run(Adamax, ours, range(6), small_numel=small_numel, bucket_numel=bucket_numel)
    # one bucket of the small tensors (none if all are large); by 200 elements: [7] [1152] [5] [6912] [12, 1]
    assert len(opt._buckets) == ({1: 0, 100: 1, 1 << 16: 1}[small_numel] if bucket_numel > 200 else 5)
    _run(torch.optim.Adamax, ref, range(6), foreach=False)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert p.stride() == q.stride()


def test_state_is_torch_layout_and_interchangeable() -> None:
    ours, ref = _params(), _params()
    opt = _run(Adamax, ours, range(3), small_numel=100)
    ref_opt = _run(torch.optim.Adamax, ref, range(3), foreach=False)
    for p, q in zip(ours, ref):
        for key in ("step", "exp_avg", "exp_inf"):
            a, b = opt.state[p][key], ref_opt.state[q][key]
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            assert a.shape == b.shape
    saved = _saved(opt.state_dict()).getvalue()  # ours -> torch's and -> a new one of ours; all three go on
    cross_ref, cross_ours = _params(), _params()
    for p, q, src in zip(cross_ref, cross_ours, ours):
        p.data.copy_(src.detach())
        q.data.copy_(src.detach())
    into_torch = torch.optim.Adamax(cross_ref, **HYPER, foreach=False)
    into_torch.load_state_dict(torch.load(io.BytesIO(saved)))
    into_ours = Adamax(cross_ours, **HYPER, small_numel=100)
    into_ours.load_state_dict(torch.load(_saved(ref_opt.state_dict())))
    for step in range(3, 6):
        for params, o in ((ours, opt), (cross_ref, into_torch), (cross_ours, into_ours)):
            _set_grads(params, step)
            o.step()
    for a, b, c in zip(ours, cross_ref, cross_ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)


def test_loaded_state_replaces_the_flat_buffers() -> None:
    """A load between steps (a rollback) must not be overwritten by stale flat buffers."""
    params = _params()
    opt = _run(Adamax, params, range(2), small_numel=1 << 16)
    snapshot = torch.load(_saved(opt.state_dict()))
    weights = [p.detach().clone() for p in params]
    _set_grads(params, 2)
    opt.step()  # moves the flat state on
    for p, w in zip(params, weights):
        p.data.copy_(w)
    opt.load_state_dict(snapshot)
    _set_grads(params, 3)
    opt.step()
    ref = _params()
    ref_opt = _run(torch.optim.Adamax, ref, range(2), foreach=False)
    _set_grads(ref, 3)
    ref_opt.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _saved(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_closure_runs_before_the_update_and_maximize_falls_back() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Adamax([w], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure)) == 5.0
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, -1.9]))  # first step: lr * sign(grad)
    torch.testing.assert_close(w.grad, torch.tensor([2.0, -4.0]))  # the gradient is left as it was
    up = torch.nn.Parameter(torch.tensor([1.0]))
    up.grad = torch.tensor([1.0])
    Adamax([up], lr=0.1, maximize=True).step()
    torch.testing.assert_close(up.detach(), torch.tensor([1.1]))
