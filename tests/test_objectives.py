"""KL warm-up, KL balancing, regularization coefficient and bits/dim at their closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from nvae.objectives import balanced_kl, bits_per_dim, kl_balance_alpha, kl_warmup, nelbo, regularization_coeff


def test_kl_warmup_endpoints_and_linear_ramp() -> None:
    total = 10_000
    assert kl_warmup(0, total) == pytest.approx(1e-4)
    assert kl_warmup(total, total) == 1.0
    assert kl_warmup(int(0.3 * total) + 1, total) == 1.0  # ramp ends at kl_anneal_portion
    mid = kl_warmup(1501, total)
    assert mid == pytest.approx((1501 - 1) / 3000)


def test_kl_balance_alpha_matches_formula() -> None:
    # two scales, coarsest first: 5 groups at s=0, 10 groups at s=1
    scales = [0] * 5 + [1] * 10
    alpha = kl_balance_alpha(scales, [5, 10])
    expected = torch.tensor([1 / 5] * 5 + [4 / 10] * 10)
    torch.testing.assert_close(alpha, expected / expected.min())


def test_balanced_kl_coefficients() -> None:
    kl = torch.tensor([[1.0, 3.0], [3.0, 5.0]])  # batch means 2 and 4
    alpha = torch.tensor([1.0, 2.0])
    weighted, gamma = balanced_kl(kl, beta=0.5, alpha=alpha)
    raw = torch.tensor([2.01 / 1.0, 4.01 / 2.0])
    torch.testing.assert_close(gamma, raw / raw.mean())
    torch.testing.assert_close(weighted, 0.5 * (kl * gamma).sum(dim=1))
    assert gamma.mean().item() == pytest.approx(1.0)
    # once beta reaches 1 the balancing switches off: plain sum
    weighted, gamma = balanced_kl(kl, beta=1.0, alpha=alpha)
    torch.testing.assert_close(weighted, kl.sum(dim=1))
    assert torch.equal(gamma, torch.ones(2))


def test_balancing_coefficients_carry_no_gradient() -> None:
    kl = torch.tensor([[1.0, 3.0]], requires_grad=True)
    weighted, gamma = balanced_kl(kl, beta=0.5, alpha=torch.ones(2))
    weighted.sum().backward()
    torch.testing.assert_close(kl.grad, 0.5 * gamma.unsqueeze(0))


def test_regularization_coeff_geometric_anneal() -> None:
    assert regularization_coeff(0.3, 1e-2) == 1e-2
    assert regularization_coeff(0.0, 1e-2, 1.0) == pytest.approx(1.0)
    assert regularization_coeff(1.0, 1e-2, 1.0) == pytest.approx(1e-2)
    assert regularization_coeff(0.5, 1e-2, 1.0) == pytest.approx(1e-1)


def test_bits_per_dim_and_nelbo() -> None:
    assert bits_per_dim(torch.tensor(3072 * math.log(2.0)), 3072).item() == pytest.approx(1.0)
    terms = nelbo(torch.tensor([-10.0, -20.0]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 1.0, torch.ones(2))
    torch.testing.assert_close(terms.nelbo, torch.tensor([13.0, 27.0]))
    assert terms.loss.item() == pytest.approx(20.0)
