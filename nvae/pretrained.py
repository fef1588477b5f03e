"""Model directories: an NVAE that loads without unpickling anything (the layout of Hugging Face models).

    DIR/config.json              architecture, image spec, likelihood and bins, which weights, provenance
    DIR/model.safetensors        every tensor of the model's state dict (the EMA weights when the run kept them)
    DIR/model_raw.safetensors    the raw weights, when model.safetensors holds the EMA ones
    DIR/README.md                a model card: data, the paper's number, how the files were made, the licence

Reading is strict and checks before it allocates: ``config.json`` is plain JSON whose every key is
known and every value typed and bounded (:func:`nvae.limits.check_fits` sizes the model on the meta
device); each safetensors header is parsed here first (its size bounded, every tensor's dtype, shape
and byte range checked against the file's length, the model's state dict and the other tensors)
before the ``safetensors`` library maps the data; then no tensor may be missing, unexpected, of
another shape or kind, or non-finite (:func:`nvae.loading.check_state`). Nothing in a directory
names code. ``owner/name`` is fetched from the Hugging Face Hub when ``huggingface_hub`` is installed
(``pip install 'nvae[hub]'``) and then read the same way.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import torch

from torch import nn

from nvae.loading import LoadedCheckpoint, check_state, described_model

CONFIG, WEIGHTS, RAW_WEIGHTS, CARD = "config.json", "model.safetensors", "model_raw.safetensors", "README.md"
FORMAT = "nvae-model-1"  # config.json's "format": the layout version of a model directory
MAX_CONFIG_BYTES = 2**20  # a config.json is a few kB (the official args included)
MAX_HEADER_BYTES = 2**24  # a safetensors header lists names, dtypes, shapes and offsets: ~100 bytes a tensor
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32}  # what an NVAE's state dict holds (num_batches_tracked: I64)
CONFIG_KEYS = {"format", "image_spec", "arch", "likelihood", "weights", "channels_last", "data", "provenance"}


class ModelDirError(ValueError):
    """A model directory that nvae will not read, with one line saying why."""


# ------------------------------------------------------------------------------------------ reading
def _json_value_ok(value: Any, depth: int = 0) -> bool:
    """Plain JSON of bounded depth: dicts with string keys, lists, strings, finite numbers, bools, null."""
    if depth > 8:
        return False
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_value_ok(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_json_value_ok(v, depth + 1) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int, bool))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (with a key twice, which value counts is the reader's guess)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice")
    return out


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` checked: size, plain finite JSON, known keys, the format, typed groups."""
    path = folder / CONFIG
    if not path.is_file():
        what = "is not a regular file" if os.path.lexists(path) else "does not exist"
        raise ModelDirError(f"model directory '{folder}': {CONFIG} {what}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelDirError(f"'{path}' is {path.stat().st_size} bytes, more than a config ({MAX_CONFIG_BYTES})")
    try:
        config = json.loads(path.read_text(), parse_constant=lambda c: math.nan,  # NaN/Infinity: refused below
                            object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ModelDirError(f"'{path}' is not JSON nvae reads ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:120]!r})") from None
    if not isinstance(config, dict) or not _json_value_ok(config):
        raise ModelDirError(f"'{path}' must be a JSON object of plain, finite values")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ModelDirError(f"'{path}': unknown key {unknown[0]!r} (known: {', '.join(sorted(CONFIG_KEYS))})")
    if config.get("format") != FORMAT:
        raise ModelDirError(f"'{path}': format {config.get('format')!r} is not {FORMAT!r}, the one this nvae reads")
    for key in ("image_spec", "arch"):
        if not isinstance(config.get(key), dict):
            raise ModelDirError(f"'{path}': {key} must be an object")
    if not isinstance(config.get("channels_last", False), bool):
        raise ModelDirError(f"'{path}': channels_last must be true or false")
    if config.get("weights", "raw") not in ("raw", "ema"):
        raise ModelDirError(f"'{path}': weights must be 'raw' or 'ema', got {config.get('weights')!r}")
    data = config.get("data")
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("class_path"), str)
                                 and isinstance(data.get("init_args", {}), dict)):
        raise ModelDirError(f"'{path}': data must be null or {{class_path, init_args}}")
    return config


def read_header(path: Path, expected: Mapping[str, torch.Tensor]) -> None:
    """The safetensors header of ``path`` checked against the file and the model before any data is
    mapped: bounded size, JSON, every tensor's dtype known, its byte range inside the file, of the size
    its shape says, not overlapping another, and the tensors exactly the model's, of its shapes."""
    where = f"'{path}'"
    if not path.is_file():
        raise ModelDirError(f"{where} {'is not a regular file' if os.path.lexists(path) else 'does not exist'}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelDirError(f"{where} is not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ModelDirError(f"{where}: header of {n} bytes does not fit the file ({size} bytes) or the "
                                f"{MAX_HEADER_BYTES}-byte bound")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ModelDirError(f"{where}: the safetensors header is not JSON nvae reads") from None
    if not isinstance(header, dict):
        raise ModelDirError(f"{where}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or extra:
        first = f"'{missing[0]}' missing" if missing else f"'{extra[0]}' unexpected"
        raise ModelDirError(f"{where}: tensors do not match the model config.json describes ({first}; "
                            f"{len(missing)} missing, {len(extra)} unexpected)")
    data_bytes, spans = size - 8 - n, []
    for name, entry in header.items():
        ok = (isinstance(entry, dict) and entry.get("dtype") in DTYPES and isinstance(entry.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
              and len(entry["data_offsets"]) == 2 and all(isinstance(o, int) for o in entry["data_offsets"]))
        if not ok:
            raise ModelDirError(f"{where}: tensor {name!r} has no valid dtype, shape and data_offsets")
        begin, end = entry["data_offsets"]
        nbytes = math.prod(entry["shape"]) * DTYPES[entry["dtype"]].itemsize
        if not 0 <= begin <= end <= data_bytes or end - begin != nbytes:
            raise ModelDirError(f"{where}: tensor {name!r} claims bytes {begin}..{end} for shape {entry['shape']} "
                                f"({nbytes} bytes) in {data_bytes} bytes of data")
        like = expected.get(name)
        if like is not None and tuple(entry["shape"]) != tuple(like.shape):
            raise ModelDirError(f"{where}: tensor {name!r} has shape {tuple(entry['shape'])}, the model needs "
                                f"{tuple(like.shape)}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise ModelDirError(f"{where}: tensors {name!r} and {other!r} overlap")


def read_weights(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, header checked first (:func:`read_header`), then values (:func:`check_state`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    expected = model.state_dict()
    read_header(path, expected)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelDirError(f"'{path}' is not a readable safetensors file ({err})") from None
    try:
        return check_state(state, expected, f"'{path}'")
    except ValueError as err:
        raise ModelDirError(str(err)) from None


def resolve(source: str | Path) -> Path:
    """A local model directory, or ``owner/name`` downloaded from the Hugging Face Hub (optional)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    local = path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")) or path.parent.exists()
    if local:  # (a folder 'runs' here makes 'runs/typo' a local path with a typo, not a Hub repository)
        raise ModelDirError(f"'{source}' is not a model directory (a folder with {CONFIG} and {WEIGHTS})")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelDirError(f"'{source}' is not a local folder, and fetching it from the Hugging Face Hub needs "
                            "pip install 'nvae[hub]'") from None
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=[CONFIG, WEIGHTS, RAW_WEIGHTS, CARD]))
    except Exception as err:  # noqa: BLE001 - offline, no such repository, no access: one line, whatever the client
        raise ModelDirError(f"'{source}': not a local folder, and the Hugging Face Hub gave no model "
                            f"({type(err).__name__})") from None


def load_model_dir(source: str | Path, device: str | torch.device, use_ema: bool, model_cls: type[nn.Module]
                   ) -> LoadedCheckpoint:
    """The model in a model directory (or a Hub repository), built as ``model_cls`` (NVAE or a subclass)
    and in eval mode on ``device``: checked as the module docstring says; the raw weights when
    ``use_ema`` is False and the directory has them."""
    folder = resolve(source)
    config = read_config(folder)
    source_name = f"model directory '{folder}'"
    try:
        spec, cfg = described_model({"image_spec": config["image_spec"], "arch": config["arch"]}, source_name, model_cls)
    except ValueError as err:
        raise ModelDirError(str(err)) from None
    model = model_cls(spec, cfg)
    if config.get("likelihood", model.likelihood_name) != model.likelihood_name:
        raise ModelDirError(f"{source_name}: likelihood {config.get('likelihood')!r} is not the "
                            f"{model.likelihood_name!r} its image_spec and arch describe")
    weights = config.get("weights", "raw")
    path = folder / WEIGHTS
    if weights == "ema" and not use_ema and (folder / RAW_WEIGHTS).is_file():
        path, weights = folder / RAW_WEIGHTS, "raw"
    model.load_state_dict(read_weights(path, model))
    if config.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    model.to(device).eval()
    hparams = {"image_spec": config["image_spec"], "arch": config["arch"],
               "channels_last": bool(config.get("channels_last"))}
    return LoadedCheckpoint(model, weights, hparams, config.get("data"), folder)


__all__ = ["ModelDirError", "load_model_dir", "read_config", "read_weights"]
