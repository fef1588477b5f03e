"""Spectral regularization and the BatchNorm penalty (paper sec. 3.2, "spectral regularization").

L_SR = sum over conv layers of the largest singular value of the (C_out, C_in*k*k) weight,
estimated by power iteration. The vectors u, v are buffers (saved in checkpoints, so a resumed run
continues the iteration) and weights of equal shape are iterated together as one batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nvae.ops import Conv2d


LARGE_MATRIX = 2 ** 18  # elements of a kernel matrix above which CPU iterates weights one by one


class SpectralRegularizer(nn.Module):
    """Sum of spectral norms of every :class:`nvae.ops.Conv2d` in ``model``.

    The first call runs ``initial_iters`` power iterations, later calls ``power_iters`` (no
    gradient through u, v); sigma = u^T W v carries the gradient to W.
    """

    def __init__(self, model: nn.Module, power_iters: int = 4, initial_iters: int = 40) -> None:
        super().__init__()
        self.power_iters, self.initial_iters = power_iters, initial_iters
        groups: dict[tuple[int, int], list[Conv2d]] = {}
        for module in model.modules():
            if isinstance(module, Conv2d):
                rows = module.out_channels
                cols = module.weight[0].numel()
                groups.setdefault((rows, cols), []).append(module)
        self._groups = list(groups.values())  # plain list: the convs stay owned by ``model``
        for i, ((rows, cols), convs) in enumerate(groups.items()):
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
                weights = [_matrix(c.take_weight().float()) for c in convs]  # n x (rows, cols)
                u, v = getattr(self, f"u{i}"), getattr(self, f"v{i}")
                # One batched matmul per shape saves launches; on CPU, large matrices are iterated one
                # by one instead, since stacking them is a memory-bound copy of the whole group.
                if on_cpu and weights[0].numel() >= LARGE_MATRIX:
                    parts = [(slice(j, j + 1), w.unsqueeze(0)) for j, w in enumerate(weights)]
                else:
                    parts = [(slice(None), torch.stack(weights))]
                for rows, w in parts:  # w: (n or 1, rows, cols)
                    u_new, v_new = _power_iteration(u[rows], v[rows], w, iters)
                    total = total + torch.bmm(torch.bmm(u_new.unsqueeze(1), w), v_new.unsqueeze(2)).sum()  # u^T W v
                    with torch.no_grad():
                        u[rows], v[rows] = u_new, v_new
        self.initialized.fill_(True)
        return total


def _matrix(kernel: torch.Tensor) -> torch.Tensor:
    """The (C_out, C_in*k*k) matrix of a kernel, its columns in memory order (a view, no copy).

    Permuting columns leaves the singular values unchanged, so a channels_last kernel is read as
    (C_out, k*k*C_in) rather than copied into (C_out, C_in*k*k).
    """
    if kernel.dim() == 4 and not kernel.is_contiguous() and kernel.is_contiguous(memory_format=torch.channels_last):
        return kernel.permute(0, 2, 3, 1).flatten(1)  # (out, k*k*in)
    return kernel.flatten(1)


@torch.no_grad()
def _power_iteration(u: torch.Tensor, v: torch.Tensor, w: torch.Tensor, iters: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``iters`` steps of v <- W^T u / |.|, u <- W v / |.| for a batch of matrices w (n, rows, cols).

    W v is taken as v^T W^T: on CPU, bmm of a batch of matrices with (n, cols, 1) vectors takes a
    slow path (41 x (128, 1152): 5.2 ms, against 0.28 ms for the transposed product).
    """
    for _ in range(iters):
        v = F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), dim=1, eps=1e-3)  # (n, cols)
        u = F.normalize(torch.bmm(v.unsqueeze(1), w.transpose(1, 2)).squeeze(1), dim=1, eps=1e-3)  # (n, rows)
    return u, v


def batchnorm_penalty(model: nn.Module) -> torch.Tensor:
    """Sum over affine BatchNorm layers of max |gamma| (keeps BN scales from growing)."""
    terms = [m.weight.abs().max() for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    return torch.stack(terms).sum() if terms else torch.zeros(())
