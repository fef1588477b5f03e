"""Sampling from a trained NVAE (paper sec. 4 and 5.2): temperature and BatchNorm readjustment.

At temperature t < 1 the prior's standard deviations are scaled by t. Samples at reduced
temperature look better when BatchNorm statistics are re-estimated for that temperature: run the
generator in train mode on its own samples for a few hundred batches (momentum 0.05), then go back
to eval mode. The passes draw from the RNG seeded once with ``bn_seed(seed)`` (= ``image_seed(seed, -1)``,
a stream that no sampling batch ``b >= 0`` uses), so the run's seed fixes the statistics and the images.
Readjusted statistics can be cached to a file per (weights file, weights loaded, seed, temperature, steps,
batch) (:func:`bn_cache_path`): written to a fresh temporary name (O_EXCL) and renamed, read with
``weights_only=True`` and checked (every statistic of the model, of its shape, finite, variances >= 0)
before anything is copied.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from nvae.compat import BatchNormBase
from nvae.limits import check_archive
from nvae.model import NVAE
from nvae.pretrained import RAW_WEIGHTS, WEIGHTS


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics of every BatchNorm layer (name -> the buffer itself)."""
    return {f"{name}.{buf}": getattr(m, buf)
            for name, m in model.named_modules() if isinstance(m, BatchNormBase)
            for buf in ("running_mean", "running_var", "num_batches_tracked")}


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics of every BatchNorm layer (name -> tensor, cloned)."""
    return {key: buf.detach().clone() for key, buf in batchnorm_buffers(model).items()}


def load_batchnorm_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "BatchNorm state") -> None:
    """Copy BatchNorm statistics into ``model``. ``state`` must hold every one of its BatchNorm buffers
    and nothing else, each of that buffer's shape (a cache file from elsewhere cannot write other
    tensors), with finite means, finite variances >= 0 and a count that is an integer >= 0; ValueError
    naming ``source`` and the key otherwise (nothing is copied then)."""
    own = batchnorm_buffers(model)
    if not isinstance(state, dict):
        raise ValueError(f"{source}: not a dict of BatchNorm statistics")
    for key, value in state.items():
        if key not in own or not isinstance(value, torch.Tensor) or value.shape != own[key].shape:
            raise ValueError(f"{source}: {key!r} is not a BatchNorm statistic of this model (or has another shape)")
        problem = _statistic_problem(key, value)
        if problem:
            raise ValueError(f"{source}: {key!r} {problem}")
    missing = [key for key in own if key not in state]
    if missing:
        raise ValueError(f"{source}: {len(missing)} BatchNorm statistic(s) of this model missing ({missing[0]!r}, ...)")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


def _statistic_problem(key: str, value: torch.Tensor) -> str:
    """What is wrong with the BatchNorm statistic ``value`` (a running mean, variance or batch count), or ""."""
    if key.endswith("num_batches_tracked"):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            return f"must be an integer tensor, got {value.dtype}"
        return "must be >= 0" if bool((value < 0).any()) else ""
    if not value.dtype.is_floating_point:
        return f"must be a floating-point tensor, got {value.dtype}"
    if not bool(torch.isfinite(value).all()):
        return "holds non-finite values (NaN or inf)"
    if key.endswith("running_var") and bool((value < 0).any()):
        return "holds negative variances"
    return ""


def _load_cache(cache: Path) -> dict[str, torch.Tensor]:
    """The statistics in the cache file (``weights_only=True``, after :func:`nvae.limits.check_archive`:
    nothing inflates beyond what the file holds); ValueError naming it when unreadable."""
    check_archive(cache, f"BN cache '{cache}'")
    try:
        return torch.load(cache, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - garbage: UnpicklingError, RuntimeError (zip), EOFError, ...
        raise ValueError(f"BN cache '{cache}' is not a statistics file that nvae wrote ({type(err).__name__}); "
                         f"delete it to recompute") from None  # torch's message is many lines, and advice to unpickle


def _save_cache(state: dict[str, torch.Tensor], cache: Path) -> None:
    """Write ``state`` to ``cache`` through a fresh temporary file in its folder (``mkstemp``: O_EXCL, so
    never a link someone placed there) renamed when complete; the temporary file is removed on failure."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{cache.name}.", suffix=".tmp", dir=cache.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(name, cache)
    except BaseException:  # disk full, Ctrl-C: no half-written cache file is left behind
        Path(name).unlink(missing_ok=True)
        raise


@torch.no_grad()
def readjust_batchnorm(model: NVAE, temperature: float, steps: int = 500, batch_size: int = 100,
                       cache: Optional[Path] = None, progress: bool = True, seed: Optional[int] = None) -> bool:
    """Re-estimate BatchNorm statistics on samples at ``temperature`` (sec. 5.2, BN readjustment).

    With ``seed`` the passes draw from torch's global RNG seeded once with :func:`bn_seed` (the same as
    ``torch.manual_seed(bn_seed(seed))`` followed by a call without ``seed``); the caller's RNG state is
    restored afterwards. Without it they draw from the RNG as it stands.
    The model's train/eval mode is restored afterwards. With ``cache``, statistics are loaded from
    that file when it exists (returns True; ValueError naming it when it is not a readable file of this
    model's statistics) and saved to it otherwise.
    """
    if cache is not None and cache.is_file():
        load_batchnorm_state(model, _load_cache(cache), f"BN cache '{cache}'")
        return True
    was_training = model.training
    model.train()
    try:
        if seed is None:
            skipped = _readjust(model, temperature, steps, batch_size, progress)
        else:
            devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(bn_seed(seed))
                skipped = _readjust(model, temperature, steps, batch_size, progress)
    finally:
        model.train(was_training)
    if skipped == steps:
        raise ValueError(f"BN readjustment at t={temperature:g}: all {steps} batches gave non-finite BatchNorm "
                         "statistics (the model's samples overflow at this temperature); the trained statistics "
                         "are kept: sample without --readjust-bn or at another temperature")
    if skipped:
        tqdm.write(f"BN readjustment at t={temperature:g}: {skipped} of {steps} batches gave non-finite BatchNorm "
                   "statistics and were skipped", file=sys.stderr)
    if cache is not None:
        _save_cache({k: v.cpu() for k, v in batchnorm_state(model).items()}, cache)
    return False


def _readjust(model: NVAE, temperature: float, steps: int, batch_size: int, progress: bool) -> int:
    """``steps`` sampling passes in train mode; a pass that leaves any BatchNorm statistic non-finite is
    undone (the official readjustment keeps it, and its released CelebA-64, CelebA-HQ-256 and CIFAR-10
    models then sample NaN images). Returns how many passes were undone; with all undone the
    statistics are the ones the model came with."""
    buffers = batchnorm_buffers(model)
    skipped = 0
    for _ in tqdm(range(steps), desc=f"BN readjustment t={temperature:g}", disable=not progress, leave=False):
        before = {k: v.clone() for k, v in buffers.items()}
        model.sample(batch_size, temperature)
        if not all(bool(torch.isfinite(v).all()) for v in buffers.values()):
            for key, value in before.items():
                buffers[key].copy_(value)
            skipped += 1
    return skipped


def bn_seed(seed: int) -> int:
    """The RNG seed of BatchNorm readjustment under the run's ``seed``: ``image_seed(seed, -1)``, distinct
    from every sampling batch's ``image_seed(seed, b)``, b >= 0."""
    return image_seed(seed, -1)


def _identity(path: Path) -> str:
    """Size, mtime in ns and inode of ``path``: a file replaced, rewritten or copied (``cp -a`` keeps the
    mtime, not the inode) gets another."""
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}-{stat.st_ino}"


def bn_cache_path(checkpoint: Path, temperature: float, steps: int, batch_size: int, seed: int = 0,
                  weights: str = "raw") -> Path:
    """Cache file in ``bn_cache/`` beside the checkpoint (a file, or a model directory: the folder), keyed
    by its full name, the identity (:func:`_identity`) of the weights file(s) read (for a model directory
    its model.safetensors and model_raw.safetensors when present, not the folder, whose size and mtime
    do not change when a file in it is replaced), which weights were loaded (``LoadedCheckpoint.weights``:
    'ema' or 'raw'), the run's ``seed`` (:func:`bn_seed`), temperature, steps and batch."""
    if checkpoint.is_dir():
        files = [checkpoint / WEIGHTS] + [p for p in [checkpoint / RAW_WEIGHTS] if p.is_file()]
    else:
        files = [checkpoint]
    ids = "-".join(_identity(f) for f in files)
    key = f"{checkpoint.name}-{weights}-{ids}-seed{seed}-t{temperature:g}-s{steps}-b{batch_size}"
    return checkpoint.parent / "bn_cache" / f"{key}.pt"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats on the n-bit grid -> uint8 0..255."""
    return (images.float() * 255.0).round().clamp(0, 255).to(torch.uint8)


def image_seed(seed: int, index: int) -> int:
    """The RNG seed of image (or batch) ``index`` under the run's ``seed``: evaluation and sampling draw
    the same numbers whatever the number of processes."""
    return seed * 1_000_003 + index


@torch.no_grad()
def iter_samples(model: NVAE, num: int, temperature: float = 1.0, batch_size: int = 100, seed: int = 0,
                 mean: bool = True, progress: bool = True, quantize: Optional[bool] = None,
                 rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """This process's share of ``num`` images, batch by batch: uint8 (b, C, H, W) on the CPU with the
    data's padding cropped. Only one batch is alive at a time, whatever ``num``.

    Batch b of the whole set is drawn by process b mod ``world`` from seed ``image_seed(seed, b)``:
    the same seed gives the same images, for any number of processes. ``mean`` decodes each latent
    sample to the likelihood's mean (else a sample from it), on the bit grid or not by ``quantize``
    (see :meth:`NVAE.sample`).
    """
    pad = model.spec.pad
    batches = range(rank, math.ceil(num / batch_size), world)
    for b in tqdm(batches, desc=f"sampling t={temperature:g}", disable=not progress, leave=False):
        torch.manual_seed(image_seed(seed, b))
        images = model.sample(min(batch_size, num - b * batch_size), temperature, mean=mean, quantize=quantize)
        if pad:
            images = images[..., pad:-pad, pad:-pad]
        yield to_uint8(images).cpu()


def image_shape(model: NVAE) -> tuple[int, int, int]:
    """(C, H, W) of the images :func:`iter_samples` yields (the data's padding cropped)."""
    inner = model.spec.size - 2 * model.spec.pad
    return model.spec.channels, inner, inner


def sample_images(model: NVAE, num: int, temperature: float = 1.0, batch_size: int = 100, seed: int = 0,
                  mean: bool = True, progress: bool = True, quantize: Optional[bool] = None,
                  rank: int = 0, world: int = 1) -> torch.Tensor:
    """This process's share of ``num`` images at once, uint8 (n, C, H, W): :func:`iter_samples` joined."""
    chunks = list(iter_samples(model, num, temperature, batch_size, seed, mean, progress, quantize, rank, world))
    return torch.cat(chunks) if chunks else torch.zeros(0, *image_shape(model), dtype=torch.uint8)
