"""What every reader of model files shares: the model a file describes, sized before it is built, and
its weights checked before they are loaded (an nvae checkpoint: :mod:`nvae.checkpoint`; a model
directory: :mod:`nvae.pretrained`; an official checkpoint: :mod:`nvae.convert`).

Nothing here imports the model: the class to build is passed in (NVAE or a subclass), so the model's
own ``from_pretrained`` can use these readers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import nn

from nvae.arch import NVAEConfig
from nvae.limits import check_fits
from nvae.spec import ImageSpec

if TYPE_CHECKING:
    from nvae.model import NVAE


@dataclass
class LoadedCheckpoint:
    """A model in eval mode plus what its file (checkpoint or model directory) says about its training."""

    model: "NVAE"
    weights: str
    """'ema' when the checkpoint's EMA weights were loaded, else 'raw'."""
    hparams: dict[str, Any]
    data: Optional[dict[str, Any]]
    """{'class_path': ..., 'init_args': {...}} of the training data module, if recorded (checked)."""
    path: Path


def described_model(hparams: Mapping[str, Any], source: str, model_cls: type[nn.Module]
                    ) -> tuple[ImageSpec, NVAEConfig]:
    """The image spec and architecture ``hparams`` (a checkpoint's hyper-parameters) describe, after the
    model's size was checked against this machine's memory on the meta device (:func:`nvae.limits.check_fits`
    builds ``model_cls``, NVAE or a subclass, there); one-line ValueError otherwise."""
    try:
        spec, cfg = ImageSpec(**hparams["image_spec"]), NVAEConfig(**hparams["arch"])
    except (TypeError, KeyError) as err:
        raise ValueError(f"{source}: hyper_parameters do not describe an NVAE ({err})") from None
    except ValueError as err:  # a field out of range (ImageSpec / NVAEConfig name it)
        raise ValueError(f"{source}: {err}") from None
    check_fits(spec, cfg, model_cls, source)
    return spec, cfg


def check_state(state: object, expected: Mapping[str, torch.Tensor], entry: str) -> dict[str, torch.Tensor]:
    """``state`` if it holds exactly the tensors of ``expected`` (a model's state dict), each of its shape
    and kind (floating or integer) and finite; ValueError naming ``entry`` and the first bad key otherwise."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{entry} must be a dict of tensors")
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"{len(missing)} missing (first {missing[0]!r})" if missing else ""
        what += ("; " if missing and extra else "") + (f"{len(extra)} unexpected (first {extra[0]!r})" if extra else "")
        raise ValueError(f"{entry}: tensors do not match the model its hyper-parameters describe: {what}")
    for key, like in expected.items():
        value = state[key]
        if value.layout != torch.strided:  # sparse, quantized-packed, ...: not what any model tensor is
            raise ValueError(f"{entry}: {key!r} is a {value.layout} tensor, the model needs a dense one")
        if value.shape != like.shape:
            raise ValueError(f"{entry}: {key!r} has shape {tuple(value.shape)}, the model needs {tuple(like.shape)}")
        if value.is_complex() or value.is_floating_point() != like.is_floating_point():
            raise ValueError(f"{entry}: {key!r} is {value.dtype}, the model needs {like.dtype}")
        if value.numel() * value.element_size() > value.untyped_storage().nbytes():  # an expanded view: checking
            raise ValueError(f"{entry}: {key!r} claims more values than its storage holds")  # it would allocate
        if value.is_floating_point() and not bool(torch.isfinite(value.to(like.dtype)).all()):  # finite once cast
            raise ValueError(f"{entry}: {key!r} holds non-finite values (NaN or inf): the weights are broken")
        if key.endswith("running_var") and bool((value < 0).any()):
            raise ValueError(f"{entry}: {key!r} holds negative variances: the BatchNorm statistics are broken")
    return state


__all__ = ["LoadedCheckpoint", "check_state", "described_model"]
