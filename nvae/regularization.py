"""Spectral regularization and the BatchNorm penalty (paper sec. 3.2, "spectral regularization").

L_SR = sum over conv layers of the largest singular value of the (C_out, C_in*k*k) weight,
estimated by power iteration. The vectors u, v are buffers (saved in checkpoints, so a resumed run
continues the iteration) and weights of equal shape are iterated together as one batch.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nvae.compat import BatchNormBase, foreach_norm
from nvae.ops import Conv2d, kernel_matrix


LARGE_MATRIX = 2 ** 18  # elements of a kernel matrix above which CPU iterates weights one by one


class SpectralRegularizer(nn.Module):
    """Sum of spectral norms of every :class:`nvae.ops.Conv2d` in ``model``.

    The first call runs ``initial_iters`` power iterations, later calls ``power_iters`` (no
    gradient through u, v); sigma = u^T W v carries the gradient u v^T to W. Kernels of the
    step's forward pass come with spectral tokens: their gradient joins the conv's own inside the
    weight norm's backward (see :class:`nvae.ops._WeightNorm`; :class:`nvae.ops._SpectralToken`
    without weight normalization) instead of being held from the start of backward.
    """

    def __init__(self, model: nn.Module, power_iters: int = 4, initial_iters: int = 40) -> None:
        super().__init__()
        if power_iters < 1 or initial_iters < 1:
            raise ValueError(f"model.power_iters must be >= 1 (power iterations per step), got {power_iters} "
                             f"(first step: {initial_iters})")
        self.power_iters, self.initial_iters = power_iters, initial_iters
        # Weight-normalized kernels (read as raw weights and per-row scales) and plain ones are
        # iterated in separate batches, even when their shapes agree.
        groups: dict[tuple[int, int, bool], list[Conv2d]] = {}
        for module in model.modules():
            if isinstance(module, Conv2d):
                rows = module.out_channels
                cols = module.weight[0].numel()
                groups.setdefault((rows, cols, module.log_weight_norm is not None), []).append(module)
        self._groups = list(groups.values())  # plain list: the convs stay owned by ``model``
        for i, ((rows, cols, _), convs) in enumerate(groups.items()):
            self.register_buffer(f"u{i}", F.normalize(torch.randn(len(convs), rows), dim=1, eps=1e-3))
            self.register_buffer(f"v{i}", F.normalize(torch.randn(len(convs), cols), dim=1, eps=1e-3))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def num_layers(self) -> int:
        return sum(len(g) for g in self._groups)

    def forward(self) -> torch.Tensor:
        iters = self.power_iters if bool(self.initialized) else self.initial_iters
        total = torch.zeros((), device=self.initialized.device)
        on_cpu = total.device.type == "cpu"
        with torch.autocast(total.device.type, enabled=False):
            for i, convs in enumerate(self._groups):
                taken = [c.take_weight() for c in convs]
                tokens = [t for _, _, t in taken if t is not None]
                with_tokens = len(tokens) == len(convs)  # else W itself, with autograd through sigma
                weights = [kernel_matrix(w.float()) for w, _, _ in taken]  # n x (rows, cols): w or W
                weight_normed = with_tokens and taken[0][1] is not None  # W = diag(s) w
                scales = torch.stack([s.view(-1) for _, s, _ in taken]) if weight_normed else None  # (n, rows)
                u, v = getattr(self, f"u{i}"), getattr(self, f"v{i}")
                # One batched matmul per shape saves launches; on CPU, large matrices are iterated one
                # by one instead, since stacking them is a memory-bound copy of the whole group.
                sigmas = []  # u^T W v per part; no graph where tokens carry the gradient
                with torch.set_grad_enabled(torch.is_grad_enabled() and not with_tokens):
                    if on_cpu and weights[0].numel() >= LARGE_MATRIX:
                        parts = [(slice(j, j + 1), w.unsqueeze(0)) for j, w in enumerate(weights)]
                    else:
                        parts = [(slice(None), torch.stack(weights))]
                    for rows, w in parts:  # w: (n or 1, rows, cols)
                        s = None if scales is None else scales[rows]
                        u_new, v_new, wv = _power_iteration(u[rows], v[rows], w, iters, s)
                        if with_tokens:  # u^T W v from the last step's W v: no further pass over the weights
                            sigmas.append((u_new * wv).sum())
                        else:
                            sigmas.append(torch.bmm(torch.bmm(u_new.unsqueeze(1), w), v_new.unsqueeze(2)).sum())
                        with torch.no_grad():
                            u[rows], v[rows] = u_new, v_new
                total = total + sum(sigmas)
                if with_tokens:  # gradient u v^T joins each conv's own (nvae.ops._WeightNorm, _SpectralToken)
                    for j, conv in enumerate(convs):
                        conv.__dict__["spectral_uv"] = (u[j], v[j])
                    total = total + torch.stack(tokens).sum()
        self.initialized.fill_(True)
        return total


@torch.no_grad()
def _power_iteration(u: torch.Tensor, v: torch.Tensor, w: torch.Tensor, iters: int,
                     scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iters`` (>= 1) steps of v <- W^T u / |.|, u <- W v / |.| for a batch of matrices W (n, rows, cols).

    Returns u, v and the last W v (so u^T W v needs no further pass over W). With ``scale``
    (n, rows), W = diag(scale) w for the given w (a weight-normalized kernel read as its raw
    weights and per-row scales). W v is taken as v^T W^T: on CPU, bmm of a batch of matrices with
    (n, cols, 1) vectors takes a slow path (41 x (128, 1152): 5.2 ms, against 0.28 ms for the
    transposed product).
    """
    wt = w.transpose(1, 2)  # (n, cols, rows), a view
    u, v = u.unsqueeze(1), v.unsqueeze(1)  # (n, 1, rows), (n, 1, cols): row vectors throughout
    scale = None if scale is None else scale.unsqueeze(1)
    wv = u
    for _ in range(iters):
        v = _unit(torch.bmm(u if scale is None else u * scale, w))  # (n, 1, cols)
        wv = torch.bmm(v, wt)  # (n, 1, rows)
        if scale is not None:
            wv = wv * scale
        u = _unit(wv)
    u, v, wv = u.squeeze(1), v.squeeze(1), wv.squeeze(1)
    return u, v, wv


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-3) along the last dimension (F.normalize's eps, in three operations instead of four)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-3)


def batchnorm_gammas(model: nn.Module) -> list[nn.Parameter]:
    """The scale parameters (gamma) of every affine BatchNorm layer of ``model``."""
    return [m.weight for m in model.modules() if isinstance(m, BatchNormBase) and m.affine]


def batchnorm_penalty(model: nn.Module | Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over affine BatchNorm layers of max |gamma| (keeps BN scales from growing).

    ``model`` may also be the gammas themselves (:func:`batchnorm_gammas`, gathered once): the
    per-layer maxima are one ``_foreach_norm`` (inf-norm; same gradient as ``abs().max()``, ties
    shared equally).
    """
    gammas = batchnorm_gammas(model) if isinstance(model, nn.Module) else list(model)
    if not gammas:
        return torch.zeros(())
    return torch.stack(foreach_norm(gammas, float("inf"))).sum()
