"""The nvae checkpoint format in one place: its entries, version, compatibility, safe reading, and
rebuilding a model from it.

A checkpoint is a Lightning checkpoint whose hyper-parameters hold the architecture and image spec
as plain dicts, plus nvae's entries: the data module that trained it (``nvae_data``: class path and
arguments), the EMA weights when kept (``nvae_ema``), every process's RNG states (``nvae_rng``),
the format version (``nvae_format``) and, in a converted official checkpoint, where it came from
(``nvae_official``). Every key is a constant here; other modules use the constants.

A checkpoint cannot run code. ``torch.load(weights_only=True)`` stops pickle from calling anything;
:func:`check_names` stops the second way, a name in the file that a loader would import and call:
the data module's class path resolves only to nvae's data modules or classes the user registered
(:mod:`nvae.data.registry`), Lightning's ``_instantiator`` only to Lightning's own, ``_class_path``
only to ``NVAEModule`` or a subclass already defined in this process; weight entries must be
tensors. Every loader (sample.py, evaluate.py, ``--resume``, ``NVAEModule.load_from_checkpoint``)
checks the file this way before anything named in it is imported or instantiated.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from nvae.data.registry import UntrustedName, class_path, datamodule_class, subclasses
from nvae.hparams import group_flat_hparams
from nvae.limits import check_archive
from nvae.loading import LoadedCheckpoint, check_state, described_model
from nvae.model import NVAE, NVAEConfig
from nvae.pretrained import load_model_dir

STATE_KEY = "state_dict"  # Lightning's: the LightningModule's state dict (the NVAE's under "model.")
HPARAMS_KEY = "hyper_parameters"  # Lightning's: NVAEModule's hyper-parameters ("arch", "image_spec", ...)
DATAMODULE_HPARAMS_KEY = "datamodule_hyper_parameters"  # Lightning's: the data module's, when it saved them
DATA_KEY = "nvae_data"  # the data module that trained the model: {"class_path": ..., "init_args": {...}}
EMA_KEY = "nvae_ema"  # exponential moving average of the model weights, if kept (a state dict)
RNG_KEY = "nvae_rng"  # every process's RNG states (exact resume)
FORMAT_KEY = "nvae_format"  # layout version of nvae checkpoints
FORMAT_VERSION = 3  # 3: hyper-parameters in groups (model.optim / objective / guard), the step guard's counters
# as its callback's state. 2 (flat hyper-parameters, guard.* buffers) is upgraded on reading (:func:`upgrade`).
# 1 held another network (before the official architecture) and is refused.
READABLE_FORMATS = (2, 3)
CALLBACKS_KEY = "callbacks"  # Lightning's: each callback's state, by its state_key
GUARD_STATE_KEY = "GuardedSteps"  # nvae.callbacks.GuardedSteps' state_key: the step guard's counters
LR_SCHEDULERS_KEY = "lr_schedulers"  # Lightning's: the schedulers' states
OFFICIAL_KEY = "nvae_official"  # a converted official checkpoint's origin: {"source", "epoch", "global_step", "args"}
LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"  # what LightningCLI records
# model.arch fields a checkpoint may be resumed with another value of: no tensor depends on them
FREE_ARCH_FIELDS = ("dmol_bins", "backend", "fused_ops")  # the likelihood's bins; how the layers run (nvae.accel)


# ------------------------------------------------------------------------------------------ safe reading
def read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of ``path``, then :func:`check_names`; one-line errors.
    ``mmap`` maps the tensors instead of reading them (a cheap look at the names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        check_archive(path, f"'{path}'")  # nothing inflates beyond what the file holds
    except ValueError as err:
        raise ValueError(f"{err} (not a readable checkpoint)") from None
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"'{path}' is not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"'{path}' is not an nvae checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    check_names(ckpt, f"checkpoint '{path}'")
    return upgrade(ckpt, f"checkpoint '{path}'")


def check_names(ckpt: Mapping[str, Any], source: str) -> None:
    """Refuse (:class:`UntrustedName`) any entry of ``ckpt`` that names code nvae does not allow.

    Checked without importing anything: ``nvae_data.class_path`` and the ``_class_path`` of
    ``datamodule_hyper_parameters`` and ``nvae_data.init_args`` (data modules), ``hyper_parameters._class_path``
    (NVAEModule or a subclass already defined here), ``*._instantiator`` (Lightning's own only), and
    the EMA entry (a dict of tensors).
    """
    data = ckpt.get(DATA_KEY)
    if data is not None:
        if not isinstance(data, dict) or not isinstance(data.get("init_args", {}), dict):
            raise UntrustedName(f"{source}: {DATA_KEY} must be a dict with class_path and init_args")
        datamodule_class(data.get("class_path"), f"{source}: {DATA_KEY}.class_path")
    entries = {HPARAMS_KEY: ckpt.get(HPARAMS_KEY),
               DATAMODULE_HPARAMS_KEY: ckpt.get(DATAMODULE_HPARAMS_KEY),
               f"{DATA_KEY}.init_args": (data or {}).get("init_args")}
    for key, hparams in entries.items():
        if hparams is None:
            continue
        if not isinstance(hparams, dict):
            raise UntrustedName(f"{source}: {key} must be a dict, got {type(hparams).__name__}")
        instantiator = hparams.get("_instantiator")
        if instantiator is not None and instantiator != LIGHTNING_INSTANTIATOR:
            raise UntrustedName(f"{source}: {key}._instantiator {instantiator!r} is not Lightning's own "
                                f"({LIGHTNING_INSTANTIATOR}); it was not imported")
        if "_class_path" in hparams:
            entry = f"{source}: {key}._class_path"
            if key != HPARAMS_KEY:
                datamodule_class(hparams["_class_path"], entry)
            else:
                check_module_name(hparams["_class_path"], entry)
    if ckpt.get(EMA_KEY) is not None:
        check_tensors(ckpt[EMA_KEY], f"{source}: {EMA_KEY}")


MODULE_CLASS = "nvae.lightning.NVAEModule"  # what LightningCLI records as the model's _class_path


def check_module_name(name: object, entry: str) -> None:
    """Refuse a model class path other than ``NVAEModule`` or a subclass of it already defined in this
    process; the name is compared, nothing is imported (nvae.lightning need not be loaded)."""
    import lightning

    defined = {class_path(cls) for cls in subclasses(lightning.LightningModule)
               if MODULE_CLASS in (class_path(base) for base in cls.__mro__)}
    if not isinstance(name, str) or name not in defined | {MODULE_CLASS}:
        raise UntrustedName(f"{entry}: {name!r} is not nvae.lightning.NVAEModule or a subclass of it defined "
                            "in this process; it was not imported")


def check_tensors(state: object, entry: str) -> dict[str, torch.Tensor]:
    """``state`` if it is a dict of name -> tensor; :class:`UntrustedName` naming ``entry`` otherwise."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UntrustedName(f"{entry} must be a dict of tensors")
    return state


# ------------------------------------------------------------------------------------------ version, compatibility
def check_format(ckpt: Mapping[str, Any], source: str) -> None:
    """ValueError unless ``ckpt`` is of a format this nvae reads (:data:`READABLE_FORMATS`; naming what to do)."""
    fmt = ckpt.get(FORMAT_KEY, FORMAT_VERSION)
    if fmt in READABLE_FORMATS:
        return
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise ValueError(f"{source}: checkpoint format {fmt} is newer than the format {FORMAT_VERSION} this nvae "
                         "reads; upgrade nvae")
    readable = ", ".join(map(str, READABLE_FORMATS))
    raise ValueError(f"{source}: checkpoint format {fmt} is not one this nvae reads ({readable}): it was "
                     "written by nvae 0.1 before the architecture became the official NVAE's (up-sampling skip and "
                     "flow convolutions without bias, ELU twice in the flows, top prior sigma 1.01); retrain it, "
                     "or use it with the nvae that wrote it")


def upgrade(ckpt: dict[str, Any], source: str) -> dict[str, Any]:
    """``ckpt`` brought to :data:`FORMAT_VERSION` in place (and returned); a format-2 checkpoint gets its
    flat hyper-parameters grouped (:func:`nvae.hparams.group_flat_hparams`), its ``guard.*`` buffers
    moved to the guard callback's state, and a rollback's learning-rate factor (``guard.lr_scale``,
    once applied by the schedule) folded into the scheduler's base rates, where format 3 keeps it."""
    check_format(ckpt, source)
    if ckpt.get(FORMAT_KEY, FORMAT_VERSION) == 2:
        if isinstance(ckpt.get(HPARAMS_KEY), dict):
            ckpt[HPARAMS_KEY] = group_flat_hparams(ckpt[HPARAMS_KEY])
        state = ckpt.get(STATE_KEY) or {}
        guard = {k[len("guard."):]: state.pop(k) for k in list(state) if k.startswith("guard.")}
        if guard:
            ckpt.setdefault(CALLBACKS_KEY, {})[GUARD_STATE_KEY] = guard
            scale = float(guard.get("lr_scale", 1.0))
            for sched in ckpt.get(LR_SCHEDULERS_KEY) or []:
                if scale != 1.0 and isinstance(sched, dict) and "base_lrs" in sched:
                    sched["base_lrs"] = [lr * scale for lr in sched["base_lrs"]]
        ckpt[FORMAT_KEY] = FORMAT_VERSION
    return ckpt


def check_compatible(checkpoint: Mapping[str, Any], hparams: Mapping[str, Any]) -> None:
    """Raise ValueError naming what differs between a checkpoint and the model it is loaded into."""
    check_format(checkpoint, "checkpoint")
    saved = checkpoint.get(HPARAMS_KEY, {})
    diffs = []
    defaults = {"arch": {f.name: f.default for f in fields(NVAEConfig)}, "image_spec": {}}
    for group in ("arch", "image_spec"):
        old, new = saved.get(group) or {}, hparams.get(group) or {}
        for key in sorted(set(old) | set(new)):
            if key in FREE_ARCH_FIELDS:  # the configuration's choice applies
                continue
            default = defaults[group].get(key)  # a field newer than the checkpoint: its default held then
            if old.get(key, default) != new.get(key, default):
                diffs.append(f"model.{group}.{key}: checkpoint {old.get(key)!r}, config {new.get(key)!r}")
    if diffs:
        raise ValueError("checkpoint does not fit this configuration: " + "; ".join(diffs))


def training_checkpoint(state_dict: Mapping[str, torch.Tensor], hparams: dict[str, Any], data: dict[str, Any],
                        epoch: int, global_step: int, loops: dict[str, Any], optimizer: dict[str, Any],
                        lr_scheduler: dict[str, Any], official: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A checkpoint of this format made outside a Trainer (:mod:`nvae.convert`), in the layout Lightning
    writes and ``--resume`` reads: weights, hyper-parameters, loop counters, optimizer and scheduler
    states, plus nvae's entries (``official``: the origin of a converted checkpoint)."""
    import lightning

    ckpt = {"epoch": epoch, "global_step": global_step, "pytorch-lightning_version": lightning.__version__,
            STATE_KEY: state_dict, HPARAMS_KEY: hparams, "loops": loops, "optimizer_states": [optimizer],
            LR_SCHEDULERS_KEY: [lr_scheduler], DATA_KEY: data, FORMAT_KEY: FORMAT_VERSION}
    if official is not None:
        ckpt[OFFICIAL_KEY] = official
    return ckpt


# ------------------------------------------------------------------------------------------ rebuilding
def model_hparams(ckpt: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The model hyper-parameters of an nvae checkpoint of this format; ValueError if it has none, no
    state dict, or another format."""
    hparams = ckpt.get(HPARAMS_KEY)
    if STATE_KEY not in ckpt or not isinstance(hparams, dict) or "arch" not in hparams:
        raise ValueError(f"{source} is not an nvae checkpoint (no model hyper-parameters / state_dict)")
    check_format(ckpt, source)
    return hparams


def build_model(hparams: Mapping[str, Any], source: str) -> NVAE:
    """The NVAE that ``hparams`` describe, built once :func:`described_model` has checked its size."""
    return NVAE(*described_model(hparams, source, NVAE))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> LoadedCheckpoint:
    """Read ``path`` safely (:func:`read_checkpoint`) and rebuild its NVAE (EMA weights when present and
    ``use_ema``); the weights are checked (:func:`check_state`) before they are loaded. A folder is read
    as a model directory (:func:`nvae.pretrained.load_model_dir`)."""
    path = Path(path)
    if path.is_dir():
        return load_model_dir(path, device, use_ema, NVAE)
    ckpt = read_checkpoint(path)
    source = f"checkpoint '{path}'"
    hparams = model_hparams(ckpt, f"'{path}'")
    model = build_model(hparams, source)
    weights = "raw"
    raw = check_tensors(ckpt[STATE_KEY], f"{source}: {STATE_KEY}")
    state = {k[len("model."):]: v for k, v in raw.items() if k.startswith("model.")}
    entry = f"{source}: {STATE_KEY}"
    if use_ema and ckpt.get(EMA_KEY):
        state, weights, entry = ckpt[EMA_KEY], "ema", f"{source}: {EMA_KEY}"
    model.load_state_dict(check_state(state, model.state_dict(), entry))
    if hparams.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    model.to(device).eval()
    return LoadedCheckpoint(model, weights, hparams, ckpt.get(DATA_KEY), path)


def build_datamodule(data: Optional[dict[str, Any]], **overrides: Any) -> Any:
    """Instantiate a checkpoint's recorded data module (an allowed class only: see :func:`check_names`);
    ``overrides`` (e.g. root, eval_batch_size) win when not None."""
    if not data:
        raise ValueError("the checkpoint records no data module: name one with --data CLASS_PATH [--data-root DIR]")
    cls = datamodule_class(data.get("class_path"), f"{DATA_KEY}.class_path")
    return instantiate_datamodule(cls, offline(data.get("init_args", {})), overrides)


def load_datamodule(path: str | Path, cls: Optional[type] = None, **overrides: Any) -> Any:
    """The data module the checkpoint at ``path`` recorded, rebuilt safely: the file is read with
    ``weights_only=True`` and its names checked (:func:`check_names`); the class is ``cls`` when given,
    else the recorded one (an allowed data module). ``overrides`` replace recorded arguments."""
    checkpoint = read_checkpoint(path, map_location="cpu")
    recorded = checkpoint.get(DATA_KEY) or {}
    saved = checkpoint.get(DATAMODULE_HPARAMS_KEY) or recorded.get("init_args") or {}
    if cls is None:
        cls = datamodule_class(recorded.get("class_path") or saved.get("_class_path"),
                               f"checkpoint '{path}': {DATA_KEY}.class_path")
    init_args = offline({k: v for k, v in saved.items() if not k.startswith("_")})
    return instantiate_datamodule(cls, {**init_args, **overrides}, {})


def offline(init_args: Mapping[str, Any]) -> dict[str, Any]:
    """A data module's arguments read from a file, with downloading off: a checkpoint never chooses
    network access, nor (torchvision creates its root to download into) a folder to create."""
    return {**init_args, "download": False} if "download" in init_args else dict(init_args)


def instantiate_datamodule(cls: type, init_args: Mapping[str, Any], overrides: Mapping[str, Any]) -> Any:
    """``cls(**init_args, **overrides)``, keeping only the arguments ``cls`` accepts (overrides: when not None)."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    args = {k: v for k, v in init_args.items() if k in accepted}
    args.update({k: v for k, v in overrides.items() if v is not None and k in accepted})
    try:
        return cls(**args)
    except TypeError as err:  # a missing argument, or one of the wrong type ('abc' < 1)
        raise ValueError(f"data module {cls.__name__}: the recorded arguments do not fit it ({err})") from None
