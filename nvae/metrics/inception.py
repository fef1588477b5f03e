"""The FID network (paper sec. 5): torch-fidelity's Inception-v3 with the ``pt_inception-2015-12-05``
weights, the network torchmetrics' FID uses, from a local file (nothing downloads by default)."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from nvae.limits import check_archive

INCEPTION_FEATURES = 2048
# torch-fidelity caches the weights under this name; pytorch-fid's copy of the same file (same
# sha256 prefix) is named pt_inception-...; either one in torch hub's cache is accepted.
INCEPTION_SHA256_PREFIX = "6726825d"
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


def is_known_weights(path: Path) -> bool:
    """Whether ``path`` is the published ``pt_inception-2015-12-05`` file: its sha256 starts with the
    8 hex digits its name carries (torch hub's convention for weights files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(INCEPTION_SHA256_PREFIX)


def read_inception_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of an Inception weights file, read with ``weights_only=True`` (a pickle payload in the
    file cannot run); ValueError naming the file when it holds anything but a dict of tensors."""
    if not is_known_weights(path):  # the published file may be in PyTorch's legacy format; anything else must be a
        check_archive(path, f"Inception weights '{path}'")  # zip that inflates to no more than it holds
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any refusal of the unpickler means "not a weights file"
        raise ValueError(f"Inception weights '{path}' are not a plain weights file ({type(err).__name__}); "
                         "it was not unpickled") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"Inception weights '{path}' must hold a dict of tensors")
    return state


def inception_extractor(weights_path: Optional[str] = None, allow_download: bool = False) -> nn.Module:
    """The FID network: torch-fidelity's InceptionV3 ("inception-v3-compat", 2048-D pool features).

    Same network and weights (``pt_inception-2015-12-05``) as torchmetrics' FID (paper sec. 5).
    ``weights_path`` is the local weights file; when None, torch hub's cache
    (``$TORCH_HOME/hub/checkpoints``) is searched, and the file is downloaded there only if
    ``allow_download`` is True. Otherwise a FileNotFoundError says how to supply the file.

    torch-fidelity unpickles its weights file without ``weights_only``; nvae never lets it read a
    file from elsewhere: the tensors are read here with ``weights_only=True`` and handed to it as a
    file nvae wrote from those tensors alone.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    if weights_path is not None:
        path: Optional[Path] = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file not found: '{path}'")
    else:
        path = _cached_inception_weights()
        if path is None and allow_download:
            path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHT_FILES[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(tf_inception.URL_INCEPTION_V3, str(path))
        if path is None:
            raise FileNotFoundError(
                "Inception-v3 weights for FID not found: pass --inception-weights FILE "
                f"(pt_inception-2015-12-05-6726825d.pth) or place it in {Path(torch.hub.get_dir()) / 'checkpoints'}")
    state = read_inception_weights(path)
    with tempfile.TemporaryDirectory(prefix="nvae-inception-") as folder:
        tensors_only = Path(folder) / "weights.pth"
        torch.save(state, tensors_only)
        try:
            net = tf_inception.FeatureExtractorInceptionV3(name="inception-v3-compat",
                                                           features_list=[str(INCEPTION_FEATURES)],
                                                           feature_extractor_weights_path=str(tensors_only))
        except RuntimeError as err:  # load_state_dict: missing, unexpected or misshapen tensors
            first = str(err).strip().splitlines()[-1].strip()[:200]
            raise ValueError(f"Inception weights '{path}' do not fit torch-fidelity's InceptionV3: {first}") from None
    return InceptionFeatures(net, extractor_id="inception-v3-compat-2015-12-05-pool2048")


def extractor_id(extractor: nn.Module) -> str:
    """A string naming the extractor, for cache keys (``extractor_id`` attribute or class name)."""
    return str(getattr(extractor, "extractor_id", type(extractor).__name__))
