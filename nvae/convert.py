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

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from nvae.checkpoint import training_checkpoint
from nvae.guard import nonfinite_entries
from nvae.official import (OfficialFormatError, head_permutation, key_map, parameter_names, place, read_official,
                           run_from_args, to_nvae)


def convert(src: str | Path, dst: str | Path, data_root: Optional[str] = None,
            overwrite: bool = False) -> dict[str, Any]:
    """Convert ``src`` (official format) into the nvae checkpoint ``dst``; returns a summary.

    ``data_root`` replaces the data folder recorded by the official run (``args.data``). The file is
    written atomically; an existing ``dst`` is refused unless ``overwrite``.
    """
    from nvae.lightning import NVAEModule
    from nvae.resilience import AtomicTorchCheckpointIO

    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"'{dst}' exists; pass --overwrite to replace it")
    official = read_official(src)
    run = run_from_args(official["args"])
    if data_root is not None:
        run.data["init_args"]["root"] = data_root
    module = NVAEModule(arch=run.arch, image_spec=run.spec, **run.hparams)
    keys = key_map(module.model)
    module.model.load_state_dict(to_nvae(official["state_dict"], module.model, keys))
    bad = nonfinite_entries(module.model.state_dict())
    if bad:
        raise OfficialFormatError(f"'{src}': non-finite values in {len(bad)} tensor(s), e.g. official '{keys[bad[0]]}'")
    epoch, step = _count(official, "epoch"), _count(official, "global_step")
    optimizer, lr = convert_optimizer(official, module, keys)
    origin = {"source": str(src), "epoch": epoch, "global_step": step,
              "args": {k: v for k, v in vars(official["args"]).items()
                       if isinstance(v, (str, int, float, bool)) or v is None}}
    ckpt = training_checkpoint(module.state_dict(), dict(module.hparams), run.data, epoch, step, _loops(epoch, step),
                               optimizer, _scheduler_state(module, step, lr), official=origin)
    AtomicTorchCheckpointIO().save_checkpoint(ckpt, dst)
    return {"source": str(src), "checkpoint": str(dst), "dataset": official["args"].dataset,
            "parameters": sum(p.numel() for p in module.model.parameters()), "tensors": len(keys),
            "epoch": epoch, "global_step": step, "optimizer_state": bool(optimizer["state"]),
            "data_module": run.data["class_path"]}


def _count(official: Mapping[str, Any], key: str) -> int:
    value = official.get(key, 0)
    if isinstance(value, torch.Tensor):
        value = value.item()
    if not isinstance(value, int) or value < 0:
        raise OfficialFormatError(f"official checkpoint: '{key}' must be a count, got {value!r}")
    return value


def convert_optimizer(official: Mapping[str, Any], module: Any,
                      keys: Mapping[str, str]) -> tuple[dict[str, Any], float]:
    """nvae's Adamax state (``optimizer.state_dict()`` layout) from the official one, and its current lr.

    The official optimizer indexes the official model's parameters in ``parameters()`` order; each
    parameter's ``step``, ``exp_avg`` and ``exp_inf`` move to the nvae parameter it maps to (the
    likelihood head's moments reordered as its weights are). Without an official optimizer state,
    the moments start at zero.
    """
    h = module.optim
    state = official.get("optimizer")
    groups = state.get("param_groups") if isinstance(state, dict) else None
    group = groups[0] if isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict) else {}
    if state is not None and not group:
        raise OfficialFormatError("official optimizer: expected one parameter group")
    lr = float(group.get("lr", h.learning_rate))
    fresh = torch.optim.Adamax(module.parameters(), lr=lr, betas=tuple(group.get("betas", (0.9, 0.999))),
                               eps=float(group.get("eps", h.adamax_eps)),
                               weight_decay=float(group.get("weight_decay", h.weight_decay)), foreach=True)
    out = fresh.state_dict()
    out["param_groups"][0]["initial_lr"] = h.learning_rate
    if not group:
        return out, lr
    names = parameter_names(official["state_dict"])
    if len(group.get("params", ())) != len(names):
        raise OfficialFormatError(f"official optimizer holds {len(group.get('params', ()))} parameters, its model "
                                  f"{len(names)}: not this checkpoint's optimizer")
    per_name = {names[pos]: state["state"][idx] for pos, idx in enumerate(group["params"]) if idx in state["state"]}
    perm = head_permutation(module.model)
    for i, (name, p) in enumerate(module.named_parameters()):
        ours = name[len("model."):]
        entry = per_name.get(keys[ours])
        if entry is None:
            continue
        moved: dict[str, torch.Tensor] = {"step": torch.tensor(float(_step(entry)), dtype=torch.float32)}
        for kind in ("exp_avg", "exp_inf"):
            what = f"official optimizer '{kind}' of '{keys[ours]}'"
            if not isinstance(entry.get(kind), torch.Tensor):
                raise OfficialFormatError(f"{what}: missing")
            moved[kind] = place(entry[kind], ours, p, perm, what)
        out["state"][i] = moved
    return out, lr


def _step(entry: Mapping[str, Any]) -> int:
    step = entry.get("step", 0)
    return int(step.item()) if isinstance(step, torch.Tensor) else int(step)


def _scheduler_state(module: Any, step: int, lr: float) -> dict[str, Any]:
    """The state of nvae's per-step LambdaLR after ``step`` steps, at learning rate ``lr``."""
    opt = torch.optim.SGD([torch.zeros(1)], lr=module.optim.learning_rate)
    state = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0).state_dict()
    state.update(last_epoch=step, _step_count=step + 1, _last_lr=[lr])
    return state


def _loops(epoch: int, step: int) -> dict[str, Any]:
    from nvae.compat import fit_loop_state

    return fit_loop_state(epoch, step)
