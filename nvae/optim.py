"""Adamax (the paper's optimizer, sec. 4 and appendix A) whose update a step guard can cancel on the
device, without reading anything back to the host.

The step guard (:mod:`nvae.guard`) decides after backward whether an update is safe. Deciding on the
host means reading the gradient norm, a synchronization that stalls a GPU's queue every step. Here
the decision stays a 0-d tensor ``keep`` (1.0: update, 0.0: skip) on the parameters' device, handed
to :meth:`Adamax.apply_if` before the step; on an accelerator the update is torch's Adamax (the
capturable form: step counters on the device) with every change multiplied by ``keep``, so a
skipped step leaves the parameters, the moments and the step counters exactly as they were.
Gradients are first copied into one buffer whose non-finite entries become 0 (a skipped step's NaN
gradient would otherwise turn the masked arithmetic into NaN: 0 * NaN is NaN). On the CPU, where
reading the flag costs nothing, it is read and torch's own update runs (fewer passes over memory).

The state is torch's (``exp_avg``, ``exp_inf``, ``step`` per parameter): checkpoints of either load
in the other (step counters on the host are moved to the device at the first step).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from nvae.ops.kernel_bank import matrix_as_kernel


def _like(part: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A flat (numel,) slice viewed with the shape and memory layout of ``param``."""
    if param.dim() == 4:
        return matrix_as_kernel(part.view(param.shape[0], -1), param)
    return part.view(param.shape)


def finite_grads(grads: list[torch.Tensor], params: list[torch.Tensor], keep: torch.Tensor,
                 weight_decay: float = 0.0) -> list[torch.Tensor]:
    """``keep * (grads + weight_decay * params)``, laid out as ``params``, with 0 for every non-finite
    entry: copies in one buffer, whose masking is two operations however many gradients there are."""
    flat = torch.empty(sum(g.numel() for g in grads), dtype=grads[0].dtype, device=grads[0].device)
    views = [_like(part, p) for part, p in zip(flat.split([p.numel() for p in params]), params)]
    torch._foreach_copy_(views, grads)
    if weight_decay:
        torch._foreach_add_(views, params, alpha=weight_decay)
    flat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(keep)
    return views


@torch.no_grad()
def masked_adamax_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                   exp_infs: list[torch.Tensor], steps: list[torch.Tensor], keep: torch.Tensor, *, lr: float,
                   beta1: float, beta2: float, eps: float) -> None:
    """One Adamax update of every parameter if ``keep`` (0-d) is 1.0; none at all (bit for bit) if it is 0.0.

    torch.optim.Adamax's capturable form: m <- b1 m + (1 - b1) g; u <- max(b2 u, |g| + eps);
    p <- p - lr / (1 - b1^t) * m / u, for ``grads`` from :func:`finite_grads` (weight decay included,
    zero when skipped). With keep = 0 the decays become factors of 1, the gradient terms 0, and
    max(u, 0) = u.
    """
    torch._foreach_add_(steps, keep)
    torch._foreach_mul_(exp_avgs, 1 - keep * (1 - beta1))
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_infs, 1 - keep * (1 - beta2))
    norm = torch._foreach_abs(grads)
    torch._foreach_add_(norm, keep * eps)
    torch._foreach_maximum_(exp_infs, norm)
    bias = torch._foreach_pow(beta1, steps)  # b1^t per parameter, on the device
    torch._foreach_sub_(bias, 1)
    torch._foreach_div_(bias, lr)  # -(1 - b1^t) / lr
    denom = torch._foreach_mul(exp_infs, bias)  # <= 0, and 0 before a first update (u = 0, t = 0) ...
    torch._foreach_sub_(denom, 1 - keep)  # ... so a skipped step divides 0 by -1 or less, never 0 / 0
    torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, keep), denom)


class Adamax(torch.optim.Adamax):
    """torch.optim.Adamax with :meth:`apply_if` (see the module docstring); without it every step updates.

    ``masked``: cancel by arithmetic on the device (True), or read the flag and let torch's own
    Adamax update (False: on the CPU, where a read costs nothing and torch's update is the faster);
    None picks by the flag's device.
    """

    def __init__(self, params: Iterable[Any], lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, masked: Optional[bool] = None) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)
        self.masked = masked
        self._keep: Optional[torch.Tensor] = None

    def apply_if(self, keep: torch.Tensor) -> None:
        """The coming step updates only if ``keep`` (0-d, 1.0 or 0.0, any device) is 1."""
        self._keep = keep

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:  # Lightning's closure: training_step, backward and the guard's hook
            with torch.enable_grad():
                loss = closure()
        keep, self._keep = self._keep, None
        masked = self.masked if self.masked is not None else keep is not None and keep.device.type != "cpu"
        if not masked:
            if keep is None or bool(keep):
                super().step()
            return loss
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device:  # from torch's own update (step counters on the host)
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
            on = torch.ones((), device=params[0].device) if keep is None else keep.to(params[0].device, torch.float32)
            beta1, beta2 = group["betas"]
            grads = finite_grads([p.grad for p in params], params, on, group["weight_decay"])
            masked_adamax_(params, grads, [self.state[p]["exp_avg"] for p in params],
                           [self.state[p]["exp_inf"] for p in params], [self.state[p]["step"] for p in params], on,
                           lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"])
        return loss
