"""Spectral regularization (paper sec. 3.2, "spectral regularization").

L_SR = sum over conv layers of the largest singular value of the (C_out, C_in*k*k) weight,
estimated by power iteration. The vectors u, v are buffers (saved in checkpoints, so a resumed run
continues the iteration); kernels of equal matrix shape are iterated together as one batch, the
groups of :func:`nvae.ops.kernel_bank.group_convs`. In a training step the kernel bank has stacked
each group's kernels already (:class:`nvae.ops.kernel_bank.KernelBank`): the regularizer iterates
on those stacks, sigma = u^T W v, and autograd carries u v^T into the stack. Otherwise each kernel
is made here from the convolution's parameters; a backend accelerator may instead hand over what
its forward pass made, as the raw weight and weight norm's scale with a *token* whose gradient it
turns into u v^T itself (:mod:`nvae.accel.cpu.tokens`); the regularizer then sets u, v on the
accelerator.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nvae.ops.kernel_bank import group_convs, kernel_matrix, matrix_as_kernel

LARGE_MATRIX = 2 ** 18  # elements of a kernel matrix above which CPU iterates weights one by one
TORCH_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class SpectralKernel(NamedTuple):
    """What a training forward pass made: W = diag(scale) w with a token, or W itself (scale, token None)."""

    weight: torch.Tensor
    """The raw (masked) weight w when ``scale`` is given, else the applied kernel W (detached or not)."""
    scale: Optional[torch.Tensor]
    """Weight normalization's per-row scale s, (out, 1, 1, 1), no gradient; None without weight norm."""
    token: Optional[torch.Tensor]
    """Zero scalar whose gradient c becomes c u v^T in the conv's backward; None: plain autograd."""


class SpectralConv(Protocol):
    """What the regularizer needs of a convolution (:class:`nvae.ops.conv.Conv2d` is one)."""

    out_channels: int
    weight: torch.Tensor
    log_weight_norm: Optional[torch.Tensor]
    accel: Optional[Any]
    """A backend's accelerator (:class:`nvae.ops.conv.ConvAccelerator`), or None."""

    def normalized_weight(self) -> torch.Tensor: ...


# ------------------------------------------------------------------------------ kernel layouts
def kernel_row(row: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (cols,) row of ``kernel_matrix(like)`` as a (1, C_in, k, k) kernel in ``like``'s layout (a view)."""
    return matrix_as_kernel(row.unsqueeze(0), like[:1])


# ------------------------------------------------------------------------------ batches across groups
ALONE = 2 ** 20  # elements of a group's stack from which it is iterated alone (no padded copy)
PAD_WASTE = 2.0  # a padded batch holds at most this many times the elements of its matrices ...
PAD_FREE = 2 ** 16  # ... or at most this many elements in all (a copy too small to matter)


def padded_buckets(shapes: Sequence[tuple[int, int, int]]) -> list[list[int]]:
    """Groups of (n, rows, cols) matrices to power-iterate together, zero-padded to a common shape:
    each costs its ~30 small operations per step once, however many groups share it.

    Large groups go alone; the others, from the smallest matrices up, join a batch while the padded
    batch stays within :data:`PAD_WASTE` times its real elements (or :data:`PAD_FREE` in all).
    """
    alone = [[i] for i, (n, r, c) in enumerate(shapes) if n * r * c >= ALONE]
    small = sorted((i for i, (n, r, c) in enumerate(shapes) if n * r * c < ALONE),
                   key=lambda i: (shapes[i][1] * shapes[i][2], i))
    buckets: list[list[int]] = []
    for i in small:
        if buckets:
            members = buckets[-1] + [i]
            n = sum(shapes[j][0] for j in members)
            padded = n * max(shapes[j][1] for j in members) * max(shapes[j][2] for j in members)
            real = sum(shapes[j][0] * shapes[j][1] * shapes[j][2] for j in members)
            if padded <= PAD_WASTE * real or padded <= PAD_FREE:
                buckets[-1].append(i)
                continue
        buckets.append([i])
    return sorted(alone + buckets)


# ------------------------------------------------------------------------------ the regularizer
def spectral_convs(model: nn.Module) -> list[SpectralConv]:
    """Every convolution of ``model`` with a weight the regularizer can read (``normalized_weight``); a torch
    convolution without one is refused."""
    convs = []
    for name, module in model.named_modules():
        if callable(getattr(module, "normalized_weight", None)) and hasattr(module, "accel"):
            convs.append(module)
        elif isinstance(module, TORCH_CONVS):
            raise ValueError(f"{name or 'model'}: a {type(module).__name__} escapes the spectral regularizer "
                             "(sec. 3.2 regularizes every convolution); build it with nvae.ops.Conv2d")
    return convs  # type: ignore[return-value]


class SpectralRegularizer(nn.Module):
    """Sum of spectral norms of every convolution in ``model`` (:func:`spectral_convs`).

    The first call runs ``initial_iters`` power iterations, later calls ``power_iters`` (no
    gradient through u, v); sigma = u^T W v carries the gradient u v^T to W, through tokens where
    a backend's forward pass recorded them (see the module docstring).
    """

    def __init__(self, model: nn.Module, power_iters: int = 4, initial_iters: int = 40) -> None:
        super().__init__()
        if power_iters < 1 or initial_iters < 1:
            raise ValueError(f"model.objective.power_iters must be >= 1 (power iterations per step), got {power_iters} "
                             f"(first step: {initial_iters})")
        self.power_iters, self.initial_iters = power_iters, initial_iters
        # Weight-normalized kernels (read as raw weights and per-row scales) and plain ones are
        # iterated in separate batches, even when their shapes agree.
        self._groups = group_convs(spectral_convs(model))  # plain list: the convs stay owned by ``model``
        shapes = []
        for i, convs in enumerate(self._groups):
            rows, cols = convs[0].out_channels, convs[0].weight[0].numel()
            self.register_buffer(f"u{i}", F.normalize(torch.randn(len(convs), rows), dim=1, eps=1e-3))
            self.register_buffer(f"v{i}", F.normalize(torch.randn(len(convs), cols), dim=1, eps=1e-3))
            shapes.append((len(convs), rows, cols))
        self._buckets = padded_buckets(shapes)
        self.register_buffer("initialized", torch.tensor(False))
        self._warm = False
        """The ``initialized`` buffer's value as Python knows it: read from the device at each state-dict
        load (:meth:`_load_from_state_dict`), never in a step (a compiled step has no graph break)."""

    @property
    def num_layers(self) -> int:
        return sum(len(g) for g in self._groups)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._warm = bool(self.initialized)  # a resumed run's buffer, read once here

    def forward(self, stacks: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """L_SR; ``stacks``: this step's kernel stacks from the model's kernel bank (``KernelBank.in_use``),
        one per group (else each kernel is made here)."""
        iters = self.power_iters if self._warm else self.initial_iters
        if stacks is not None and len(stacks) != len(self._groups):
            raise ValueError(f"{len(stacks)} kernel stacks for {len(self._groups)} groups of convolutions")
        total = torch.zeros((), device=self.initialized.device)
        with torch.autocast(total.device.type, enabled=False):
            if stacks is None:
                for i, convs in enumerate(self._groups):
                    total = total + self._layer_by_layer(convs, *self._uv(i), iters)
            else:
                matrices = [stack.float() for stack in stacks]  # each (n, rows, cols), with autograd
                for bucket in self._buckets:
                    total = total + self._bucket(bucket, [matrices[i] for i in bucket], iters)
        if not self._warm:
            self.initialized.fill_(True)
            self._warm = True
        return total

    def _uv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"u{i}"), getattr(self, f"v{i}")

    def _bucket(self, groups: list[int], matrices: list[torch.Tensor], iters: int) -> torch.Tensor:
        """The sigmas of several groups, their matrices zero-padded to one (N, R, C) batch: zero rows and
        columns change neither the singular values nor the vectors (whose padding stays 0), so the
        power iteration takes the same operations for all of them."""
        rows = max(m.shape[1] for m in matrices)
        cols = max(m.shape[2] for m in matrices)
        uv = [self._uv(i) for i in groups]
        if len(groups) == 1:
            w, u = matrices[0], uv[0][0]
        else:  # v is not padded: the iteration starts from u
            w = torch.cat([F.pad(m, (0, cols - m.shape[2], 0, rows - m.shape[1])) for m in matrices])  # (N, R, C)
            u = torch.cat([F.pad(u_g, (0, rows - u_g.shape[1])) for u_g, _ in uv])  # (N, R)
        u_new, v_new, wv = power_iteration(u, w.detach(), iters)
        sigma = SumOfBilinearForms.apply(w, u_new, v_new, (u_new * wv).sum())  # u^T W v from the last W v
        with torch.no_grad():
            start = 0
            for u_g, v_g in uv:
                n = u_g.shape[0]
                u_g.copy_(u_new[start:start + n, :u_g.shape[1]])
                v_g.copy_(v_new[start:start + n, :v_g.shape[1]])
                start += n
        return sigma

    def _layer_by_layer(self, convs: list[SpectralConv], u: torch.Tensor, v: torch.Tensor, iters: int) -> torch.Tensor:
        """One group's sigmas from kernels made per convolution (or kept by a backend, with tokens)."""
        taken = [(c.accel.take_kernel() if c.accel is not None else None)
                 or SpectralKernel(c.normalized_weight(), None, None) for c in convs]
        tokens = [k.token for k in taken if k.token is not None]
        with_tokens = len(tokens) == len(convs)  # else W itself, with autograd through sigma
        weights = [kernel_matrix(k.weight.float()) for k in taken]  # n x (rows, cols): w or W
        weight_normed = with_tokens and taken[0].scale is not None  # W = diag(s) w
        scales = torch.stack([k.scale.view(-1) for k in taken]) if weight_normed else None  # (n, rows)
        # One batched matmul per shape saves launches; on CPU, large matrices are iterated one by
        # one instead, since stacking them is a memory-bound copy of the whole group.
        sigmas = []  # u^T W v per part; no graph where tokens carry the gradient
        with torch.set_grad_enabled(torch.is_grad_enabled() and not with_tokens):
            if u.device.type == "cpu" and weights[0].numel() >= LARGE_MATRIX:
                parts = [(slice(j, j + 1), w.unsqueeze(0)) for j, w in enumerate(weights)]
            else:
                parts = [(slice(None), torch.stack(weights))]
            for rows, w in parts:  # w: (n or 1, rows, cols)
                s = None if scales is None else scales[rows]
                u_new, v_new, wv = power_iteration(u[rows], w, iters, s)
                if with_tokens:  # u^T W v from the last step's W v: no further pass over the weights
                    sigmas.append((u_new * wv).sum())
                else:
                    sigmas.append(SumOfBilinearForms.apply(w, u_new, v_new, (u_new * wv).sum()))
                with torch.no_grad():
                    u[rows], v[rows] = u_new, v_new
        total = sum(sigmas)
        if with_tokens:  # each token's gradient c becomes c u v^T in its conv's backward
            for j, conv in enumerate(convs):
                conv.accel.uv = (u[j], v[j])
            total = total + torch.stack(tokens).sum()
        return total


class SumOfBilinearForms(torch.autograd.Function):
    """sum_j u_j^T W_j v_j for a batch W (n, rows, cols) and constant u (n, rows), v (n, cols), its value given
    (the power iteration's last W v already holds it); the gradient to W is c u_j v_j^T, one broadcast
    product: a CPU's bmm of (rows, 1) x (1, cols) outer products takes a path several times slower."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u, v)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        u, v = ctx.saved_tensors
        return (grad * u).unsqueeze(2) * v.unsqueeze(1), None, None, None  # (n, rows, 1) * (n, 1, cols)


@torch.no_grad()
def power_iteration(u: torch.Tensor, w: torch.Tensor, iters: int,
                    scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iters`` (>= 1) steps of v <- W^T u / |.|, u <- W v / |.| for a batch of matrices W (n, rows, cols),
    from the last u (n, rows): the last v is not needed, each step makes v afresh.

    Returns u, v and the last W v (so u^T W v needs no further pass over W). With ``scale``
    (n, rows), W = diag(scale) w for the given w (a weight-normalized kernel read as its raw
    weights and per-row scales). v is normalized once, after the last step: u <- W v / |W v| is the
    same for any positive multiple of v (up to rounding, and unless |W^T u| < 1e-3, where the
    clamped norm already leaves v unnormalized), so the steps between take three calls fewer each.
    W v is taken as v^T W^T: CPU's bmm of matrices with (n, cols, 1) vectors takes a slow path.
    """
    wt = w.transpose(1, 2)  # (n, cols, rows), a view
    u = u.unsqueeze(1)  # (n, 1, rows): row vectors throughout
    scale = None if scale is None else scale.unsqueeze(1)
    for _ in range(iters):
        v = torch.bmm(u if scale is None else u * scale, w)  # (n, 1, cols), W^T u unnormalized
        wv = torch.bmm(v, wt)  # (n, 1, rows)
        if scale is not None:
            wv = wv * scale
        u = _unit(wv)
    norm_v = torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-3)  # (n, 1, 1)
    return u.squeeze(1), (v / norm_v).squeeze(1), (wv / norm_v).squeeze(1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-3) along the last dimension (F.normalize's eps, in three operations instead of four)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-3)
