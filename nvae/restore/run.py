"""Restoring a batch of images with one method, image by image reproducible.

Every random number is drawn from a generator seeded by the image's index (:func:`nvae.sampling.image_seed`),
so an image's observation noise, its sampling-mode draws and therefore its result do not depend on
the batch or the process it falls in: 1 or N processes give the same per-image numbers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from nvae.model import NVAE
from nvae.names import RESTORE_METHODS as METHODS
from nvae.restore.baselines import adam_restore, degraded, encode_decode
from nvae.restore.operators import Operator
from nvae.restore.pnp import PnPSettings, pnp_restore
from nvae.sampling import image_seed

# separate seed streams: observation noise, sampling-mode draws, a data set's random transforms
NOISE_STREAM, SAMPLE_STREAM, DATA_STREAM = 0, 1, 2


@dataclass(frozen=True)
class Method:
    """A restoration method and its settings."""

    name: str = "pnp"
    settings: PnPSettings = PnPSettings(sigma=0.05)
    num_samples: int = 1
    """PnP in sampling mode: this many restorations of each image (1: MAP mode, deterministic)."""
    lr: float = 0.05
    """Adam's learning rate."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method '{self.name}' is not one of {', '.join(METHODS)}")
        if self.num_samples < 1 or (self.num_samples > 1 and self.name != "pnp"):
            raise ValueError("--num-samples above 1 is PnP's sampling mode (--method pnp)")


def stream_seed(seed: int, stream: int, index: int) -> int:
    """The seed of image ``index``'s numbers in ``stream``: distinct for every (seed, stream, index), so the
    observation noise of an image never repeats the draws that made it (dynamic binarization)."""
    return image_seed(seed, index) * 4 + stream  # |seed| < 10^12: fits torch's 64-bit seeds


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, stream, index))


def observe(op: Operator, clean: Tensor, sigma: float, indices: Sequence[int], seed: int) -> Tensor:
    """y = A x + n, n ~ N(0, sigma² I), the noise of image ``indices[b]`` from its own generator."""
    y = op(clean)
    noise = torch.stack([torch.randn(y.shape[1:], generator=_generator(seed, NOISE_STREAM, i), dtype=y.dtype)
                         for i in indices])
    return y + sigma * noise.to(y.device)


def restore(model: NVAE, op: Operator, y: Tensor, indices: Sequence[int], method: Method,
            progress: Optional[Callable[[int], None]] = None) -> tuple[Tensor, Tensor]:
    """(restorations (B, N, C, H, W), iterations (B, N)) of observations y (B, ...) of images ``indices``;
    N = ``method.num_samples``."""
    x0 = degraded(op, y)
    b, n = y.shape[0], method.num_samples
    if method.name in ("degraded", "encode-decode"):
        out = x0 if method.name == "degraded" else encode_decode(model, x0)
        return out.unsqueeze(1), torch.zeros(b, 1, dtype=torch.long)
    if method.name == "adam":
        result = adam_restore(model, op, y, x0, method.settings, method.lr, progress)
        return result.mean.unsqueeze(1), result.iterations.unsqueeze(1)
    if n == 1:
        result = pnp_restore(model, op, y, x0, method.settings, progress=progress)
        return result.mean.unsqueeze(1), result.iterations.unsqueeze(1)
    sampling = dataclasses.replace(method.settings, sample=True)
    generators = [_generator(method.seed, SAMPLE_STREAM, i * n + s) for i in indices for s in range(n)]
    repeat = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731  (B, ...) -> (B * N, ...), image-major
    result = pnp_restore(model, op, repeat(y), repeat(x0), sampling, generators, progress)
    return result.mean.unflatten(0, (b, n)), result.iterations.view(b, n)
