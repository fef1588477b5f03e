"""Rebuild a trained NVAE, and the data it was trained on, from a Lightning checkpoint alone.

Checkpoints hold the architecture and image spec as plain dicts, the data module's class path and
arguments (``nvae_data``) and, when EMA was kept, the averaged weights (``nvae_ema``); so they load
with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from nvae.lightning import DATA_KEY, EMA_KEY
from nvae.model import NVAE, NVAEConfig
from nvae.spec import ImageSpec


@dataclass
class LoadedCheckpoint:
    """A model in eval mode plus what the checkpoint says about its training."""

    model: NVAE
    weights: str
    """'ema' when the checkpoint's EMA weights were loaded, else 'raw'."""
    hparams: dict[str, Any]
    data: Optional[dict[str, Any]]
    """{'class_path': ..., 'init_args': {...}} of the training data module, if recorded."""
    path: Path


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is a torch.device that must exist on
    this machine (ValueError naming it otherwise, instead of a CUDA initialization traceback later)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: {err}") from None
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here")
    return resolved


def device_arg(text: str) -> str:
    """argparse ``type`` of ``--device``: checked while parsing, so a missing device is a usage error."""
    try:
        resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> LoadedCheckpoint:
    """Load ``path`` and rebuild its NVAE (EMA weights when present and ``use_ema``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"'{path}' is not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "arch" not in ckpt.get("hyper_parameters", {}):
        raise ValueError(f"'{path}' is not an nvae checkpoint (no model hyper-parameters / state_dict)")
    hparams = ckpt["hyper_parameters"]
    model = NVAE(ImageSpec(**hparams["image_spec"]), NVAEConfig(**hparams["arch"]))
    weights = "raw"
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if use_ema and ckpt.get(EMA_KEY):
        state, weights = ckpt[EMA_KEY], "ema"
    model.load_state_dict(state)
    if hparams.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    model.to(device).eval()
    return LoadedCheckpoint(model, weights, hparams, ckpt.get(DATA_KEY), path)


def build_datamodule(data: Optional[dict[str, Any]], **overrides: Any) -> Any:
    """Instantiate the recorded data module; ``overrides`` (e.g. root, eval_batch_size) win when not None."""
    if not data:
        raise ValueError("the checkpoint records no data module: name one with --data CLASS_PATH [--data-root DIR]")
    module_name, _, cls_name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    args = {k: v for k, v in data["init_args"].items() if k in accepted}
    args.update({k: v for k, v in overrides.items() if v is not None and k in accepted})
    return cls(**args)
