"""The latent step of PnP-HVAE (Prost, Houdard, Almansa, Papadakis, ICCV 2023, arXiv 2303.11217, sec. 3).

For a latent group with posterior q = N(mu_q, sigma_q^2) and prior p = N(mu_p, sigma_p^2) (both given
the groups above), the step takes z from the Gaussian proportional to q^beta * p^(1/T^2 - beta): the
latent term of C_beta(x, z) = -log p(y|x) - beta log p(x|z) - log p_T(z) with the encoder standing in
for p(x|z) (the paper's approximation), and the prior at temperature T. Its precision is the sum of
the two precisions, its mean their precision-weighted mean:

    precision = beta / sigma_q^2 + b / (T^2 sigma_p^2),   b = 1 - beta T^2
    mean      = (beta mu_q / sigma_q^2 + b mu_p / (T^2 sigma_p^2)) / precision

MAP mode uses the mean, sampling mode a draw. With beta = 1 and T = 1 (b = 0) it is the posterior.
A temperature schedule over the groups (linear from the first to the last) is :func:`temperatures`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def gaussian_product(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor, beta: float,
                     temperature: float) -> tuple[Tensor, Tensor]:
    """(mean, standard deviation) of the Gaussian proportional to q^beta p^(1/T^2 - beta), elementwise.

    ValueError when the product is not a Gaussian (its precision not positive: beta T^2 > 1 with a
    prior much narrower than the posterior)."""
    if beta <= 0 or temperature <= 0:
        raise ValueError(f"beta and the temperature must be > 0, got beta {beta}, temperature {temperature}")
    b = 1.0 - beta * temperature ** 2
    w_q = beta / sigma_q.square()  # precision contributed by q^beta
    w_p = b / (temperature ** 2 * sigma_p.square())  # by p^(1/T^2 - beta); negative when beta T^2 > 1
    precision = w_q + w_p
    if not bool((precision > 0).all()):
        raise ValueError(f"q^beta p^(1/T^2 - beta) is not a Gaussian for beta {beta}, temperature {temperature}: "
                         "its precision is not positive everywhere (lower beta or the temperature)")
    mean = (w_q * mu_q + w_p * mu_p) / precision
    return mean, precision.rsqrt()


def latent_step(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor, beta: float, temperature: float,
                generator: Optional[torch.Generator] = None, sample: bool = False) -> Tensor:
    """z for one group: the product's mean (MAP mode) or, with ``sample``, a draw from it."""
    mean, std = gaussian_product(mu_q, sigma_q, mu_p, sigma_p, beta, temperature)
    if not sample:
        return mean
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * noise


def temperatures(num_groups: int, first: float, last: Optional[float] = None) -> list[float]:
    """T_l for groups l = 0 (top) .. num_groups - 1: linear from ``first`` to ``last`` (constant without it)."""
    last = first if last is None else last
    if num_groups == 1:
        return [first]
    return [first + (last - first) * i / (num_groups - 1) for i in range(num_groups)]
