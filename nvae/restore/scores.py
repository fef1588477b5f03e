"""Image quality of restorations against the clean images: PSNR and SSIM (torchmetrics, data range 1)
and LPIPS (Zhang et al., CVPR 2018) from a local backbone weights file, nothing downloaded.

LPIPS needs two sets of weights: its linear heads ship inside torchmetrics; its backbone (AlexNet or
VGG-16 on ImageNet) is torchvision's, which torchvision would download. :func:`load_lpips` reads the
backbone from a file the user names instead (torchvision's ``alexnet-owt-7be5be79.pth`` or
``vgg16-397923af.pth``, read with ``weights_only=True``), its keys and shapes checked exactly.
"""
from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from nvae.limits import check_archive
from nvae.names import LPIPS_NETS

LPIPS_MIN_SIZE = {"alex": 31, "vgg": 16}  # smaller images vanish in the backbone's pooling (measured)


def psnr(estimate: Tensor, clean: Tensor) -> Tensor:
    """(B,) PSNR in dB of images (B, C, H, W) in [0, 1] (estimates clamped to it)."""
    return peak_signal_noise_ratio(estimate.clamp(0, 1).double(), clean.double(), data_range=1.0,
                                   reduction="none", dim=(1, 2, 3))


def ssim(estimate: Tensor, clean: Tensor) -> Tensor:
    """(B,) SSIM (Gaussian window 11, sigma 1.5) of images (B, C, H, W) in [0, 1]."""
    return structural_similarity_index_measure(estimate.clamp(0, 1).double(), clean.double(), data_range=1.0,
                                               reduction="none")


def _read_weights(path: Path) -> object:
    """A state dict from a file of others: a regular file, torch's zip format sized against memory, read
    with ``weights_only=True`` (nothing unpickled); ValueError of one line otherwise."""
    source = f"--lpips-weights '{path}'"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"{source} is not a regular file")
    except FileNotFoundError:
        raise ValueError(f"{source} does not exist") from None
    check_archive(path, source)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{source} holds objects other than tensors; nvae reads weights only") from None
    except Exception as err:  # a damaged archive
        raise ValueError(f"{source} cannot be read: {str(err).splitlines()[0][:160]}") from None


def load_lpips(path: str | Path, net: str = "alex", size: int = 256) -> Callable[[Tensor, Tensor], Tensor]:
    """LPIPS(estimate, clean) -> (B,) for images of ``size`` pixels, the backbone read from ``path``;
    ValueError naming the file when it is not that backbone's state dict, or the size when too small."""
    from torchmetrics.functional.image.lpips import _LPIPS

    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS network '{net}' is not one of {', '.join(LPIPS_NETS)}")
    if size < LPIPS_MIN_SIZE[net]:
        raise ValueError(f"LPIPS ({net}) needs images of at least {LPIPS_MIN_SIZE[net]} pixels a side, these have "
                         f"{size}; leave out --lpips-weights")
    state = _read_weights(Path(path))
    metric = _LPIPS(pretrained=True, net=net, pnet_rand=True).eval()  # linear heads from torchmetrics
    wanted = {}
    for name, param in metric.net.named_parameters():  # 'slice2.3.weight' is the backbone's 'features.3.weight'
        key = "features." + name.split(".", 1)[1]
        value = state.get(key) if isinstance(state, dict) else None
        if not (torch.is_tensor(value) and tuple(value.shape) == tuple(param.shape) and value.is_floating_point()):
            raise ValueError(f"--lpips-weights '{path}' is not torchvision's {net} weights "
                             f"({LPIPS_NETS[net]}): no floating-point '{key}' of shape {tuple(param.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"--lpips-weights '{path}': '{key}' holds values that are not finite")
        wanted[name] = value.float()
    metric.net.load_state_dict(wanted)
    for p in metric.parameters():
        p.requires_grad_(False)

    def score(estimate: Tensor, clean: Tensor) -> Tensor:
        a, b = estimate.clamp(0, 1).float(), clean.float()
        if a.shape[1] == 1:  # gray: the backbone sees three equal channels
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        metric.to(a.device)
        with torch.no_grad():
            return metric(2 * a - 1, 2 * b - 1).flatten()  # LPIPS reads [-1, 1]

    return score
