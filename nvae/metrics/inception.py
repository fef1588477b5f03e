"""The FID network (paper sec. 5): torch-fidelity's Inception-v3 with the ``pt_inception-2015-12-05``
weights, the network torchmetrics' FID uses, from a local file (nothing downloads by default)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

INCEPTION_FEATURES = 2048
# torch-fidelity caches the weights under this name; pytorch-fid's copy of the same file (same
# sha256 prefix) is named pt_inception-...; either one in torch hub's cache is accepted.
INCEPTION_WEIGHT_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")


class InceptionFeatures(nn.Module):
    """uint8 (N, 1 or 3, H, W) -> (N, 2048) float32 Inception-v3 pool features.

    Wraps torch-fidelity's ``FeatureExtractorInceptionV3`` (which resizes to 299x299 like
    TensorFlow 1.x and scales to [-1, 1]); gray images are repeated to 3 channels.
    """

    num_features = INCEPTION_FEATURES

    def __init__(self, net: nn.Module, extractor_id: str) -> None:
        super().__init__()
        self.net = net
        self.extractor_id = extractor_id

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected (N, 1 or 3, H, W) images, got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (N, 3, H, W)
        (features,) = self.net(x.to(torch.uint8))
        return features  # (N, 2048)


def _cached_inception_weights() -> Optional[Path]:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_WEIGHT_FILES:
        if (checkpoints / name).is_file():
            return checkpoints / name
    return None


def inception_extractor(weights_path: Optional[str] = None, allow_download: bool = False) -> nn.Module:
    """The FID network: torch-fidelity's InceptionV3 ("inception-v3-compat", 2048-D pool features).

    Same network and weights (``pt_inception-2015-12-05``) as torchmetrics' FID (paper sec. 5).
    ``weights_path`` is the local weights file; when None, torch hub's cache
    (``$TORCH_HOME/hub/checkpoints``) is searched, and torch-fidelity's own download is used only
    if ``allow_download`` is True. Otherwise a FileNotFoundError says how to supply the file.
    """
    if weights_path is not None:
        path: Optional[Path] = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file not found: '{path}'")
    else:
        path = _cached_inception_weights()
        if path is None and not allow_download:
            raise FileNotFoundError(
                "Inception-v3 weights for FID not found: pass --inception-weights FILE "
                f"(pt_inception-2015-12-05-6726825d.pth) or place it in {Path(torch.hub.get_dir()) / 'checkpoints'}")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
                                      feature_extractor_weights_path=None if path is None else str(path))
    return InceptionFeatures(net, extractor_id="inception-v3-compat-2015-12-05-pool2048")


def extractor_id(extractor: nn.Module) -> str:
    """A string naming the extractor, for cache keys (``extractor_id`` attribute or class name)."""
    return str(getattr(extractor, "extractor_id", type(extractor).__name__))
