"""Importance-weighted log-likelihood of NVAE (paper sec. 5; Burda et al. 2016).

log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x),
a lower bound that tightens as K grows. K = 1000 in the paper. The K samples of an image are
drawn in chunks so that at most ``max_rows`` images go through the network at once.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm

from nvae.model import NVAE
from nvae.objectives import bits_per_dim


@torch.no_grad()
def importance_weighted(model: NVAE, x: torch.Tensor, num_samples: int, max_rows: int = 500
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x) IW estimate, ELBO) per image, both (B,) in nats, from ``num_samples`` posterior samples.

    The ELBO is averaged over the same K samples (log p(x|z) - KL, analytic KL without flows).
    """
    b = x.shape[0]
    chunk = max(1, min(num_samples, max_rows // b))
    log_w, elbo = [], []
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        xr = x.repeat(k, 1, 1, 1)  # (k * B, C, H, W), sample-major
        out = model(xr)
        log_px = model.log_likelihood(out.likelihood, xr).float()
        log_w.append((log_px + out.log_p.float() - out.log_q.float()).view(k, b))
        elbo.append((log_px - out.kl.float().sum(dim=1)).view(k, b))
    log_w_all = torch.cat(log_w)  # (K, B)
    return torch.logsumexp(log_w_all, dim=0) - math.log(num_samples), torch.cat(elbo).mean(dim=0)


@dataclass
class NLLResult:
    """Averages over the evaluated images (nats per image; bits per modelled dimension)."""

    nll_nats: float
    bpd: float
    nelbo_nats: float
    nelbo_bpd: float
    num_images: int
    K: int

    def as_dict(self) -> dict[str, float | int]:
        d = asdict(self)
        d["elbo_nats"] = -self.nelbo_nats
        return d


@torch.no_grad()
def evaluate_nll(model: NVAE, batches: Iterable[torch.Tensor], num_samples: int, num_images: Optional[int] = None,
                 max_rows: int = 500, device: torch.device | str = "cpu", progress: bool = True) -> NLLResult:
    """IW NLL and negative ELBO over ``batches`` of images (each (B, C, H, W) in [0, 1])."""
    model.eval()
    nll_sum, nelbo_sum, count = 0.0, 0.0, 0
    bar = tqdm(total=num_images, desc=f"IW NLL, K={num_samples}", unit="img", disable=not progress)
    for x in batches:
        x = x[0] if isinstance(x, (list, tuple)) else x
        if num_images is not None:
            x = x[: num_images - count]
        if x.shape[0] == 0:
            break
        x = x.to(device)
        log_px, elbo = importance_weighted(model, x, num_samples, max_rows)
        nll_sum += -log_px.sum().item()
        nelbo_sum += -elbo.sum().item()
        count += x.shape[0]
        bar.update(x.shape[0])
        bar.set_postfix(nll=nll_sum / count)
        if num_images is not None and count >= num_images:
            break
    bar.close()
    if count == 0:
        raise ValueError("no images to evaluate (empty split or --num-images 0)")
    dims = model.spec.num_dims
    nll, nelbo = nll_sum / count, nelbo_sum / count
    return NLLResult(nll, float(bits_per_dim(torch.tensor(nll), dims)), nelbo,
                     float(bits_per_dim(torch.tensor(nelbo), dims)), count, num_samples)
