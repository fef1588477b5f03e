"""The RGB discretized logistic mixture against a brute-force reference written from its definition.

Definition (PixelCNN++, Salimans et al. 2017; NVAE sec. 4): a pixel's channels are decoded in order;
given mixture component m, channel c is logistic with scale s_cm and mean mu_cm + sum_{j<c} a_jcm x_j
(x in [-1, 1]); a level's probability is the logistic mass of its bin [x - 1/(2^b - 1), x + 1/(2^b - 1)],
the lowest and highest bins extended to -inf / +inf; the pixel's probability mixes the components
with softmax weights. The reference enumerates every value of the pixel in float64.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from nvae.distributions import DiscMixLogistic, dmol_channels

M, BITS = 3, 2


def random_pixel(seed: int) -> torch.Tensor:
    """Head output (1, M * 10, 1, 1) of one RGB pixel; scales not too small, so every value has mass."""
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(1, dmol_channels(3, M), 1, 1, generator=g)
    params[:, M + 3 * M:M + 6 * M] = params[:, M + 3 * M:M + 6 * M] * 0.3 - 1.0  # log-scales around -1
    return params


def reference_probs(params: torch.Tensor) -> dict[tuple[int, int, int], float]:
    """p(levels) for every (r, g, b) level triple, from the definition (float64)."""
    p = params.double().flatten()
    logits = p[:M]
    rest = p[M:].view(-1, M)  # rows: means (3), log-scales (3), coefficients (3): nvae's layout
    means, log_scales, coeffs = rest[:3], rest[3:6].clamp(min=-7.0), torch.tanh(rest[6:9])
    weights = torch.softmax(logits, 0)
    top, half = 2 ** BITS - 1, 1.0 / (2 ** BITS - 1)
    probs = {}
    for levels in itertools.product(range(top + 1), repeat=3):
        x = [2.0 * k / top - 1.0 for k in levels]
        total = 0.0
        for m in range(M):
            prob = float(weights[m])
            for c in range(3):
                mean = float(means[c, m])
                mean += sum(float(coeffs[k, m]) * x[j] for k, j in {1: [(0, 0)], 2: [(1, 0), (2, 1)]}.get(c, []))
                s = float(torch.exp(log_scales[c, m]))
                upper = 1.0 if levels[c] == top else float(torch.sigmoid(torch.tensor((x[c] + half - mean) / s)))
                lower = 0.0 if levels[c] == 0 else float(torch.sigmoid(torch.tensor((x[c] - half - mean) / s)))
                prob *= upper - lower
            total += prob
        probs[levels] = total
    return probs


def grid_values() -> torch.Tensor:
    top = 2 ** BITS - 1
    return torch.tensor(list(itertools.product(range(top + 1), repeat=3)), dtype=torch.float32) / top  # (V, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_prob_equals_the_brute_force_reference(seed: int) -> None:
    params = random_pixel(seed)
    ref = reference_probs(params)
    values = grid_values()
    dist = DiscMixLogistic(params.expand(len(values), -1, -1, -1), 3, BITS, M)
    ours = dist.log_prob(values[:, :, None, None]).exp().flatten().double()  # (V,)
    expected = torch.tensor([ref[tuple(round(v * (2 ** BITS - 1)) for v in row.tolist())] for row in values],
                            dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)  # float32 against float64
    assert abs(expected.sum().item() - 1.0) < 1e-12  # the definition is normalized


def test_sample_follows_log_prob_chi_square() -> None:
    """200,000 draws of one pixel against exp(log_prob) over its 64 values: a chi-square test. Drawing each
    channel given the unrounded values of the channels before it (the official sampler) fails it: p < 1e-70."""
    params = random_pixel(3)
    values = grid_values()
    probs = DiscMixLogistic(params.expand(len(values), -1, -1, -1), 3, BITS, M).log_prob(
        values[:, :, None, None]).exp().flatten().double()
    n = 200_000
    torch.manual_seed(0)
    draws = DiscMixLogistic(params.expand(n, -1, -1, -1), 3, BITS, M).sample().view(n, 3)  # (N, 3) on the grid
    top = 2 ** BITS - 1
    index = (draws * top).round().long() @ torch.tensor([(top + 1) ** 2, top + 1, 1])  # (N,) row-major code
    counts = torch.bincount(index, minlength=len(values)).double()
    keep = probs * n >= 5  # chi-square needs expected counts >= 5; the rest pooled into one cell
    observed = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    expected = torch.cat([probs[keep], probs[~keep].sum().view(1)]) * n
    observed, expected = observed[expected > 0], expected[expected > 0]
    expected *= observed.sum() / expected.sum()  # scipy wants equal totals (float32 probabilities sum to 1 +- 1e-6)
    result = chisquare(observed.numpy(), expected.numpy())
    assert result.pvalue > 1e-3  # seeded: a wrong sampler (e.g. means not conditioned on channels) gives p ~ 0
