"""Importance-weighted log-likelihood of NVAE (paper sec. 5; Burda et al. 2016), over many processes.

log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x),
a lower bound that tightens as K grows. K = 1000 in the paper. The K samples of an image are
drawn in chunks so that at most ``max_rows`` images go through the network at once.

Process r of W evaluates the images r, r + W, r + 2W, ...; each image draws its noise (posterior
samples and, for binarized data, its binarization) from its own seed
(:func:`nvae.sampling.image_seed`), so an image gets the same numbers whatever the number of
processes. The per-image rows are gathered to every process and checked (:func:`gather_rows`):
each image counted once, none dropped, also when W does not divide N.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from nvae.model import NVAE
from nvae.objectives import bits_per_dim
from nvae.sampling import image_seed


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


@torch.no_grad()
def per_image_nll(model: NVAE, dataset: Any, indices: Sequence[int], num_samples: int, max_rows: int, seed: int,
                  device: torch.device | str, progress: bool = True) -> torch.Tensor:
    """(len(indices), 3) float64 rows: image index, IW log p(x) and ELBO (nats) of each image."""
    model.eval()
    rows = []
    for i in tqdm(indices, desc=f"IW NLL, K={num_samples}", unit="img", disable=not progress):
        torch.manual_seed(image_seed(seed, i))
        x = dataset[i]
        x = x[0] if isinstance(x, (list, tuple)) else x
        log_px, elbo = importance_weighted(model, x.unsqueeze(0).to(device), num_samples, max_rows)
        rows.append(torch.tensor([float(i), log_px.item(), elbo.item()], dtype=torch.float64))
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)


def gather_rows(rows: torch.Tensor, total: int, world_size: int, all_gather: Optional[Any] = None,
                per_item: int = 1) -> torch.Tensor:
    """Every process's rows (index first, then any number of columns), (total, columns) sorted by index;
    ``all_gather`` (e.g. Fabric's) collects equally sized tensors, so each process pads its rows with
    index -1 to the most a process holds: ceil(total / per_item / world_size) items of ``per_item`` rows."""
    if world_size > 1:
        assert all_gather is not None
        size, width = math.ceil(total / per_item / world_size) * per_item, rows.shape[1]
        padded = torch.full((size, width), -1.0, dtype=torch.float64, device=rows.device)
        padded[:rows.shape[0]] = rows
        rows = all_gather(padded).reshape(-1, width).cpu()  # (world_size * size, width)
        rows = rows[rows[:, 0] >= 0]
    rows = rows[rows[:, 0].argsort()]
    if not torch.equal(rows[:, 0], torch.arange(total, dtype=torch.float64)):
        raise RuntimeError(f"gathered {rows.shape[0]} image results for {total} images: some counted twice or lost")
    return rows


@dataclass
class NLLResult:
    """Averages over the evaluated images (nats per image; bits per modelled dimension)."""

    nll_nats: float
    bpd: float
    nelbo_nats: float
    nelbo_bpd: float
    num_images: int
    K: int

    @classmethod
    def from_rows(cls, rows: torch.Tensor, num_dims: int, num_samples: int) -> "NLLResult":
        """The averages of :func:`per_image_nll` rows (index, log p(x), ELBO)."""
        if rows.shape[0] == 0:
            raise ValueError("no images to evaluate (empty split or --num-images 0)")
        nll, nelbo = -rows[:, 1].mean().item(), -rows[:, 2].mean().item()
        return cls(nll, float(bits_per_dim(torch.tensor(nll), num_dims)), nelbo,
                   float(bits_per_dim(torch.tensor(nelbo), num_dims)), int(rows.shape[0]), num_samples)

    def as_dict(self) -> dict[str, float | int]:
        d = asdict(self)
        d["elbo_nats"] = -self.nelbo_nats
        return d
