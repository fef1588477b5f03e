"""An official NVAE checkpoint (NVlabs/NVAE) as an nvae checkpoint (the command: :mod:`nvae.cli.convert`).

The result is an ordinary nvae checkpoint: ``sample.py``, ``evaluate.py`` and ``train.py --resume``
accept it. It holds the official weights and BatchNorm statistics (:mod:`nvae.official` maps every
tensor), the architecture and training hyper-parameters its ``args`` describe, the matching data
module, and, for ``--resume``, the Adamax moments and step counts, the epoch and step reached
(Lightning's loop counters) and the learning rate. The likelihood keeps the official code's bins
(``model.arch.dmol_bins: official``), so the converted model computes the official function.

Not carried over: the power-iteration vectors of the spectral regularizer (the official file has
none: they start afresh, with the long first iteration), and the official schedule's shape: nvae
decays the learning rate by a per-step cosine over the run it is given, the official code by a
per-epoch cosine (the warm-up and KL schedules are the same functions of the step).
"""
from __future__ import annotations

import math
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from nvae.checkpoint import training_checkpoint
from nvae.limits import check_fits
from nvae.model import NVAE
from nvae.official import (OfficialRun, check_layout, head_permutation, layout_keys, parameter_names, place,
                           read_official, run_from_args, to_nvae)
from nvae.official_checks import OfficialFormatError, check_count, check_optimizer, check_step


def convert(src: str | Path, dst: str | Path, data_root: Optional[str] = None,
            overwrite: bool = False) -> dict[str, Any]:
    """Convert ``src`` (official format) into the nvae checkpoint ``dst`` (a ``.ckpt`` file: a training
    checkpoint for ``--resume``) or, for any other name, the model directory ``dst``
    (:mod:`nvae.pretrained`: config.json, model.safetensors and a model card); returns a summary.

    ``data_root`` replaces the data folder recorded by the official run (``args.data``). Everything
    in ``src`` nvae uses is checked before a model is allocated (:mod:`nvae.official_checks`, then the
    names and shapes against the model laid out on the meta device), so the model built is no larger
    than the file's own tensors. ``dst`` is written atomically and is never ``src`` itself; an existing
    ``dst`` is refused unless ``overwrite``.
    """
    from nvae.lightning import NVAEModule

    dst = Path(dst)
    as_dir = dst.suffix != ".ckpt"
    _check_destination(Path(src), dst, overwrite, as_dir)
    official = read_official(src)
    run = run_from_args(official["args"])
    if data_root is not None:
        run.data["init_args"]["root"] = data_root
    epoch, step = check_count(official, "epoch"), check_count(official, "global_step")
    keys = planned_keys(run, official["state_dict"])
    group = check_optimizer(official.get("optimizer"), parameter_names(official["state_dict"]))
    module = NVAEModule(arch=run.arch, image_spec=run.spec, **run.hparams)
    module.model.load_state_dict(to_nvae(official["state_dict"], module.model, keys))
    optimizer, lr = convert_optimizer(official, group, module, keys)
    args = {k: v for k, v in vars(official["args"]).items() if _recordable(v)}
    if as_dir:
        write_model_dir(module, Path(src), dst, run, args, epoch, step, overwrite)
    else:
        origin = {"source": str(src), "epoch": epoch, "global_step": step, "args": args}
        ckpt = training_checkpoint(module.state_dict(), dict(module.hparams), run.data, epoch, step,
                                   _loops(epoch, step), optimizer, _scheduler_state(module, step, lr), official=origin)
        save_atomically(ckpt, dst)
    return {"source": str(src), "checkpoint": str(dst), "format": "directory" if as_dir else "checkpoint",
            "dataset": official["args"].dataset, "parameters": sum(p.numel() for p in module.model.parameters()),
            "tensors": len(keys), "epoch": epoch, "global_step": step, "optimizer_state": bool(optimizer["state"]),
            "data_module": run.data["class_path"], "filled": run.filled}


def write_model_dir(module: Any, src: Path, dst: Path, run: OfficialRun, args: dict[str, Any], epoch: int,
                    step: int, overwrite: bool) -> None:
    """The converted model as a model directory, its card saying where it came from and NVIDIA's licence."""
    from nvae.cli.export import model_card
    from nvae.pretrained_save import save_model_dir, sha256

    provenance = {"source": src.name, "sha256": sha256(src), "official_args": args, "epoch": epoch,
                  "global_step": step, "filled_defaults": run.filled, "weights": "raw"}
    save_model_dir(module.model, dst, data=run.data, provenance=provenance,
                   card=model_card(module.model, run.data, provenance), channels_last=bool(module.channels_last),
                   overwrite=overwrite, sources=[src])


def planned_keys(run: OfficialRun, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """nvae key -> official key, once the model ``run`` describes fits this machine's memory
    (:func:`nvae.limits.check_fits`) and, laid out on the meta device (no memory), has the names and
    shapes of ``state``: the model then allocated is the size of the file's own tensors."""
    try:
        check_fits(run.spec, run.arch, NVAE, source="official args")
        with torch.device("meta"):
            model = NVAE(run.spec, run.arch)
    except ValueError as err:  # nvae's own bounds on a model (nvae.limits, the geometry)
        message = str(err)
        raise OfficialFormatError(message if message.startswith("official args") else f"official args: {message}") \
            from None
    keys = layout_keys(state, model)  # the default (SyncBatchNorm) layout or the flat one, as the file is written
    check_layout(state, model, keys)
    return keys


def _check_destination(src: Path, dst: Path, overwrite: bool, as_dir: bool = False) -> None:
    """``dst`` may not be ``src`` (by any path or link), nor a device, named pipe or socket, nor a folder
    for a ``.ckpt`` (a file for a model directory), nor an existing checkpoint or model directory
    without ``overwrite``."""
    from nvae.pretrained_save import check_destination

    _refuse_special(dst)
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise FileExistsError(f"'{dst}' is the official checkpoint being converted; write to another file")
    if as_dir:
        check_destination(dst, overwrite, [src])  # a new or empty folder, or a model directory to overwrite
        return
    if dst.is_dir():
        raise IsADirectoryError(f"'{dst}' is a folder; name the checkpoint file to write")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"'{dst}' exists; pass --overwrite to replace it")


def _refuse_special(dst: Path) -> None:
    """ValueError when ``dst`` itself (``os.lstat``: a symlink is not followed, and the rename replaces
    the link only) is a device, named pipe or socket: a rename over ``/dev/null`` would replace the
    system's /dev/null."""
    try:
        mode = os.lstat(dst).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), None)
    if kind:
        raise ValueError(f"'{dst}' is {kind}, not a file; nvae never replaces it")


def save_atomically(ckpt: dict[str, Any], dst: Path) -> None:
    """``torch.save`` to a fresh temporary name beside ``dst``, fsync, rename over ``dst``: a failure
    midway (a full disk) leaves ``dst`` as it was and no temporary file; it raises one ``OSError`` line.
    A ``dst`` that is (or has meanwhile become) a device, named pipe or socket is never replaced (ValueError)."""
    tmp: Optional[Path] = None
    try:
        _refuse_special(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        name = dst.with_name(f".{dst.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # a new file, the umask's permissions
        tmp = name
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        _refuse_special(dst)
        os.replace(tmp, dst)
    except (OSError, RuntimeError) as err:  # torch's zip writer turns a failed write into a RuntimeError
        cause = err if isinstance(err, OSError) else err.__context__
        if not isinstance(cause, OSError):
            raise
        raise OSError(f"cannot write '{dst}' ({cause.strerror or cause}); nothing written") from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def _recordable(value: Any) -> bool:
    """An official argument worth recording in the converted file: a string, bool, int, finite float or None."""
    return isinstance(value, (str, int, bool)) or value is None or (isinstance(value, float) and math.isfinite(value))


def convert_optimizer(official: Mapping[str, Any], group: Optional[Mapping[str, Any]], module: Any,
                      keys: Mapping[str, str]) -> tuple[dict[str, Any], float]:
    """nvae's Adamax state (``optimizer.state_dict()`` layout) from the official one, and its current lr.

    ``group``: the official parameter group, checked by :func:`nvae.official_checks.check_optimizer`
    (None without an official optimizer state: the moments then start at zero). The official
    optimizer indexes the official model's parameters in ``parameters()`` order; each parameter's
    ``step``, ``exp_avg`` and ``exp_inf`` move to the nvae parameter it maps to (the likelihood
    head's moments reordered as its weights are).
    """
    h, group = module.optim, group or {}
    lr = float(group.get("lr", h.learning_rate))
    fresh = torch.optim.Adamax(module.parameters(), lr=lr, betas=tuple(group.get("betas", (0.9, 0.999))),
                               eps=float(group.get("eps", h.adamax_eps)),
                               weight_decay=float(group.get("weight_decay", h.weight_decay)), foreach=True)
    out = fresh.state_dict()
    out["param_groups"][0]["initial_lr"] = h.learning_rate
    if not group:
        return out, lr
    state = official["optimizer"]["state"]
    names = parameter_names(official["state_dict"])
    per_name = {name: state[idx] for name, idx in zip(names, group["params"]) if idx in state}
    perm = head_permutation(module.model)
    for i, (name, p) in enumerate(module.named_parameters()):
        ours = name[len("model."):]
        entry = per_name.get(keys[ours])
        if entry is None:
            continue
        step = check_step(entry.get("step", 0), f"official optimizer state of '{keys[ours]}': 'step'")
        moved: dict[str, torch.Tensor] = {"step": torch.tensor(float(step), dtype=torch.float32)}
        for kind in ("exp_avg", "exp_inf"):
            moved[kind] = place(entry[kind], ours, p, perm, f"official optimizer state of '{keys[ours]}': '{kind}'")
        out["state"][i] = moved
    return out, lr


def _scheduler_state(module: Any, step: int, lr: float) -> dict[str, Any]:
    """The state of nvae's per-step LambdaLR after ``step`` steps, at learning rate ``lr``."""
    opt = torch.optim.SGD([torch.zeros(1)], lr=module.optim.learning_rate)
    state = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0).state_dict()
    state.update(last_epoch=step, _step_count=step + 1, _last_lr=[lr])
    return state


def _loops(epoch: int, step: int) -> dict[str, Any]:
    from nvae.compat import fit_loop_state

    return fit_loop_state(epoch, step)
