"""The training objective of NVAE (paper sec. 3.2 and appendix A): negative ELBO with KL warm-up,
KL balancing across groups, the BatchNorm penalty (sec. 3.2, next to spectral regularization,
which lives in :mod:`nvae.spectral`) and the conversion to bits per dimension.

Pure functions of tensors; no state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from nvae.compat import BatchNormBase


def kl_warmup(step: int, total_steps: int, anneal_portion: float = 0.3, const_portion: float = 1e-4,
              min_coeff: float = 1e-4) -> float:
    """KL coefficient beta: clip((step - c T) / (a T), min_coeff, 1) (appendix A, "KL warm-up")."""
    anneal = max(anneal_portion * total_steps, 1.0)
    return float(min(max((step - const_portion * total_steps) / anneal, min_coeff), 1.0))


def kl_balance_alpha(group_scale: list[int], groups_per_scale: list[int]) -> torch.Tensor:
    """Per-group alpha_s = (2^s)^2 / groups(s), s = 0 at the coarsest scale, divided by its minimum.

    ``group_scale`` gives each group's scale index (coarsest first); ``groups_per_scale`` the
    number of groups of each scale, coarsest first.
    """
    alpha = torch.tensor([4.0 ** s / groups_per_scale[s] for s in group_scale])
    return alpha / alpha.min()


def balanced_kl(kl: torch.Tensor, beta: float, alpha: torch.Tensor, balance: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """beta * sum_l gamma_l KL_l per image, and gamma (G,) (appendix A, "KL balancing coefficient").

    While beta < 1, gamma_l is proportional to the group's batch-mean KL (+0.01) divided by
    alpha_l, normalized to mean 1, and carries no gradient; afterwards gamma = 1.
    kl: (B, G) per image and group.
    """
    if balance and beta < 1.0:
        gamma = (kl.detach().abs().mean(dim=0) + 0.01) / alpha.to(kl)
        gamma = gamma / gamma.mean()
    else:
        gamma = torch.ones(kl.shape[1], dtype=kl.dtype, device=kl.device)
    return beta * (kl * gamma).sum(dim=1), gamma


def regularization_coeff(beta: float, final: float, initial: float | None = None) -> float:
    """lambda, optionally annealed geometrically from ``initial`` to ``final`` as beta goes 0 -> 1."""
    if initial is None or initial <= 0:
        return final
    return math.exp((1.0 - beta) * math.log(initial) + beta * math.log(final))


def bits_per_dim(nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Per-image nats -> bits per dimension: nats / (num_dims * ln 2)."""
    return nats / (num_dims * math.log(2.0))


@dataclass
class NELBO:
    """The terms of one batch's objective."""

    loss: torch.Tensor
    """Scalar to minimize: mean of reconstruction + weighted KL (regularizers added by the caller)."""
    nelbo: torch.Tensor
    """(B,) negative ELBO with unit KL weights: the bound itself, in nats."""
    recon: torch.Tensor
    """(B,) -log p(x | z)."""
    kl: torch.Tensor
    """(B,) total KL."""
    gamma: torch.Tensor
    """(G,) balancing coefficients used."""


def nelbo(log_px: torch.Tensor, kl: torch.Tensor, beta: float, alpha: torch.Tensor, balance: bool = True) -> NELBO:
    """Negative ELBO of a batch from log p(x|z) (B,) and per-group KL (B, G) (sec. 3, eq. 1)."""
    weighted, gamma = balanced_kl(kl, beta, alpha, balance)
    recon = -log_px
    kl_total = kl.sum(dim=1)
    return NELBO((recon + weighted).mean(), recon + kl_total, recon, kl_total, gamma)


def batchnorm_gammas(model: nn.Module) -> list[nn.Parameter]:
    """The scale parameters (gamma) of every affine BatchNorm layer of ``model``."""
    return [m.weight for m in model.modules() if isinstance(m, BatchNormBase) and m.affine]


def layer_index(gammas: Sequence[torch.Tensor]) -> torch.Tensor:
    """(sum of sizes,) index of the layer each entry of ``torch.cat(gammas)`` belongs to."""
    sizes = [g.numel() for g in gammas]
    return torch.repeat_interleave(torch.arange(len(gammas)), torch.tensor(sizes), output_size=sum(sizes))


def batchnorm_penalty(model: nn.Module | Sequence[torch.Tensor], index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over affine BatchNorm layers of max |gamma| (keeps BN scales from growing).

    ``model`` may also be the gammas themselves (:func:`batchnorm_gammas`, gathered once), with their
    :func:`layer_index` (made here when not given). The per-layer maxima are one ``scatter_reduce``
    over all gammas at once, not one reduction per layer; its gradient is that of ``abs().max()``
    per layer, ties shared equally.
    """
    gammas = batchnorm_gammas(model) if isinstance(model, nn.Module) else list(model)
    if not gammas:
        return torch.zeros(())
    flat = torch.cat([g.view(-1) for g in gammas]).abs()  # (sum of sizes,)
    index = layer_index(gammas).to(flat.device) if index is None else index
    maxima = flat.new_zeros(len(gammas)).scatter_reduce(0, index, flat, "amax", include_self=False)  # (layers,)
    return maxima.sum()
