"""The seam between the decoder and the data: p(x | z) as a named family (paper sec. 3, "the
likelihood"; sec. 4 uses a Bernoulli for binary images and a discretized mixture of logistics for
the rest).

A family says how many channels the decoder's head outputs and turns that output into a
distribution with ``log_prob``, ``mean`` and ``sample``. ``model.arch.likelihood`` names one from
:data:`LIKELIHOODS`; ``auto`` keeps the paper's choice (Bernoulli for 1-bit data, the mixture
otherwise). Adding a likelihood is a class with the :class:`LikelihoodFamily` methods and one line
in :data:`LIKELIHOODS`; nothing else tests likelihood names.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Protocol

import torch

from nvae.distributions import Bernoulli, DiscMixLogistic, dmol_channels
from nvae.spec import ImageSpec

if TYPE_CHECKING:  # arch.py validates the name against this module
    from nvae.arch import NVAEConfig

AUTO = "auto"


class Likelihood(Protocol):
    """p(x | z) for a batch of images x (B, C, H, W) in [0, 1]."""

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per value: (B, C, H, W), or (B, H, W) when the channels of a pixel are joint."""
        ...

    def mean(self, quantize: bool = ...) -> torch.Tensor:
        """The distribution's mean image in [0, 1]; ``quantize`` rounds it to the data's grid."""
        ...

    def sample(self) -> torch.Tensor:
        """One image per batch entry, (B, C, H, W) in [0, 1]."""
        ...


class LikelihoodFamily(Protocol):
    """How the decoder parameterizes a likelihood."""

    def head_channels(self, spec: ImageSpec, cfg: "NVAEConfig") -> int:
        """Output channels of the decoder's last convolution."""
        ...

    def build(self, params: torch.Tensor, spec: ImageSpec, cfg: "NVAEConfig") -> Likelihood:
        """The distribution of the head's output ``params`` (B, head_channels, H, W), in float32."""
        ...

    def describe(self, cfg: "NVAEConfig") -> str:
        """One phrase for logs and model cards, with the settings that change its numbers."""
        ...


class BernoulliFamily:
    """Independent Bernoulli pixels, one logit per value (binary images)."""

    def head_channels(self, spec: ImageSpec, cfg: "NVAEConfig") -> int:
        return spec.channels

    def build(self, params: torch.Tensor, spec: ImageSpec, cfg: "NVAEConfig") -> Likelihood:
        return Bernoulli(params)

    def describe(self, cfg: "NVAEConfig") -> str:
        return "bernoulli"


class MixtureOfLogisticsFamily:
    """The discretized mixture of logistics (``num_mixtures`` components, ``dmol_bins`` bins)."""

    def head_channels(self, spec: ImageSpec, cfg: "NVAEConfig") -> int:
        return dmol_channels(spec.channels, cfg.num_mixtures)

    def build(self, params: torch.Tensor, spec: ImageSpec, cfg: "NVAEConfig") -> Likelihood:
        return DiscMixLogistic(params, spec.channels, spec.num_bits, cfg.num_mixtures, cfg.dmol_bins)

    def describe(self, cfg: "NVAEConfig") -> str:
        return f"dmol ({cfg.num_mixtures} logistics, {cfg.dmol_bins} bins)"


LIKELIHOODS: Mapping[str, LikelihoodFamily] = {
    "bernoulli": BernoulliFamily(),
    "dmol": MixtureOfLogisticsFamily(),
}
"""Every likelihood ``model.arch.likelihood`` may name."""


def likelihood_name(requested: str, num_bits: int) -> str:
    """The family a model uses: ``requested``, or for ``auto`` the paper's (Bernoulli for 1-bit data)."""
    if requested != AUTO:
        return requested
    return "bernoulli" if num_bits == 1 else "dmol"


def likelihood_family(spec: ImageSpec, cfg: "NVAEConfig") -> LikelihoodFamily:
    """The family of :data:`LIKELIHOODS` that ``cfg.likelihood`` names for images of ``spec``."""
    return LIKELIHOODS[likelihood_name(cfg.likelihood, spec.num_bits)]


def check_name(name: object) -> None:
    """ValueError naming the field unless ``name`` is ``auto`` or a key of :data:`LIKELIHOODS`."""
    if name != AUTO and (not isinstance(name, str) or name not in LIKELIHOODS):
        raise ValueError(f"model.arch.likelihood must be {AUTO} or one of {', '.join(LIKELIHOODS)}, got {name!r}")


__all__ = ["AUTO", "LIKELIHOODS", "BernoulliFamily", "Likelihood", "LikelihoodFamily", "MixtureOfLogisticsFamily",
           "check_name", "likelihood_family", "likelihood_name"]
