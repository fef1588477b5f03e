"""Importance-weighted NLL over many processes (GPUs, nodes), gathered exactly (paper sec. 5, K = 1000).

Process r of W evaluates the images r, r + W, r + 2W, ...; each image draws its noise (posterior
samples and, for binarized data, its binarization) from its own seed, :func:`image_seed`, so an image
gets the same numbers whatever the number of processes. The per-image rows are gathered to every
process and checked: each image counted once, none dropped, also when W does not divide N.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from nvae.metrics.likelihood import importance_weighted
from nvae.model import NVAE


def image_seed(seed: int, index: int) -> int:
    """The RNG seed of image ``index`` under the run's ``seed``."""
    return seed * 1_000_003 + index


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


def gather_rows(rows: torch.Tensor, total: int, world_size: int, all_gather: Optional[Any] = None) -> torch.Tensor:
    """Every process's rows, (total, 3) sorted by image index; ``all_gather`` (e.g. Fabric's) collects
    equally sized tensors, so each process pads its rows to ceil(total / world_size) with index -1."""
    if world_size > 1:
        assert all_gather is not None
        size = math.ceil(total / world_size)
        padded = torch.full((size, 3), -1.0, dtype=torch.float64, device=rows.device)
        padded[:rows.shape[0]] = rows
        rows = all_gather(padded).reshape(-1, 3).cpu()  # (world_size * size, 3)
        rows = rows[rows[:, 0] >= 0]
    rows = rows[rows[:, 0].argsort()]
    if not torch.equal(rows[:, 0], torch.arange(total, dtype=torch.float64)):
        raise RuntimeError(f"gathered {rows.shape[0]} image results for {total} images: some counted twice or lost")
    return rows
