"""The PnP-HVAE latent step: the Gaussian product against its closed form and against a
numerical minimization of its objective."""
from __future__ import annotations

import math

import pytest
import torch

from nvae.restore.latent_step import gaussian_product, latent_step, temperatures


def _objective(z: torch.Tensor, mu_q: float, s_q: float, mu_p: float, s_p: float, beta: float, t: float) -> torch.Tensor:
    """-beta log q(z) - (1/T^2 - beta) log p(z), constants dropped."""
    return beta * (z - mu_q) ** 2 / (2 * s_q ** 2) + (1 / t ** 2 - beta) * (z - mu_p) ** 2 / (2 * s_p ** 2)


@pytest.mark.parametrize("beta, t", [(1.0, 1.0), (0.5, 0.8), (0.2, 1.5), (1.0, 0.6)])
def test_the_product_minimizes_its_objective(beta: float, t: float) -> None:
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(20, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    s_q, s_p = torch.rand(20, generator=g, dtype=torch.float64) + 0.3, torch.rand(20, generator=g, dtype=torch.float64) + 0.3
    mean, std = gaussian_product(mu_q, s_q, mu_p, s_p, beta, t)
    from scipy.optimize import minimize_scalar

    found = torch.tensor([minimize_scalar(lambda v, i=i: float(_objective(torch.tensor(v, dtype=torch.float64), mu_q[i],
                                                                               s_q[i], mu_p[i], s_p[i], beta, t)),
                                          method="brent", tol=1e-12).x for i in range(len(mu_q))], dtype=torch.float64)
    # Brent locates a minimum of a smooth function to ~sqrt(float64 eps) ~ 1.5e-8 relative in z (the
    # objective is flat to second order there); 1e-6 absolute on |z| of order 1 leaves a factor ~60
    torch.testing.assert_close(mean, found, rtol=0, atol=1e-6)
    # the curvature of the objective is the product's precision: 1/std^2
    curvature = beta / s_q ** 2 + (1 / t ** 2 - beta) / s_p ** 2
    torch.testing.assert_close(std, curvature.rsqrt(), rtol=1e-12, atol=0)


def test_beta_one_at_temperature_one_is_the_posterior() -> None:
    mu_q, s_q, mu_p, s_p = torch.tensor([0.3, -2.0]), torch.tensor([0.5, 2.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.1])
    mean, std = gaussian_product(mu_q, s_q, mu_p, s_p, beta=1.0, temperature=1.0)
    assert torch.equal(mean, mu_q) and torch.allclose(std, s_q)


def test_sampling_mode_draws_from_the_product_and_follows_the_seed() -> None:
    mu_q, s_q = torch.zeros(200000), torch.ones(200000)
    mu_p, s_p = torch.full((200000,), 2.0), torch.full((200000,), 0.5)
    mean, std = gaussian_product(mu_q, s_q, mu_p, s_p, 0.5, 0.9)
    z = latent_step(mu_q, s_q, mu_p, s_p, 0.5, 0.9, torch.Generator().manual_seed(1), sample=True)
    # 200,000 draws: the sample mean is within 5 standard errors, the std within 2%
    assert abs(z.mean() - mean[0]) < 5 * std[0] / math.sqrt(z.numel())
    assert abs(z.std() / std[0] - 1) < 0.02
    again = latent_step(mu_q, s_q, mu_p, s_p, 0.5, 0.9, torch.Generator().manual_seed(1), sample=True)
    assert torch.equal(z, again)


def test_an_improper_product_and_bad_parameters_are_refused() -> None:
    one = torch.ones(1)
    with pytest.raises(ValueError, match="not a Gaussian"):
        gaussian_product(one, one * 10, one, one * 0.1, beta=1.0, temperature=2.0)  # b = -3, narrow prior
    with pytest.raises(ValueError, match="must be > 0"):
        gaussian_product(one, one, one, one, beta=0.0, temperature=1.0)


def test_temperature_schedule_is_linear_over_the_groups() -> None:
    assert temperatures(5, 0.8, 0.4) == pytest.approx([0.8, 0.7, 0.6, 0.5, 0.4])
    assert temperatures(3, 0.7) == [0.7, 0.7, 0.7] and temperatures(1, 0.3, 0.9) == [0.3]
