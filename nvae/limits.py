"""How large a model a file may describe, checked before anything is allocated.

A checkpoint, a model directory or an official ``args`` describes a network by a few numbers; a
hostile or broken file can ask for ``num_channels 100000`` (a 360 GB weight) or 200,000 latent
groups (millions of modules). Two checks stop such a file before memory is touched:

1. :func:`check_structure` (pure arithmetic, also run by ``NVAE.__init__``): the counts that decide
   how many modules are built and how large the image is, bounded far above the paper's models
   (each bound says by how much).
2. :func:`check_fits`: the network built on PyTorch's ``meta`` device (shapes only, no memory), its
   parameters and buffers summed, and compared with the memory this machine has available.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import nn

from nvae.arch import NVAEConfig
from nvae.spec import ImageSpec

MAX_IMAGE_SIZE = 4096  # 16x the paper's largest images (256)
MAX_GROUPS = 1024  # latent groups of all scales: 28x the paper's largest model (36)
MAX_CELLS = 2048  # residual cells (encoder, decoder, pre/post, flow cells, scale changes): 6.8x the paper's largest (302)
MAX_WIDTH = 2**16  # channels of the widest convolution (base x 2^downsamplings x expansion): 11x the paper's 5,760
MAX_MIXTURES = 1024  # likelihood components (paper: 10)
LOADING_COPIES = 2  # reading a file holds its tensors and the model's at once; training, weights and gradients


def _groups(cfg: NVAEConfig) -> int:
    return sum(cfg.groups_per_scale())


def cells(cfg: NVAEConfig) -> int:
    """Residual cells the network builds (flow cells counted as cells)."""
    per_group = cfg.num_cell_per_cond_enc + cfg.num_cell_per_cond_dec + 2 * cfg.num_flows
    pre_post = cfg.num_preprocess_blocks * cfg.num_preprocess_cells + cfg.num_postprocess_blocks * cfg.num_postprocess_cells
    return _groups(cfg) * per_group + pre_post + 2 * cfg.num_latent_scales


def check_structure(spec: ImageSpec, cfg: NVAEConfig, source: str = "model") -> None:
    """ValueError naming the field when the description exceeds a bound of this module (cheap: no
    module is built). Call before building on any device, meta included."""
    levels = cfg.num_preprocess_blocks + cfg.num_latent_scales - 1
    if spec.size > MAX_IMAGE_SIZE:
        raise ValueError(f"{source}: image_spec.size {spec.size} exceeds {MAX_IMAGE_SIZE}, the largest image nvae builds")
    max_levels = MAX_IMAGE_SIZE.bit_length() - 1  # halvings of the largest image down to one pixel
    if levels > max_levels:
        raise ValueError(f"{source}: model.arch has {levels} downsamplings (num_preprocess_blocks + "
                         f"num_latent_scales - 1); images of at most {MAX_IMAGE_SIZE} pixels allow {max_levels}")
    if cfg.num_groups_per_scale > MAX_GROUPS or _groups(cfg) > MAX_GROUPS:
        raise ValueError(f"{source}: model.arch asks for {_groups(cfg)} latent groups (num_groups_per_scale "
                         f"{cfg.num_groups_per_scale} x num_latent_scales {cfg.num_latent_scales}); at most {MAX_GROUPS}")
    if cells(cfg) > MAX_CELLS:
        raise ValueError(f"{source}: model.arch asks for {cells(cfg)} cells (cells per group, flows, pre/post "
                         f"blocks); at most {MAX_CELLS}")
    width = cfg.num_channels * 2**levels * max(cfg.decoder_expand, cfg.postprocess_expand)
    if width > MAX_WIDTH or cfg.num_latent_per_group > MAX_WIDTH:
        raise ValueError(f"{source}: model.arch.num_channels {cfg.num_channels} gives convolutions {width} channels "
                         f"wide (x2 per downsampling, x expansion); at most {MAX_WIDTH}")
    if spec.channels > MAX_WIDTH:
        raise ValueError(f"{source}: image_spec.channels {spec.channels} exceeds {MAX_WIDTH}")
    if cfg.num_mixtures > MAX_MIXTURES:
        raise ValueError(f"{source}: model.arch.num_mixtures {cfg.num_mixtures} exceeds {MAX_MIXTURES}")


def available_memory() -> Optional[int]:
    """Bytes this machine can still give (Linux ``MemAvailable``; else total physical memory; None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def model_bytes(spec: ImageSpec, cfg: NVAEConfig, model_cls: Callable[[ImageSpec, NVAEConfig], nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``model_cls(spec, cfg)`` (NVAE or a subclass), measured on
    the meta device (nothing allocated); :func:`check_structure` first."""
    check_structure(spec, cfg)
    with torch.device("meta"):
        model = model_cls(spec, cfg)
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def check_fits(spec: ImageSpec, cfg: NVAEConfig, model_cls: Callable[[ImageSpec, NVAEConfig], nn.Module],
               source: str = "model", available: Optional[int] = None) -> int:
    """ValueError naming the size when the model's tensors, held twice while a file is read
    (:data:`LOADING_COPIES`), exceed the memory available; returns the model's bytes."""
    check_structure(spec, cfg, source)
    size = model_bytes(spec, cfg, model_cls)
    free = available_memory() if available is None else available
    if free is not None and LOADING_COPIES * size > free:
        raise ValueError(f"{source}: the model it describes has {size / 2**30:.1f} GiB of weights and needs at least "
                         f"{LOADING_COPIES}x that to load or train, more than the {free / 2**30:.1f} GiB this machine "
                         "has available; nothing was allocated")
    return size


def min_pass_bytes(spec: ImageSpec, cfg: NVAEConfig, batch: int) -> int:
    """A lower bound on the memory one pass of the network over ``batch`` images holds: the
    full-resolution feature map that the stem makes (encoding) and the last postprocessing cell makes
    (decoding, sampling), ``num_channels`` float32 maps of the image size per image. The real need is
    several times larger; a batch this bound already refuses cannot run here."""
    return batch * cfg.num_channels * spec.size * spec.size * 4


def check_batch(spec: ImageSpec, cfg: NVAEConfig, batch: int, what: str, available: Optional[int] = None) -> None:
    """ValueError naming ``what`` (an option) when a pass over ``batch`` images cannot fit this machine's
    available memory (:func:`min_pass_bytes`), before any image is drawn or read."""
    need = min_pass_bytes(spec, cfg, batch)
    free = available_memory() if available is None else available
    if free is not None and need > free:
        raise ValueError(f"{what} {batch}: one pass over that many images needs at least {need / 2**30:.1f} GiB "
                         f"({cfg.num_channels} channels of {spec.size}x{spec.size} per image), more than the "
                         f"{free / 2**30:.1f} GiB this machine has available; lower it")


def check_archive(path: str | os.PathLike, source: str, available: Optional[int] = None) -> None:
    """ValueError naming ``source`` unless ``path`` is a file ``torch.load`` can read without allocating
    more than the file holds: a zip archive (``torch.save``'s format since PyTorch 1.6) whose records are
    stored, not compressed, and hold no more than the memory available. A compressed record inflates on
    reading (an 8 MB file can hold a 3 GB tensor); PyTorch's legacy format allocates each storage at the
    size its header declares before reading it. Only the zip's directory is read."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError(f"{source} is not in torch.save's zip format (PyTorch's legacy format allocates what its "
                         "header declares before reading); if you trust the file, load and save it again with PyTorch")
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ValueError(f"{source} is not a readable archive ({err})") from None
    packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise ValueError(f"{source}: record {packed[0]!r} is compressed, which torch.save never does; a compressed "
                         "record can inflate to far more than the file holds, so it was not read")
    declared = sum(r.file_size for r in records)
    free = available_memory() if available is None else available
    if free is not None and declared > free:
        raise ValueError(f"{source} declares {declared / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB "
                         "this machine has available; it was not read")
