"""Adamax with a cheap step for models made of many small tensors.

NVAE trains with Adamax (Kingma & Ba, 2015, sec. 7.1; NVAE paper sec. 5 and appendix A: Adamax
with epsilon 1e-3). ``torch.optim.Adamax`` updates one parameter at a time with about ten tensor
operations each; NVAE's MNIST model has 1,272 parameter tensors, 1,135 of them under 64 Ki elements
(biases, BatchNorm and weight-norm gains, small kernels). On 2 CPU cores its step takes ~42 ms of a
~0.5 s training step, ~20 ms of which is per-tensor overhead on the small ones (the large ones are
bound by memory bandwidth).

:class:`Adamax` computes the same update. Parameters of at least ``small_numel`` elements are updated
one by one as torch does; the small ones of a parameter group are updated together: their gradients
are gathered into flat vectors of up to ``bucket_numel`` elements, the moments live in flat
buffers, and the update is added back with one ``_foreach_add_`` per buffer (~10 ms instead of
~20). The optimizer state keeps torch's keys and shapes (per parameter ``step``, ``exp_avg``,
``exp_inf``; for small parameters views of the flat buffers), so checkpoints load into either
optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from nvae.compat import flatten_dense_tensors, foreach_add_, unflatten_dense_tensors

SMALL_NUMEL = 1 << 16  # parameters below this many elements are updated through the flat buffers
BUCKET_NUMEL = 1 << 20  # elements per flat buffer: its scratch copy of the gradients stays at 4 MB (float32)


def _split(params: list[Tensor], numel: int) -> list[list[Tensor]]:
    """``params`` in order, cut into runs of at most ``numel`` elements (a larger tensor alone)."""
    runs: list[list[Tensor]] = [[]]
    size = 0
    for p in params:
        if runs[-1] and size + p.numel() > numel:
            runs.append([])
            size = 0
        runs[-1].append(p)
        size += p.numel()
    return runs if runs[0] else []


@dataclass
class _Bucket:
    """Flat state of the small parameters of one group that had gradients in the same step."""

    params: list[Tensor]
    steps: Tensor  # (n,) float32, one step count per parameter
    exp_avg: Tensor  # (numel,) first moments, the parameters' elements concatenated (row-major each)
    exp_inf: Tensor  # (numel,) infinity norms
    exp_avg_views: list[Tensor]  # the optimizer state's exp_avg entries, to tell a load replaced them

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
                 eps: float = 1e-8, weight_decay: float = 0.0, small_numel: int = SMALL_NUMEL,
                 bucket_numel: int = BUCKET_NUMEL, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.small_numel, self.bucket_numel = small_numel, bucket_numel
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
            plans.append((group, large, [b for params in small.values() for b in _split(params, self.bucket_numel)]))
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
        decayed = group["weight_decay"] != 0
        if decayed:
            grad = grad.add(p, alpha=group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        magnitude = grad.abs_() if decayed else grad.abs()  # in place on our own copy: one temporary, not two
        torch.maximum(state["exp_inf"].mul_(beta2), magnitude.add_(group["eps"]), out=state["exp_inf"])
        clr = float(group["lr"]) / (1 - beta1 ** float(state["step"]))
        p.addcdiv_(state["exp_avg"], state["exp_inf"], value=-clr)

    def _bucket(self, params: list[Tensor]) -> _Bucket:
        """The flat state of ``params``, gathered from the per-parameter state when new or replaced."""
        key = tuple(id(p) for p in params)
        bucket = self._buckets.get(key)
        if bucket is not None and bucket.owns_state(self.state):
            return bucket

        def gathered(name: str) -> Tensor:
            if not any(name in self.state[p] for p in params):  # the first step: no copies
                return params[0].new_zeros(sum(p.numel() for p in params))
            return flatten_dense_tensors([self.state[p][name] if name in self.state[p] else torch.zeros_like(p)
                                           for p in params])

        steps = torch.stack([self.state[p]["step"].float() if "step" in self.state[p] else
                             torch.zeros((), dtype=torch.float32) for p in params])
        exp_avg, exp_inf = gathered("exp_avg"), gathered("exp_inf")
        views = {name: list(unflatten_dense_tensors(flat, params)) for name, flat in (("exp_avg", exp_avg),
                                                                                      ("exp_inf", exp_inf))}
        for i, p in enumerate(params):
            self.state[p] = {"step": steps[i], "exp_avg": views["exp_avg"][i], "exp_inf": views["exp_inf"][i]}
        members = set(key)  # buckets of another membership lost their state to this one
        self._buckets = {k: v for k, v in self._buckets.items() if members.isdisjoint(k)}
        bucket = self._buckets[key] = _Bucket(params, steps, exp_avg, exp_inf, views["exp_avg"])
        return bucket

    def _update_bucket(self, b: _Bucket, group: dict[str, Any]) -> None:
        """The Adamax update of every parameter of ``b`` in a few operations on flat vectors.

        The only scratch memory is one flat copy of the gradients, which then holds the update:
        with activation checkpointing the optimizer step is where the peak memory is reached.
        """
        beta1, beta2 = group["betas"]
        buffer = flatten_dense_tensors([p.grad for p in b.params])  # (numel,)
        if len(b.params) == 1:  # then the flat vector is the gradient itself, which must stay as it is
            buffer = buffer.clone()
        if group["weight_decay"] != 0:
            foreach_add_(unflatten_dense_tensors(buffer, b.params), b.params, alpha=group["weight_decay"])
        b.steps += 1
        b.exp_avg.lerp_(buffer, 1 - beta1)
        torch.maximum(b.exp_inf.mul_(beta2), buffer.abs_().add_(group["eps"]), out=b.exp_inf)
        update = torch.div(b.exp_avg, b.exp_inf, out=buffer)
        lo, hi = b.steps.aminmax()
        if bool(lo == hi):  # the usual case: every parameter stepped equally often
            update.mul_(-float(group["lr"]) / (1 - beta1 ** float(lo)))
        else:  # per-parameter bias correction
            clr = -float(group["lr"]) / (1 - beta1 ** b.steps)
            sizes = torch.tensor([p.numel() for p in b.params], device=update.device)
            update.mul_(clr.to(update.device, update.dtype).repeat_interleave(sizes))
        foreach_add_(b.params, unflatten_dense_tensors(update, b.params))
