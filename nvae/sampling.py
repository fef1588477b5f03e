"""Sampling from a trained NVAE (paper sec. 4 and 5.2): temperature and BatchNorm readjustment.

At temperature t < 1 the prior's standard deviations are scaled by t. Samples at reduced
temperature look better when BatchNorm statistics are re-estimated for that temperature: run the
generator in train mode on its own samples for a few hundred batches (momentum 0.05), then go back
to eval mode. Readjusted statistics can be cached to a file per (checkpoint, temperature).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from nvae.compat import BatchNormBase
from nvae.model import NVAE


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics of every BatchNorm layer (name -> the buffer itself)."""
    return {f"{name}.{buf}": getattr(m, buf)
            for name, m in model.named_modules() if isinstance(m, BatchNormBase)
            for buf in ("running_mean", "running_var", "num_batches_tracked")}


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics of every BatchNorm layer (name -> tensor, cloned)."""
    return {key: buf.detach().clone() for key, buf in batchnorm_buffers(model).items()}


def load_batchnorm_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "BatchNorm state") -> None:
    """Copy BatchNorm statistics into ``model``. Every key must name one of its BatchNorm buffers, with
    that buffer's shape (a cache file from elsewhere cannot write other tensors); ValueError otherwise."""
    own = batchnorm_buffers(model)
    if not isinstance(state, dict):
        raise ValueError(f"{source}: not a dict of BatchNorm statistics")
    for key, value in state.items():
        if key not in own or not isinstance(value, torch.Tensor) or value.shape != own[key].shape:
            raise ValueError(f"{source}: {key!r} is not a BatchNorm statistic of this model (or has another shape)")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


@torch.no_grad()
def readjust_batchnorm(model: NVAE, temperature: float, steps: int = 500, batch_size: int = 100,
                       cache: Optional[Path] = None, progress: bool = True) -> bool:
    """Re-estimate BatchNorm statistics on samples at ``temperature`` (sec. 5.2, BN readjustment).

    The model's train/eval mode is restored afterwards. With ``cache``, statistics are loaded from
    that file when it exists (returns True) and saved to it otherwise.
    """
    if cache is not None and cache.is_file():
        load_batchnorm_state(model, torch.load(cache, map_location="cpu", weights_only=True), f"BN cache '{cache}'")
        return True
    was_training = model.training
    model.train()
    for _ in tqdm(range(steps), desc=f"BN readjustment t={temperature:g}", disable=not progress, leave=False):
        model.sample(batch_size, temperature)
    model.train(was_training)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        try:
            torch.save({k: v.cpu() for k, v in batchnorm_state(model).items()}, tmp)
            tmp.replace(cache)
        except BaseException:  # disk full, Ctrl-C: no half-written cache file is left behind
            tmp.unlink(missing_ok=True)
            raise
    return False


def bn_cache_path(checkpoint: Path, temperature: float, steps: int, batch_size: int) -> Path:
    """Cache file beside the checkpoint, keyed by its size and mtime, temperature, steps and batch."""
    stat = checkpoint.stat()
    key = f"{checkpoint.stem}-{stat.st_size}-{int(stat.st_mtime)}-t{temperature:g}-s{steps}-b{batch_size}"
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
