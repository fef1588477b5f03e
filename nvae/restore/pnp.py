"""PnP-HVAE with an NVAE prior (Prost, Houdard, Almansa, Papadakis, ICCV 2023, arXiv 2303.11217, alg. 1).

Observation y = A x + n, n ~ N(0, σ² I). The method minimizes
C_β(x, z) = -log p(y | x) - β log p(x | z) - log p_T(z) by alternating, from an initial image x_0:

1. **Latent step** (no back-propagation): one encoder pass on x_k, then one top-down pass in which
   every group l, top first, takes z_l from the Gaussian ∝ q^β p^(1/T_l² - β) (q the group's residual
   posterior, p its prior given the groups above; :mod:`nvae.restore.latent_step`): its mean (MAP
   mode) or a draw (sampling mode). With normalizing flows the product is taken on the pre-flow
   posterior and the result pushed through the flows: an approximation (the prior lives after them).
2. **Decoder mean** μ_k = E[x | z] (DMoL: channel by channel, unrounded).
3. **Data step** x_{k+1} = argmin ||A x - y||²/(2σ²) + β ||x - μ_k||²/(2σ_dec²)
   (:meth:`nvae.restore.operators.Operator.solve` with weight β σ² / σ_dec²).
4. Stop after ``iterations`` or once the relative change ||x_{k+1} - x_k|| / ||x_k|| has stayed below
   ``tol`` for ``patience`` steps, image by image (a stopped image is frozen, so an image's result does
   not depend on the others in its batch). Returns μ(z_K), the paper's output, and x_K.

Images are (B, C, H, W) in [0, 1] at the size the user sees; the model's padding (``spec.pad``, zeros as
in training) is added for the network and removed from its output. The model must be in eval mode
(BatchNorm with its running statistics).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nvae.groups import GroupView
from nvae.model import NVAE
from nvae.restore.latent_step import gaussian_product, temperatures
from nvae.restore.operators import Operator

Noise = Callable[[tuple[int, ...]], Tensor]


@dataclass(frozen=True)
class PnPSettings:
    """The method's parameters (the paper's names)."""

    sigma: float
    """σ: the standard deviation of the observation noise, on the [0, 1] image scale."""
    sigma_dec: float = 0.05
    """σ_dec: the decoder's constant standard deviation (the paper uses 3/255 to 5/255 for faces)."""
    beta: float = 1.0
    """β: the weight of log p(x | z) (and of the posterior in the latent step)."""
    temperature: tuple[float, float] = (1.0, 1.0)
    """(T of the top group, T of the last group), linear in between."""
    iterations: int = 50
    tol: float = 1e-4
    patience: int = 3
    sample: bool = False
    """Sampling mode: each latent is a draw from the product instead of its mean."""

    def __post_init__(self) -> None:
        for name in ("sigma", "sigma_dec", "beta"):
            value = getattr(self, name)
            if not (value > 0 and value < float("inf")):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not all(t > 0 for t in self.temperature):
            raise ValueError(f"temperatures must be > 0, got {self.temperature}")
        if self.iterations < 1 or self.patience < 1 or not self.tol >= 0:
            raise ValueError(f"iterations and patience must be >= 1 and tol >= 0, got {self.iterations}, "
                             f"{self.patience}, {self.tol}")

    @property
    def data_weight(self) -> float:
        """The data step's weight β σ² / σ_dec²."""
        return self.beta * self.sigma ** 2 / self.sigma_dec ** 2


@dataclass
class Restoration:
    """What a restoration returns, all at the images' size."""

    mean: Tensor
    """(B, C, H, W) μ(z_K): the decoder mean of the last latents (the paper's output)."""
    x: Tensor
    """(B, C, H, W) x_K: the last data step's image."""
    iterations: Tensor
    """(B,) iterations each image ran."""


def to_model(x: Tensor, model: NVAE) -> Tensor:
    """Images at the user's size -> the model's frame (zero padding, as in training; clamped to [0, 1])."""
    pad = model.spec.pad
    x = x.clamp(0.0, 1.0)
    return F.pad(x, [pad] * 4) if pad else x


def from_model(x: Tensor, model: NVAE) -> Tensor:
    """The model's frame -> the user's size (padding removed)."""
    pad = model.spec.pad
    return x[..., pad:-pad, pad:-pad] if pad else x


def per_image_noise(generators: Sequence[torch.Generator], device: torch.device) -> Noise:
    """Standard normal noise (B, ...) drawn image by image, each from its own generator (CPU), so an
    image's draws do not depend on which other images share its batch."""
    def draw(shape: tuple[int, ...]) -> Tensor:
        return torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device)

    return draw


def latent_pass(model: NVAE, x: Tensor, beta: float, temps: Sequence[float], noise: Optional[Noise] = None) -> Tensor:
    """Steps 1-2: the latent step on images x (B, C, H, W), then the decoder mean at the images' size."""
    def product(view: GroupView) -> Tensor:
        q, p = view.posterior, view.prior
        mean, std = gaussian_product(q.mu, q.sigma, p.mu, p.sigma, beta, temps[view.index])
        z0 = mean if noise is None else mean + std * noise(tuple(mean.shape))
        return view.flows(z0)

    out = model.traverse(x.shape[0], model.encode_features(to_model(x, model)), hook=product)
    return from_model(out.likelihood.mean(quantize=False), model)


@torch.no_grad()
def pnp_restore(model: NVAE, op: Operator, y: Tensor, x0: Tensor, settings: PnPSettings,
                generators: Optional[Sequence[torch.Generator]] = None,
                progress: Optional[Callable[[int], None]] = None) -> Restoration:
    """PnP-HVAE from ``x0`` (B, C, H, W) for observations ``y`` = A x + n; ``generators`` (one per image)
    for sampling mode; ``progress(k)`` after each iteration."""
    if settings.sample and generators is None:
        raise ValueError("sampling mode needs one generator per image")
    temps = temperatures(model.num_groups, *settings.temperature)
    x, mean = x0.clone(), x0.clone()
    iterations = torch.zeros(x.shape[0], dtype=torch.long)
    calm = torch.zeros(x.shape[0], dtype=torch.long)  # consecutive steps below tol
    active = torch.arange(x.shape[0])
    for k in range(settings.iterations):
        noise = per_image_noise([generators[i] for i in active.tolist()], x.device) if settings.sample else None
        mean[active] = latent_pass(model, x[active], settings.beta, temps, noise)
        x_new = op.solve(y, mean, settings.data_weight)  # the whole batch: frozen images' rows are discarded
        change = (x_new - x)[active].flatten(1).norm(dim=1) / x[active].flatten(1).norm(dim=1).clamp_min(1e-12)
        x[active] = x_new[active]
        iterations[active] += 1
        calm[active] = torch.where(change.cpu() < settings.tol, calm[active] + 1, 0)
        active = active[calm[active] < settings.patience]
        if progress is not None:
            progress(k + 1)
        if active.numel() == 0:
            break
    return Restoration(mean, x, iterations)
