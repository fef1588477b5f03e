"""The importance-weighted estimator against a model whose log p(x) is known in closed form.

A linear-Gaussian stand-in, p(z) = N(0, I_d), p(x | z) = N(A z + b, s^2 I_D), has
log p(x) = log N(x; b, A A^T + s^2 I) and the Gaussian posterior N(M (x - b), S) with
S = (I + A^T A / s^2)^-1 and M = S A^T / s^2. It goes through nvae's estimator
(:func:`nvae.metrics.likelihood.importance_weighted`) by offering what the estimator reads from NVAE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

from nvae.metrics.likelihood import importance_weighted

D, Z = 6, 3  # data and latent dimensions


@dataclass
class _Output:
    likelihood: torch.Tensor  # the mean of p(x | z), (N, D)
    kl: torch.Tensor  # (N, 1)
    log_q: torch.Tensor  # (N,)
    log_p: torch.Tensor  # (N,)


class LinearGaussian(nn.Module):
    """The stand-in; q is the exact posterior with its covariance scaled by ``inflate``; the posterior
    noise comes from a fixed table in order, so any chunking of the K samples draws the same noise."""

    def __init__(self, inflate: float, noise: torch.Tensor) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(D, Z, generator=g, dtype=torch.float64)
        self.b = torch.randn(D, generator=g, dtype=torch.float64)
        self.s = 0.5
        post_cov = torch.linalg.inv(torch.eye(Z, dtype=torch.float64) + self.a.T @ self.a / self.s ** 2)
        self.m = post_cov @ self.a.T / self.s ** 2  # (Z, D)
        self.q_cov = inflate * post_cov
        self.noise, self.cursor = noise, 0

    def exact_log_px(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.a @ self.a.T + self.s ** 2 * torch.eye(D, dtype=torch.float64)
        return MultivariateNormal(self.b, cov).log_prob(x.flatten(1).double())

    def forward(self, x: torch.Tensor) -> _Output:
        x = x.flatten(1).double()  # (N, D) from (N, 1, 1, D)
        eps = self.noise[self.cursor:self.cursor + x.shape[0]]
        self.cursor += x.shape[0]
        q = MultivariateNormal((x - self.b) @ self.m.T, self.q_cov)
        z = q.loc + eps @ torch.linalg.cholesky(self.q_cov).T
        prior = MultivariateNormal(torch.zeros(Z, dtype=torch.float64), torch.eye(Z, dtype=torch.float64))
        log_q, log_p = q.log_prob(z), prior.log_prob(z)
        return _Output(z @ self.a.T + self.b, (log_q - log_p)[:, None], log_q, log_p)

    def log_likelihood(self, mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        diff = x.flatten(1).double() - mean
        return -0.5 * (diff / self.s).square().sum(1) - D * math.log(self.s) - 0.5 * D * math.log(2 * math.pi)


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 1, 1, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_with_the_exact_posterior_every_k_gives_log_px() -> None:
    """q = p(z | x): every importance weight equals p(x), so logsumexp - log K is log p(x) for any K."""
    x = images(5)
    for k in (1, 7, 100):
        model = LinearGaussian(1.0, torch.randn(k * 5, Z, dtype=torch.float64))
        log_px, elbo = importance_weighted(model, x, k, max_rows=50)
        exact = model.exact_log_px(x).float()  # the estimator returns float32
        torch.testing.assert_close(log_px, exact, rtol=1e-6, atol=0)  # a few float32 roundings of ~-10
        torch.testing.assert_close(elbo, exact, rtol=1e-6, atol=0)


def test_the_bound_rises_with_k_to_the_exact_log_px() -> None:
    """With q's covariance 2x too wide, the bound sits below log p(x) and closes as K grows (200 images)."""
    n = 200
    x = images(n)
    g = torch.Generator().manual_seed(2)
    gap, se = {}, {}
    for k in (1, 10, 100, 1000):
        model = LinearGaussian(2.0, torch.randn(k * n, Z, generator=g, dtype=torch.float64))
        log_px, _ = importance_weighted(model, x, k, max_rows=k * n)
        d = model.exact_log_px(x) - log_px.double()
        gap[k], se[k] = d.mean().item(), d.std().item() / math.sqrt(n)
    # measured: 0.42 +- 0.08, 0.054 +- 0.018, 0.0006 +- 0.005, 0.0009 +- 0.0017 nats
    assert gap[1] - gap[10] > 3 * (se[1] + se[10])
    assert gap[10] - gap[100] > 2 * (se[10] + se[100])
    assert abs(gap[1000]) < 4 * se[1000] and se[1000] < 0.005  # unbiased to within its noise at K = 1000


@pytest.mark.parametrize("max_rows", [1, 7, 60])
def test_chunked_and_unchunked_agree_exactly_with_the_same_noise(max_rows: int) -> None:
    x, k = images(3), 20
    noise = torch.randn(k * 3, Z, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    whole = importance_weighted(LinearGaussian(2.0, noise), x, k, max_rows=k * 3)
    chunked = importance_weighted(LinearGaussian(2.0, noise), x, k, max_rows=max_rows)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
