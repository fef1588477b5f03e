"""Adamax with a cheap step for models made of many small tensors.

NVAE trains with Adamax (Kingma & Ba, 2015, sec. 7.1; NVAE paper sec. 5 and appendix A: Adamax
with epsilon 1e-3). ``torch.optim.Adamax`` updates one parameter at a time with about ten tensor
operations each; NVAE's MNIST model has 1,272 parameter tensors, 1,135 of them under 64 Ki elements
(biases, BatchNorm and weight-norm gains, small kernels), so on a CPU its step is mostly dispatch
overhead (~45 ms of a ~0.5 s training step on 2 cores).

:class:`Adamax` computes the same update. Parameters of at least ``small_numel`` elements are updated
one by one as torch does; the small ones of a parameter group are updated together: their gradients
are gathered into one flat vector, the moments live in flat buffers, and the update is added back
with one ``_foreach_add_``. The optimizer state keeps torch's layout (per parameter ``step``,
``exp_avg``, ``exp_inf``; for small parameters these are views of the flat buffers), so checkpoints
load into either optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

SMALL_NUMEL = 1 << 16  # parameters below this many elements are updated through the flat buffers


def _memory_order(t: Tensor) -> list[int]:
    """Dimensions of ``t`` from the largest stride to the smallest: ``t.permute(order)`` is contiguous."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def _flat(t: Tensor, order: Optional[list[int]]) -> Tensor:
    """``t``'s elements in the memory order of its parameter (a view when the layouts agree)."""
    return t.reshape(-1) if order is None else t.permute(order).reshape(-1)


def _shaped_like(flat: Tensor, p: Tensor, order: Optional[list[int]]) -> Tensor:
    """A view of ``flat`` (numel of ``p``) with ``p``'s shape and strides."""
    if order is None:
        return flat.view(p.shape)
    view = flat.view([p.shape[d] for d in order])  # p's dims in memory order, contiguous
    return view.permute(sorted(range(p.dim()), key=order.__getitem__))


@dataclass
class _Bucket:
    """Flat state of the small parameters of one group that had gradients in the same step."""

    params: list[Tensor]
    orders: list[Optional[list[int]]]  # None: contiguous, flattened as is
    steps: Tensor  # (n,) float32, one step count per parameter
    exp_avg: Tensor  # (numel,) first moments, parameters concatenated in memory order
    exp_inf: Tensor  # (numel,) infinity norms
    update: Tensor  # (numel,) scratch for the update
    update_views: list[Tensor]  # update viewed per parameter with its shape and strides
    exp_avg_views: list[Tensor]
    exp_inf_views: list[Tensor]

    def owns_state(self, state: dict[Tensor, dict[str, Any]]) -> bool:
        """Whether the optimizer state still points into this bucket (not replaced by a load)."""
        views = self.exp_avg_views
        return all(state[p].get("exp_avg") is v for p, v in zip(self.params, views))


class Adamax(torch.optim.Adamax):
    """``torch.optim.Adamax`` (same arguments, update and state) with small parameters updated together.

    ``maximize``, ``capturable``, ``differentiable``, complex or sparse parameters fall back to
    torch's implementation.
    """

    def __init__(self, params: Iterable[Any], lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, small_numel: int = SMALL_NUMEL, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.small_numel = small_numel
        self._buckets: dict[tuple[int, ...], _Bucket] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._buckets.clear()  # the loaded per-parameter tensors are gathered again at the next step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = []  # per group: the parameters updated one by one, and the small ones by (device, dtype)
        for group in self.param_groups:
            if group["maximize"] or group["capturable"] or group["differentiable"]:
                super().step()
                return loss
            large, small = [], {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.is_complex() or p.grad.is_sparse:
                    super().step()
                    return loss
                if p.numel() < self.small_numel:
                    small.setdefault((p.device, p.dtype), []).append(p)
                else:
                    large.append(p)
            plans.append((group, large, list(small.values())))
        for group, large, buckets in plans:
            for p in large:
                self._update_one(p, group)
            for params in buckets:
                self._update_bucket(self._bucket(params), group)
        return loss

    def _update_one(self, p: Tensor, group: dict[str, Any]) -> None:
        """torch's single-tensor Adamax update of one parameter."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        grad = p.grad
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        torch.maximum(state["exp_inf"].mul_(beta2), grad.abs().add_(group["eps"]), out=state["exp_inf"])
        clr = float(group["lr"]) / (1 - beta1 ** float(state["step"]))
        p.addcdiv_(state["exp_avg"], state["exp_inf"], value=-clr)

    def _bucket(self, params: list[Tensor]) -> _Bucket:
        """The flat state of ``params``, gathered from the per-parameter state when new or replaced."""
        key = tuple(id(p) for p in params)
        bucket = self._buckets.get(key)
        if bucket is not None and bucket.owns_state(self.state):
            return bucket
        orders = [None if p.is_contiguous() else _memory_order(p) for p in params]

        def gathered(name: str) -> Tensor:
            parts = [_flat(self.state[p][name], o) if name in self.state[p] else torch.zeros(p.numel(), dtype=p.dtype,
                                                                                                device=p.device)
                     for p, o in zip(params, orders)]
            return torch.cat(parts)

        steps = torch.stack([self.state[p]["step"].float() if "step" in self.state[p] else
                             torch.zeros((), dtype=torch.float32) for p in params])
        exp_avg, exp_inf = gathered("exp_avg"), gathered("exp_inf")
        update = torch.empty_like(exp_avg)
        views = {}
        for name, flat in (("exp_avg", exp_avg), ("exp_inf", exp_inf), ("update", update)):
            views[name] = [_shaped_like(piece, p, o)
                           for piece, p, o in zip(flat.split([p.numel() for p in params]), params, orders)]
        for i, p in enumerate(params):
            self.state[p] = {"step": steps[i], "exp_avg": views["exp_avg"][i], "exp_inf": views["exp_inf"][i]}
        members = set(key)  # buckets of another membership lost their state to this one
        self._buckets = {k: v for k, v in self._buckets.items() if members.isdisjoint(k)}
        bucket = self._buckets[key] = _Bucket(params, orders, steps, exp_avg, exp_inf, update, views["update"],
                                              views["exp_avg"], views["exp_inf"])
        return bucket

    def _update_bucket(self, b: _Bucket, group: dict[str, Any]) -> None:
        """The Adamax update of every parameter of ``b`` in a few operations on flat vectors."""
        beta1, beta2 = group["betas"]
        grad = torch.cat([_flat(p.grad, o) for p, o in zip(b.params, b.orders)])  # (numel,)
        if group["weight_decay"] != 0:
            grad.add_(torch.cat([_flat(p, o) for p, o in zip(b.params, b.orders)]), alpha=group["weight_decay"])
        b.steps += 1
        b.exp_avg.lerp_(grad, 1 - beta1)
        torch.maximum(b.exp_inf.mul_(beta2), grad.abs_().add_(group["eps"]), out=b.exp_inf)
        torch.div(b.exp_avg, b.exp_inf, out=b.update)
        lo, hi = b.steps.aminmax()
        if bool(lo == hi):  # the usual case: every parameter stepped equally often
            b.update.mul_(-float(group["lr"]) / (1 - beta1 ** float(lo)))
        else:  # per-parameter bias correction
            clr = -float(group["lr"]) / (1 - beta1 ** b.steps)
            sizes = torch.tensor([p.numel() for p in b.params], device=b.update.device)
            b.update.mul_(clr.to(b.update.device, b.update.dtype).repeat_interleave(sizes))
        torch._foreach_add_(b.params, b.update_views)
