"""One latent group of NVAE's top-down path (Vahdat & Kautz, NeurIPS 2020, sec. 3.1-3.2) and the
per-group hook of the public traversal :meth:`nvae.model.NVAE.traverse`.

A hook sees each group as a :class:`GroupView` (its index, the prior given the groups above, the
posterior before the flows when encoding, the flows) and returns the latent z to pass down, or None
for the default choice. Encoding, decoding fixed latents, "keep the top k groups" and restoration
(:mod:`nvae.restore`) are hooks on the same traversal, not branches of the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nvae.arch import NVAEConfig
from nvae.cells import DecoderCell, DecoderCombiner, EncoderCombiner, FlowPair
from nvae.distributions import Normal
from nvae.ops import CellStack, Conv2d, once_then_frozen

__all__ = ["GroupHook", "GroupPosterior", "GroupView", "LatentGroup"]


@dataclass
class GroupPosterior:
    """One latent group of an encoded batch (see :meth:`nvae.model.NVAE.encode`)."""

    mean: torch.Tensor
    """(B, L, h, w) posterior mean (before the flows, if any)."""
    std: torch.Tensor
    """(B, L, h, w) posterior standard deviation."""
    z: torch.Tensor
    """(B, L, h, w) the latent passed down: the mean (or a sample) pushed through the flows."""


@dataclass
class GroupView:
    """What a traversal hook sees of one latent group."""

    index: int
    """The group's index, 0 = the top (coarsest) group."""
    prior: Normal
    """p(z_l | z_<l): the prior given the latents chosen above (the top group's is N(0, 1.01²))."""
    posterior: Optional[Normal]
    """q(z0_l | x, z_<l) when encoding (None otherwise): the residual posterior, before the flows."""
    flows: Callable[[torch.Tensor], torch.Tensor]
    """z = flows(z0): the group's volume-preserving flows (the identity when the model has none)."""
    temperature: float
    """The traversal's prior temperature (used by the default choice)."""
    shape: tuple[int, ...]
    """(B, L, h, w) of the latent."""


GroupHook = Callable[[GroupView], Optional[torch.Tensor]]
"""Returns the latent z (after the flows) that group ``view.index`` passes down, or None for the
default: a posterior sample pushed through the flows when encoding, a prior sample at the temperature
otherwise."""


class LatentGroup(nn.Module):
    """One latent group of the top-down path: decoder cells, prior, posterior, flows, combiner.

    ``first`` marks the top group: no decoder cells before it, a fixed prior (mean 0, sigma 1.01:
    :meth:`Normal.top_prior`) and a posterior read straight from the top of the encoder.
    """

    def __init__(self, cfg: NVAEConfig, enc_channels: int, dec_channels: int, first: bool) -> None:
        super().__init__()
        latent = cfg.num_latent_per_group
        cells = 0 if first else cfg.num_cell_per_cond_dec
        self.cells = CellStack(*[DecoderCell(dec_channels, dec_channels, cfg.decoder_expand, use_se=cfg.use_se)
                                 for _ in range(cells)])
        self.prior = None if first else nn.Sequential(nn.ELU(), Conv2d(dec_channels, 2 * latent, 1))
        self.enc_combiner = None if first else EncoderCombiner(enc_channels, dec_channels)
        self.posterior = Conv2d(enc_channels, 2 * latent, 3, padding=1)
        self.flows = nn.Sequential(*[FlowPair(latent) for _ in range(cfg.num_flows)])
        self.dec_combiner = DecoderCombiner(dec_channels, latent)
        self.residual = cfg.residual_posterior
        self.latent_channels = latent
        self.recompute = False  # see forward

    def forward(self, h: torch.Tensor, enc: torch.Tensor | None, temperature: float, z_shape: tuple[int, ...],
                use_mean: bool = False, hook: GroupHook | None = None, index: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (new decoder state, KL map, log q map, log p map), maps of shape (B, L, h, w).

        ``hook`` (see :data:`GroupHook`) picks z; by default, with ``enc`` (the group's encoder
        feature) z comes from the posterior (its mean when ``use_mean``), without it from the prior
        at ``temperature``. log q and KL are zero unless z is the default posterior choice. With
        ``recompute`` set (activation checkpointing; gradients on, no hook), the whole group is
        recomputed in backward and only its inputs are kept; the recomputation draws the same noise
        (the RNG state is restored) and leaves BatchNorm running statistics alone.
        """
        if self.recompute and torch.is_grad_enabled() and hook is None:
            return checkpoint(once_then_frozen(self._forward, self), h, enc, temperature, z_shape, use_mean,
                              use_reentrant=False)
        return self._forward(h, enc, temperature, z_shape, use_mean, hook, index)

    def _forward(self, h: torch.Tensor, enc: torch.Tensor | None, temperature: float, z_shape: tuple[int, ...],
                 use_mean: bool, hook: GroupHook | None = None, index: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.cells(h)
        # distributions in float32 even under autocast: KL and log-densities need the precision
        prior_params = self.prior(h).float() if self.prior is not None else None
        prior = Normal.from_params(prior_params) if prior_params is not None else \
            Normal.top_prior(torch.zeros(z_shape, device=h.device))
        q = None
        if enc is not None:
            if self.enc_combiner is not None:
                enc = self.enc_combiner(enc, h)
            delta = self.posterior(enc).float()
            q = Normal.residual(prior_params, delta) if (self.residual and prior_params is not None) \
                else Normal.from_params(delta)
        z = hook(GroupView(index, prior, q, self.flows, temperature, z_shape)) if hook is not None else None
        if z is not None or q is None:
            if z is None:
                z = prior.sample(temperature)
            elif tuple(z.shape) != tuple(z_shape):
                raise ValueError(f"latent of group {index} has shape {tuple(z.shape)}, expected {tuple(z_shape)}")
            z = z.to(h.device, torch.float32)
            zero = torch.zeros_like(z)
            return self.dec_combiner(h, z), zero, zero, prior.log_prob(z)
        z0 = q.mu if use_mean else q.sample()
        log_q = q.log_prob(z0)
        z = self.flows(z0)  # volume preserving: log q(z) = log q(z0)
        log_p = prior.log_prob(z)
        kl = log_q - log_p if len(self.flows) > 0 else q.kl(prior)
        return self.dec_combiner(h, z), kl, log_q, log_p
