"""Distributions of NVAE (paper sec. 3.2 and appendix): latent Normals and image likelihoods.

- :class:`Normal`: diagonal Gaussian with soft-clamped mean / log-sigma and a sigma floor; the
  residual posterior (sec. 3.2, eq. 2) is built by adding the posterior's deltas to the prior's
  raw parameters before clamping.
- :class:`Bernoulli`: binary images.
- :class:`DiscMixLogistic`: discretized mixture of logistics with channel-autoregressive means
  (PixelCNN++, Salimans et al. 2017), for ``num_bits``-bit gray or RGB images.

Images are handled in [0, 1] on the grid k / (2^bits - 1); the networks see [-1, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nvae.names import DMOL_BINS  # see DiscMixLogistic

SIGMA_FLOOR = 1e-2
DMOL_LOG_SCALE_MIN = -7.0
# The official code's bins: edge thresholds in [-1, 1] and the mass below which a bin uses the density.
OFFICIAL_TOP_EDGE, OFFICIAL_BOTTOM_EDGE, OFFICIAL_MIN_MASS = 0.99, -0.999, 1e-5


def soft_clamp(x: torch.Tensor, bound: float = 5.0) -> torch.Tensor:
    """bound * tanh(x / bound): a differentiable clamp to (-bound, bound)."""
    return bound * torch.tanh(x / bound)


class Normal:
    """Diagonal Normal N(mu, sigma^2) with mu = 5 tanh(mu_raw / 5), sigma = exp(5 tanh(ls / 5)) + 0.01."""

    def __init__(self, mu: torch.Tensor, log_sigma: torch.Tensor, clamp: bool = True) -> None:
        self.mu = soft_clamp(mu) if clamp else mu
        self.sigma = torch.exp(soft_clamp(log_sigma)) + SIGMA_FLOOR if clamp else torch.exp(log_sigma)

    @classmethod
    def top_prior(cls, like: torch.Tensor) -> "Normal":
        """The top group's fixed prior, with the shape, dtype and device of ``like``.

        The paper's N(0, I) as the official code builds it: mean 0 and log-sigma 0 through the
        clamp and the sigma floor, so sigma = 1.01 (released checkpoints were trained with it).
        """
        zeros = torch.zeros_like(like)
        return cls(zeros, zeros)

    @classmethod
    def from_params(cls, params: torch.Tensor) -> "Normal":
        """Split a (B, 2L, H, W) head output into mean and log-sigma along channels."""
        mu, log_sigma = params.chunk(2, dim=1)
        return cls(mu, log_sigma)

    @classmethod
    def residual(cls, prior_params: torch.Tensor, delta_params: torch.Tensor) -> "Normal":
        """Residual posterior q = N(mu_p + dmu, sigma_p * dsigma) (sec. 3.2), added before clamping."""
        return cls.from_params(prior_params + delta_params)

    def sample(self, temperature: float = 1.0) -> torch.Tensor:
        """Reparameterized sample; ``temperature`` scales sigma (0 gives the mean)."""
        return self.mu + temperature * self.sigma * torch.randn_like(self.mu)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Element-wise log density."""
        normalized = (z - self.mu) / self.sigma
        return -0.5 * normalized.square() - torch.log(self.sigma) - 0.5 * math.log(2 * math.pi)

    def kl(self, other: "Normal") -> torch.Tensor:
        """Element-wise analytic KL(self || other)."""
        ratio = self.sigma / other.sigma
        shift = (self.mu - other.mu) / other.sigma
        return 0.5 * (shift.square() + ratio.square()) - 0.5 - torch.log(ratio)


class Bernoulli:
    """Independent Bernoulli pixels with the given logits (B, C, H, W)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel log p(x), x in {0, 1}; shape (B, C, H, W)."""
        return -F.binary_cross_entropy_with_logits(self.logits, x, reduction="none")

    def mean(self, quantize: bool = False) -> torch.Tensor:
        """The pixel probabilities; ``quantize`` rounds them to {0, 1}."""
        p = torch.sigmoid(self.logits)
        return p.round() if quantize else p

    def sample(self) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(self.logits))


def dmol_channels(image_channels: int, num_mixtures: int) -> int:
    """Output channels of the network head: logits, means, log-scales and AR coefficients."""
    num_coeffs = image_channels * (image_channels - 1) // 2
    return num_mixtures * (1 + 2 * image_channels + num_coeffs)


class DiscMixLogistic:
    """Discretized mixture of logistics over ``num_bits``-bit images with C channels.

    Layout of ``params`` (B, M * (1 + 2C + C(C-1)/2), H, W): mixture logits (shared across channels),
    means (C x M), log-scales (C x M, floored at -7) and tanh coefficients (one per channel pair
    j < c) that make channel c's mean depend linearly on channels j < c. The bins have half-width
    1 / (2^bits - 1) in [-1, 1] space; the edge bins extend to -inf / +inf.

    ``bins``: "exact" makes only the lowest and highest levels edge bins and computes every bin's
    mass as a stable log-difference of sigmoids; "official" reproduces the official code: values
    above 0.99 (in [-1, 1]) take the top edge bin (8-bit level 254 too), values below -0.999 the
    bottom one, and a bin of mass under 1e-5 is given the density times the bin width.
    """

    def __init__(self, params: torch.Tensor, image_channels: int, num_bits: int, num_mixtures: int = 10,
                 bins: str = "exact") -> None:
        if bins not in DMOL_BINS:
            raise ValueError(f"bins must be one of {', '.join(DMOL_BINS)}, got {bins!r}")
        b, _, h, w = params.shape
        c, m = image_channels, num_mixtures
        self.channels, self.num_mixtures, self.bins = c, m, bins
        self.max_val = 2.0 ** num_bits - 1
        self.logit_probs = params[:, :m]  # (B, M, H, W)
        rest = params[:, m:].reshape(b, -1, m, h, w)  # (B, 2C + C(C-1)/2, M, H, W)
        self.means = rest[:, :c]  # (B, C, M, H, W)
        self.log_scales = rest[:, c:2 * c].clamp(min=DMOL_LOG_SCALE_MIN)  # (B, C, M, H, W)
        self.coeffs = torch.tanh(rest[:, 2 * c:])  # (B, C(C-1)/2, M, H, W)

    def _conditional_means(self, x: torch.Tensor) -> torch.Tensor:
        """Means of every channel given the preceding channels' values x (B, C, 1|M, H, W) in [-1, 1]."""
        means, k = [], 0
        for c in range(self.channels):
            mean_c = self.means[:, c]
            for j in range(c):
                mean_c = mean_c + self.coeffs[:, k] * x[:, j]
                k += 1
            means.append(mean_c)
        return torch.stack(means, dim=1)  # (B, C, M, H, W)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per pixel (channels joint), x (B, C, H, W) in [0, 1] on the grid; shape (B, H, W)."""
        x = (2.0 * x - 1.0).unsqueeze(2)  # (B, C, 1, H, W) in [-1, 1]
        centered = x - self._conditional_means(x)
        inv_scale = torch.exp(-self.log_scales)
        upper = inv_scale * (centered + 1.0 / self.max_val)
        lower = inv_scale * (centered - 1.0 / self.max_val)
        if self.bins == "official":
            log_bin = self._official_bins(x, centered, inv_scale, upper, lower)
        else:
            # log(sigmoid(upper) - sigmoid(lower)) = logsig(upper) + logsig(-lower) + log(1 - e^(lower-upper)), exact
            log_mid = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(lower - upper))
            level = torch.round((x + 1.0) * 0.5 * self.max_val)
            log_bin = torch.where(level <= 0, F.logsigmoid(upper),
                                  torch.where(level >= self.max_val, F.logsigmoid(-lower), log_mid))
        log_mix = log_bin.sum(dim=1) + F.log_softmax(self.logit_probs, dim=1)  # (B, M, H, W)
        return torch.logsumexp(log_mix, dim=1)

    def _official_bins(self, x: torch.Tensor, centered: torch.Tensor, inv_scale: torch.Tensor,
                       upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        """log P(bin) per channel and mixture as the official code computes it (see the class docstring)."""
        mass = torch.sigmoid(upper) - torch.sigmoid(lower)
        mid = inv_scale * centered
        log_density = mid - self.log_scales - 2.0 * F.softplus(mid)  # log of the logistic density at x
        log_mid = torch.where(mass > OFFICIAL_MIN_MASS, torch.log(mass.clamp(min=1e-10)),
                              log_density - math.log(self.max_val / 2))
        return torch.where(x < OFFICIAL_BOTTOM_EDGE, upper - F.softplus(upper),
                           torch.where(x > OFFICIAL_TOP_EDGE, -F.softplus(lower), log_mid))

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> the nearest grid value in [0, 1]."""
        return torch.round((x.clamp(-1.0, 1.0) + 1.0) * 0.5 * self.max_val) / self.max_val

    @torch.no_grad()
    def sample(self) -> torch.Tensor:
        """One sample per pixel, (B, C, H, W) in [0, 1] on the grid: from this distribution exactly.

        Each channel is drawn given the levels of the channels before it, as :meth:`log_prob` conditions
        (the official code conditions on the unrounded draws instead, which is not this distribution:
        a chi-square test on 2-bit pixels rejects it at p < 1e-70 with 200,000 draws).
        """
        gumbel = -torch.log(-torch.log(torch.rand_like(self.logit_probs).clamp(1e-10, 1.0 - 1e-10)))
        pick = F.one_hot((self.logit_probs + gumbel).argmax(dim=1), self.num_mixtures)  # (B, H, W, M)
        pick = pick.permute(0, 3, 1, 2).unsqueeze(1).to(self.means.dtype)  # (B, 1, M, H, W)
        u = torch.rand_like(self.means[:, :, 0]).clamp(1e-5, 1.0 - 1e-5)  # (B, C, H, W)
        noise = torch.log(u) - torch.log1p(-u)
        scales = (torch.exp(self.log_scales) * pick).sum(dim=2)  # (B, C, H, W)
        x = torch.zeros_like(u)  # in [-1, 1], on the grid
        for c in range(self.channels):  # channel-autoregressive, on the values already drawn (their levels)
            mean_c = (self._conditional_means(x.unsqueeze(2))[:, c] * pick[:, 0]).sum(dim=1)
            x[:, c] = 2.0 * self._quantize(mean_c + scales[:, c] * noise[:, c]) - 1.0
        return (x + 1.0) * 0.5

    @torch.no_grad()
    def mean(self, quantize: bool = True) -> torch.Tensor:
        """Mixture-weighted location, each channel conditioned on the previous channels' means, in
        [0, 1]: on the bit grid, or as it is with ``quantize=False`` (the official code's mean)."""
        weights = torch.softmax(self.logit_probs, dim=1)  # (B, M, H, W)
        x = torch.zeros_like(self.means[:, :, 0])  # (B, C, H, W)
        for c in range(self.channels):
            x[:, c] = (self._conditional_means(x.unsqueeze(2))[:, c] * weights).sum(dim=1).clamp(-1.0, 1.0)
        return self._quantize(x) if quantize else (x + 1.0) * 0.5
