"""The baselines PnP-HVAE is compared with (Prost et al., ICCV 2023, sec. 5), on the same footing.

- :func:`degraded`: the observation as an image: masked pixels filled with the mean of the observed
  ones (per image and channel), super-resolution inputs upsampled bicubically (at the operator's
  sampling positions), blurred and noisy images as they are. It is also every method's x_0.
- :func:`encode_decode`: the model's reconstruction of that image (posterior means, decoder mean).
- :func:`adam_restore`: MAP by gradient descent on the latents through the decoder:
  min_z ||A μ(z) - y||² / (2σ²) - log p_T(z), with Adam, from the posterior means of x_0 (p_T: each
  group's prior given the groups above, its σ scaled by the group's temperature).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from nvae.groups import GroupView
from nvae.model import NVAE
from nvae.distributions import Normal
from nvae.restore.latent_step import temperatures
from nvae.restore.operators import AvgPool, Downsample, Mask, Operator
from nvae.restore.pnp import PnPSettings, Restoration, from_model, latent_pass, to_model


def _upsample_at_samples(y: Tensor, scale: int) -> Tensor:
    """Bicubic interpolation of y (B, C, h, w), whose pixel i was taken at x's pixel scale * i, onto
    x's grid (B, C, scale h, scale w): output pixel j reads y at position j / scale (border-clamped)."""
    b, _, h, w = y.shape
    rows = torch.arange(h * scale, dtype=y.dtype, device=y.device) / scale
    cols = torch.arange(w * scale, dtype=y.dtype, device=y.device) / scale
    # grid_sample's normalized coordinates with align_corners=True: -1 is pixel 0's centre, +1 pixel n-1's
    gy = 2 * rows / max(h - 1, 1) - 1
    gx = 2 * cols / max(w - 1, 1) - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)  # (H, W, 2) as (x, y)
    return F.grid_sample(y, grid.expand(b, -1, -1, -1), mode="bicubic", padding_mode="border", align_corners=True)


def degraded(op: Operator, y: Tensor) -> Tensor:
    """The observation y as an image of the clean images' size (see the module's docstring), in [0, 1]."""
    if isinstance(op, Mask):
        m = op.forward(torch.ones_like(y))  # the mask broadcast to y: 1 observed, 0 missing
        fill = (y * m).sum(dim=(2, 3), keepdim=True) / m.sum(dim=(2, 3), keepdim=True).clamp_min(1)
        x = y * m + fill * (1 - m)
    elif isinstance(op, Downsample):
        x = _upsample_at_samples(y, op.scale)
    elif isinstance(op, AvgPool):
        x = F.interpolate(y, scale_factor=op.scale, mode="bicubic", align_corners=False)  # block centres
    else:
        x = y
    return x.clamp(0.0, 1.0)


@torch.no_grad()
def encode_decode(model: NVAE, x: Tensor) -> Tensor:
    """The decoder mean of the posterior means of x (B, C, H, W), at x's size."""
    return latent_pass(model, x, 1.0, [1.0] * model.num_groups)


def adam_restore(model: NVAE, op: Operator, y: Tensor, x0: Tensor, settings: PnPSettings, lr: float = 0.05,
                 progress: Optional[Callable[[int], None]] = None) -> Restoration:
    """MAP on the latents by Adam (``settings.iterations`` steps, ``settings.sigma`` and temperatures),
    from the posterior means of x0. Each image's loss is its own (summed, so its gradient is too)."""
    temps = temperatures(model.num_groups, *settings.temperature)
    with torch.no_grad():
        latents = [g.z.detach().clone().requires_grad_(True) for g in model.encode(to_model(x0, model))]
    opt = torch.optim.Adam(latents, lr=lr)
    for k in range(settings.iterations):
        log_prior: list[Tensor] = []

        def fixed(view: GroupView) -> Tensor:
            z, p = latents[view.index], view.prior
            tempered = Normal(p.mu, torch.log(temps[view.index] * p.sigma), clamp=False)
            log_prior.append(tempered.log_prob(z).flatten(1).sum(dim=1))
            return z

        with torch.enable_grad():
            out = model.traverse(y.shape[0], None, hook=fixed)
            mu = from_model(out.likelihood.mean(quantize=False), model)
            data = (op(mu) - y).square().flatten(1).sum(dim=1) / (2 * settings.sigma ** 2)
            loss = (data - torch.stack(log_prior).sum(dim=0)).sum()
            grads = torch.autograd.grad(loss, latents)  # the latents' only: no weight gradients are computed
        for z, g in zip(latents, grads):
            z.grad = g
        opt.step()
        if progress is not None:
            progress(k + 1)
    with torch.no_grad():  # the decoder mean of the final latents
        final = model.traverse(y.shape[0], None, hook=lambda view: latents[view.index].detach())
        mean = from_model(final.likelihood.mean(quantize=False), model)
    steps = torch.full((y.shape[0],), settings.iterations, dtype=torch.long)
    return Restoration(mean, mean, steps)
