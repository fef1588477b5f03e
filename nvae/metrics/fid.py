"""Frechet Inception Distance (FID) for NVAE samples (paper sec. 5, Table 3: FID with 50k samples).

FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017) fits a Gaussian to Inception-v3 pool features (2048-D) of two image
sets and reports the Frechet distance between the Gaussians:

    FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}).

Pieces, top to bottom: the maths (:func:`frechet_distance`), running feature statistics
(:class:`FeatureStats`, saved as ``.npz``), the feature extractor (:func:`inception_extractor`,
in :mod:`nvae.metrics.inception`), the pipeline (:func:`compute_stats`, cached :func:`reference_stats`);
images and arrays from disk are :mod:`nvae.metrics.images` (:func:`load_images`). Any ``nn.Module``
mapping uint8 (N, C, H, W) to (N, D) can stand in for Inception (tests use a small random conv net).
Nothing here downloads by default.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from nvae.metrics.inception import (INCEPTION_FEATURES, INCEPTION_WEIGHT_FILES, InceptionFeatures,  # noqa: F401
                                    extractor_id, inception_extractor)
from nvae.metrics.images import (IMAGE_SUFFIXES, PNG_END, NpyHeader, check_memory, load_images,  # noqa: F401
                                 npz_arrays, npz_headers, read_member)

log = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, Tensor]
MAX_FEATURES = 16384  # features of statistics read from a file: 8x Inception-v3's 2048 pool features (the
#                       largest common extractors have fewer); sigma is then at most 2 GiB in float64


# ---------------------------------------------------------------------------------------- maths
def _as_float64(x: ArrayLike) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().to("cpu", torch.float64)


def _sqrt_psd(s: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix by eigh; round-off negative eigenvalues -> 0."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017), float64.

    ``Tr((S1 S2)^{1/2})`` is computed as ``sum sqrt(eig(S1^{1/2} S2 S1^{1/2}))``: the matrix is
    symmetric PSD and similar to ``S1 S2``, so two symmetric eigendecompositions replace
    scipy's ``sqrtm`` (faster, no complex round-off); negative round-off eigenvalues are clipped.
    Accepts numpy arrays or tensors: mu (D,), sigma (D, D). Runs on the CPU (torch.linalg).
    """
    m1, m2, s1, s2 = (_as_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {tuple(m1.shape)} {tuple(m2.shape)}, "
                         f"sigma {tuple(s1.shape)} {tuple(s2.shape)}")
    if not all(torch.isfinite(a).all() for a in (m1, m2, s1, s2)):
        raise ValueError("non-finite values in the feature statistics")
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1  # (D, D), symmetric PSD up to round-off
    eig = torch.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = eig.clamp(min=0).sqrt().sum()
    diff = m1 - m2
    return float(diff @ diff + s1.trace() + s2.trace() - 2.0 * tr_covmean)


# --------------------------------------------------------------------------- running statistics
class FeatureStats:
    """Running mean and unbiased covariance of feature vectors, accumulated in float64.

    Sums are taken around a shift (the first batch's mean) so the covariance does not lose
    precision when the mean is large compared with the spread. ``key`` names what the statistics
    describe (data set, split, number of images, extractor); it is saved with them.
    """

    def __init__(self, key: str = "") -> None:
        self.key = key
        self.count_known = True  # False: read from a file of mu and sigma only (count stands in, as 2)
        self._count = 0
        self._shift: Optional[Tensor] = None  # (D,)
        self._sum: Optional[Tensor] = None  # (D,)  sum of (x - shift)
        self._outer: Optional[Tensor] = None  # (D, D)  sum of (x - shift)(x - shift)^T

    def update(self, features: ArrayLike) -> None:
        """Add a batch of features (N, D)."""
        x = torch.as_tensor(features).detach()
        if not self.count_known:
            raise ValueError("statistics read without their image count cannot be updated")
        if x.dim() != 2:
            raise ValueError(f"features must be (N, D), got {tuple(x.shape)}")
        if x.device.type == "mps":  # no float64 there
            x = x.cpu()
        x = x.to(torch.float64)
        if self._shift is None:
            empty = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self._shift = x.mean(0) if x.shape[0] else empty
            self._sum = torch.zeros_like(self._shift)
            self._outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"expected {self._shift.shape[0]} features, got {x.shape[1]}")
        x = x.to(self._shift.device) - self._shift  # (N, D)
        self._sum += x.sum(0)
        self._outer += x.T @ x
        self._count += x.shape[0]

    @property
    def count(self) -> int:
        """Number of feature vectors seen."""
        return self._count

    @property
    def num_features(self) -> int:
        """Feature dimension D (0 before the first update)."""
        return 0 if self._shift is None else int(self._shift.shape[0])

    @property
    def mean(self) -> Tensor:
        """Mean (D,), float64 on the CPU."""
        if self._count < 1:
            raise ValueError("no features accumulated")
        return (self._shift + self._sum / self._count).cpu()

    @property
    def cov(self) -> Tensor:
        """Unbiased covariance (D, D) (divides by N - 1), float64 on the CPU."""
        if self._count < 2:
            raise ValueError(f"covariance needs at least 2 feature vectors, got {self._count}")
        s = self._sum
        return ((self._outer - torch.outer(s, s) / self._count) / (self._count - 1)).cpu()

    def save(self, path: Union[str, Path]) -> None:
        """Write mu, sigma, count and key to an ``.npz``, atomically (temporary file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, mu=self.mean.numpy(), sigma=self.cov.numpy(), count=np.int64(self._count),
                         key=np.array(self.key))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Union[str, Path]) -> "FeatureStats":
        """Read statistics written by :meth:`save` (further updates continue from them), or the ``mu`` and
        ``sigma`` of pytorch-fid / torch-fidelity (:attr:`count_known` False). The arrays' headers are
        checked before their data is read (:func:`check_stats_headers`); ValueError naming what is wrong."""
        names = npz_arrays(path)
        missing = [k for k in ("mu", "sigma") if k not in names]
        if missing:
            raise ValueError(f"'{path}': FID statistics need arrays mu and sigma; {' and '.join(missing)} missing "
                             f"(the file has: {', '.join(names) or 'nothing'})")
        heads = npz_headers(path, ["mu", "sigma", "count", "key"])
        check_stats_headers(path, heads)
        mu, sigma = (read_member(path, heads[k]).astype(np.float64) for k in ("mu", "sigma"))
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"'{path}': mu or sigma holds non-finite values (NaN or inf)")
        count = int(read_member(path, heads["count"]).reshape(-1)[0]) if "count" in heads else None
        if count is not None and count < 2:
            raise ValueError(f"'{path}': count must be the number of images (at least 2), got {count}")
        key = str(read_member(path, heads["key"]).reshape(-1)[0]) if "key" in heads else ""
        stats = cls(key=key)
        stats.count_known, stats._count = count is not None, 2 if count is None else count
        stats._shift, stats._outer = torch.from_numpy(mu), torch.from_numpy(sigma) * (stats._count - 1)
        stats._sum = torch.zeros_like(stats._shift)
        return stats


def check_stats_headers(path: Union[str, Path], heads: dict[str, NpyHeader]) -> None:
    """What the arrays of a statistics file declare, before their data is read: mu (D,) and sigma (D, D)
    of numbers (float or int), 1 <= D <= :data:`MAX_FEATURES`; count an integer scalar, key a string;
    all of them, with the float64 copies of sigma that loading makes, within the memory available."""
    mu, sigma = heads["mu"], heads["sigma"]
    d = mu.shape[0] if len(mu.shape) == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise ValueError(f"'{path}': FID statistics are mu (D,) and sigma (D, D); the file declares mu {mu.shape} "
                         f"and sigma {sigma.shape} (not read)")
    if d > MAX_FEATURES:
        raise ValueError(f"'{path}': statistics of {d} features; at most {MAX_FEATURES} are read (8x Inception-v3's "
                         f"2048) (not read)")
    for name, head in (("mu", mu), ("sigma", sigma)):
        if head.dtype.kind not in "fiu":
            raise ValueError(f"'{path}': {name} must hold floats or integers, got {head.dtype} (not read)")
    count, key = heads.get("count"), heads.get("key")
    if count is not None and (count.dtype.kind not in "iu" or math.prod(count.shape) != 1):
        raise ValueError(f"'{path}': count must be one integer (the number of images), got {count.describe()} "
                         f"(not read)")
    if key is not None and (key.dtype.kind != "U" or math.prod(key.shape) != 1):
        raise ValueError(f"'{path}': key must be one string, got {key.describe()} (not read)")
    declared = sum(h.nbytes for h in heads.values())
    check_memory(declared + 2 * d * d * 8, f"'{path}': mu {mu.describe()} and sigma {sigma.describe()}")


def merge_stats(parts: list[tuple[int, Tensor, Tensor]], average: bool = False) -> FeatureStats:
    """One :class:`FeatureStats` from per-process (count, mean, covariance): pooled exactly, as if one
    process had seen every feature (Chan et al.'s combination), or with ``average`` the plain means
    of the processes' means and covariances (what the official code's FID does across GPUs)."""
    parts = [(n, m.double().cpu(), c.double().cpu()) for n, m, c in parts if n > 0]
    total = sum(n for n, _, _ in parts)
    if total < 2:
        raise ValueError(f"FID needs at least 2 images, got {total}")
    merged = FeatureStats()
    if average:
        mean = torch.stack([m for _, m, _ in parts]).mean(0)
        outer = torch.stack([c for _, _, c in parts]).mean(0) * (total - 1)
    else:
        mean = sum(n * m for n, m, _ in parts) / total
        outer = sum((n - 1) * c + n * torch.outer(m - mean, m - mean) for n, m, c in parts)
    merged._count, merged._shift = total, mean
    merged._sum, merged._outer = torch.zeros_like(mean), outer
    return merged


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two sets of feature statistics (paper sec. 5; Heusel et al. 2017)."""
    if a.num_features != b.num_features:
        raise ValueError(f"feature dimensions differ: {a.num_features} vs {b.num_features}")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def stats_key(dataset: str, split: str, num_images: Optional[int], extractor: nn.Module) -> str:
    """Cache key for reference statistics: data set (class and arguments), split, count, extractor."""
    return f"dataset={dataset}|split={split}|num_images={num_images or 'all'}|extractor={extractor_id(extractor)}"


# ------------------------------------------------------------------------------------- pipeline
def to_uint8(batch: Union[Tensor, tuple, list]) -> Tensor:
    """A loader batch -> uint8 (B, C, H, W): takes the first element of (x, y) tuples; float
    images in [0, 1] (the data modules' n-bit grid) are mapped to round(255 x)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"expected an image batch (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    if x.dtype == torch.uint8:
        return x
    if x.is_floating_point():
        return (x.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"expected uint8 or float images in [0, 1], got {x.dtype}")


@torch.no_grad()
def compute_stats(images: Iterable[Tensor], extractor: nn.Module, device: Union[str, torch.device] = "cpu",
                  progress: bool = True, max_images: Optional[int] = None) -> FeatureStats:
    """Feature statistics of image batches (uint8 (B, C, H, W), or float in [0, 1]).

    Stops after ``max_images`` (the paper uses 50k samples, sec. 5). The extractor is moved to
    ``device`` and put in eval mode.
    """
    from tqdm.auto import tqdm

    extractor = extractor.to(device).eval()
    stats = FeatureStats()
    with tqdm(total=max_images, unit="img", desc="FID features", disable=not progress) as bar:
        for batch in images:
            x = to_uint8(batch)
            if max_images is not None:
                x = x[: max_images - stats.count]
            if x.shape[0] == 0:
                continue
            features = extractor(x.to(device))
            if isinstance(features, (tuple, list)):
                features = features[0]
            stats.update(features.reshape(x.shape[0], -1))  # (B, D)
            bar.update(x.shape[0])
            if max_images is not None and stats.count >= max_images:
                break
    if stats.count < 2:
        raise ValueError(f"FID needs at least 2 images, got {stats.count}")
    return stats


def reference_stats(loader_or_iterable: Iterable[Tensor], extractor: nn.Module, cache_path: Union[str, Path],
                    key: str, device: Union[str, torch.device] = "cpu",
                    max_images: Optional[int] = None) -> FeatureStats:
    """Data-set statistics, computed once and cached in ``cache_path`` (.npz).

    The cache is reused only if its stored ``key`` equals ``key`` (see :func:`stats_key`);
    otherwise, or if the file is unreadable, the statistics are recomputed and overwritten.
    """
    cache_path = Path(cache_path)
    if cache_path.is_file():
        try:
            cached = FeatureStats.load(cache_path)
        except (OSError, ValueError, KeyError) as err:
            log.warning("ignoring unreadable FID cache %s: %s", cache_path, err)
        else:
            if cached.key == key:
                return cached
            log.info("FID cache %s has key %r, need %r: recomputing", cache_path, cached.key, key)
    stats = compute_stats(loader_or_iterable, extractor, device, max_images=max_images)
    stats.key = key
    stats.save(cache_path)
    return stats
