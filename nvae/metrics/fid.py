"""Frechet Inception Distance (FID) for NVAE samples (paper sec. 5, Table 3: FID with 50k samples).

FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017) fits a Gaussian to Inception-v3 pool features (2048-D) of two image
sets and reports the Frechet distance between the Gaussians:

    FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}).

Pieces, top to bottom: the maths (:func:`frechet_distance`), running feature statistics
(:class:`FeatureStats`, saved as ``.npz``), the feature extractor (:func:`inception_extractor`,
in :mod:`nvae.metrics.inception`), the pipeline (:func:`compute_stats`, cached :func:`reference_stats`) and
image loading (:func:`load_images`). Any ``nn.Module`` mapping uint8 (N, C, H, W) to (N, D) can
stand in for Inception (tests use a small random conv net). Nothing here downloads by default.
"""
from __future__ import annotations

import logging
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from nvae.metrics.inception import (INCEPTION_FEATURES, INCEPTION_WEIGHT_FILES, InceptionFeatures,  # noqa: F401
                                    extractor_id, inception_extractor)

log = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every complete PNG


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
        ``sigma`` of pytorch-fid / torch-fidelity (:attr:`count_known` False); ValueError naming what is missing."""
        names = npz_arrays(path)
        missing = [k for k in ("mu", "sigma") if k not in names]
        if missing:
            raise ValueError(f"'{path}': FID statistics need arrays mu and sigma; {' and '.join(missing)} missing "
                             f"(the file has: {', '.join(names) or 'nothing'})")
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            count = int(data["count"]) if "count" in names else None
            key = str(data["key"]) if "key" in names else ""
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"'{path}': mu (D,) and sigma (D, D) expected, got {mu.shape} and {sigma.shape}")
        stats = cls(key=key)
        stats.count_known, stats._count = count is not None, 2 if count is None else count
        stats._shift, stats._outer = torch.from_numpy(mu), torch.from_numpy(sigma) * (stats._count - 1)
        stats._sum = torch.zeros_like(stats._shift)
        return stats


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


# ----------------------------------------------------------------------------- images from disk
def npz_arrays(path: Union[str, Path]) -> list[str]:
    """The names of the arrays in an ``.npz`` (ValueError naming the file if it is not a readable one)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no file '{path}'")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"cannot read '{path}' as .npz: it is not a zip archive (an .npz is one)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read '{path}' as .npz: {err}") from None


def _read_image(f: Path) -> np.ndarray:
    """One image file as uint8 (H, W, C); ValueError naming it when truncated or unreadable (PIL decodes a
    PNG cut after its pixel data, so a PNG must also end with its IEND chunk)."""
    from PIL import Image

    try:
        if f.suffix.lower() == ".png":
            with open(f, "rb") as fh:
                fh.seek(max(0, f.stat().st_size - len(PNG_END)))
                if fh.read() != PNG_END:
                    raise OSError("the file does not end with a PNG's IEND chunk")
        with Image.open(f) as img:
            a = np.asarray(img.convert("L" if img.mode in ("1", "L", "I;16", "I", "F") else "RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image '{f}': {err} (truncated or not an image: delete or replace it)") from None
    return a[:, :, None] if a.ndim == 2 else a


def _array_to_nchw(a: np.ndarray, source: str) -> Tensor:
    if a.ndim == 3:
        a = a[:, None]  # (N, H, W) -> (N, 1, H, W)
    if a.ndim != 4:
        raise ValueError(f"{source}: expected images (N, H, W, C) or (N, C, H, W), got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) or a.min() < 0 or a.max() > 1:
            raise ValueError(f"{source}: expected uint8 images (or float in [0, 1]), got {a.dtype}")
        a = np.round(a * 255.0).astype(np.uint8)
    if a.shape[1] in (1, 3):
        return torch.from_numpy(np.ascontiguousarray(a))
    if a.shape[-1] in (1, 3):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
    raise ValueError(f"{source}: cannot find a channel axis of size 1 or 3 in shape {a.shape}")


def load_images(path: Union[str, Path]) -> Tensor:
    """Images as uint8 (N, C, H, W) from an ``.npz`` (key 'images', else its first array; NHWC or
    NCHW) or from a folder of PNG/JPG files (sorted by name, all the same size)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        names = npz_arrays(path)
        if not names:
            raise ValueError(f"{path}: no arrays in the file")
        try:
            with np.load(path, allow_pickle=False) as data:
                a = data["images" if "images" in names else names[0]]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise ValueError(f"cannot read '{path}' as .npz: {err}") from None
        return _array_to_nchw(a, str(path))
    if not path.is_dir():
        raise FileNotFoundError(f"no .npz file or image folder at '{path}'")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no PNG/JPG images in '{path}'")
    arrays: list[np.ndarray] = []
    for f in files:
        a = _read_image(f)  # (H, W, C)
        if arrays and a.shape[:2] != arrays[0].shape[:2]:
            raise ValueError(f"image size mismatch: {f} is {a.shape[0]}x{a.shape[1]}, "
                             f"expected {arrays[0].shape[0]}x{arrays[0].shape[1]} (as {files[0].name})")
        arrays.append(a)
    if len({a.shape[2] for a in arrays}) > 1:  # mixed gray and colour: promote gray to RGB
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())  # (N, H, W, C) -> (N, C, H, W)
