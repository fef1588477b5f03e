"""Distributions against closed forms and torch.distributions."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributions as D

from nvae.distributions import Bernoulli, DiscMixLogistic, Normal, dmol_channels, soft_clamp


def test_normal_log_prob_and_kl_match_torch() -> None:
    torch.manual_seed(0)
    mu, ls = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    p, q = Normal(mu, ls), Normal(torch.randn_like(mu), torch.randn_like(ls))
    ref_p, ref_q = D.Normal(p.mu, p.sigma), D.Normal(q.mu, q.sigma)
    z = torch.randn_like(mu)
    torch.testing.assert_close(p.log_prob(z), ref_p.log_prob(z))
    torch.testing.assert_close(p.kl(q), D.kl_divergence(ref_p, ref_q))
    assert (p.kl(q) >= 0).all()
    assert p.kl(p).abs().max() < 1e-6


def test_normal_soft_clamp_floor_and_temperature() -> None:
    big = torch.full((1000,), 50.0)
    n = Normal(big, -big)
    assert n.mu.max() <= 5.0 and n.sigma.min() >= 1e-2 + 6e-3  # exp(-5) + floor
    torch.testing.assert_close(soft_clamp(torch.tensor([0.1])), torch.tensor([0.1]), atol=1e-4, rtol=0)
    torch.manual_seed(0)
    unit = Normal(torch.zeros(200_000), torch.zeros(200_000))
    assert torch.equal(unit.sample(0.0), unit.mu)
    std = unit.sample(0.5).std().item()
    assert abs(std - 0.5 * (1.0 + 1e-2)) < 0.01


def test_residual_posterior_adds_raw_parameters() -> None:
    prior = torch.randn(2, 4, 3, 3)
    delta = torch.randn(2, 4, 3, 3)
    q = Normal.residual(prior, delta)
    ref = Normal(*(prior + delta).chunk(2, dim=1))
    torch.testing.assert_close(q.mu, ref.mu)
    zero = Normal.residual(prior, torch.zeros_like(delta))
    torch.testing.assert_close(zero.sigma, Normal.from_params(prior).sigma)


def test_bernoulli_matches_torch() -> None:
    logits = torch.randn(2, 1, 5, 5)
    x = torch.bernoulli(torch.full_like(logits, 0.3))
    torch.testing.assert_close(Bernoulli(logits).log_prob(x), D.Bernoulli(logits=logits).log_prob(x))


@pytest.mark.parametrize("channels,bits", [(1, 5), (3, 2)])
def test_dmol_bins_sum_to_one(channels: int, bits: int) -> None:
    """Summing p(x) over every one of the 2^(bits*C) values of a pixel gives 1."""
    torch.manual_seed(0)
    m = 4
    params = 2.0 * torch.randn(1, dmol_channels(channels, m), 2, 2)
    dist = DiscMixLogistic(params, channels, bits, m)
    levels = torch.arange(2 ** bits).float() / (2 ** bits - 1)
    values = torch.tensor(list(itertools.product(levels.tolist(), repeat=channels)))  # (V, C)
    x = values[:, :, None, None].expand(-1, -1, 2, 2)  # (V, C, 2, 2)
    expanded = DiscMixLogistic(params.expand(len(values), -1, -1, -1), channels, bits, m)
    total = expanded.log_prob(x).exp().sum(dim=0)  # (2, 2)
    torch.testing.assert_close(total, torch.ones(2, 2), atol=1e-4, rtol=0)
    assert dist.log_prob(x[:1]).shape == (1, 2, 2)


def test_dmol_single_component_gray_matches_logistic_cdf() -> None:
    """One component, one channel: p(bin) = sigmoid((x+h-mu)/s) - sigmoid((x-h-mu)/s)."""
    mu, log_s = 0.1, -1.0
    params = torch.tensor([0.0, mu, log_s]).view(1, 3, 1, 1)
    dist = DiscMixLogistic(params, 1, 3, 1)
    x = torch.tensor(3 / 7).view(1, 1, 1, 1)
    h, s, xs = 1 / 7, torch.exp(torch.tensor(log_s)), 2 * 3 / 7 - 1
    expected = torch.sigmoid((xs + h - mu) / s) - torch.sigmoid((xs - h - mu) / s)
    torch.testing.assert_close(dist.log_prob(x).exp().squeeze(), expected)


def test_dmol_sample_and_mean_on_grid() -> None:
    torch.manual_seed(0)
    dist = DiscMixLogistic(torch.randn(3, dmol_channels(3, 5), 4, 4), 3, 5, 5)
    for img in (dist.sample(), dist.mean()):
        assert img.shape == (3, 3, 4, 4) and img.min() >= 0 and img.max() <= 1
        torch.testing.assert_close(img * 31, torch.round(img * 31))
