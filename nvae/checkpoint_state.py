"""The training state a checkpoint carries, checked before Lightning acts on it.

Resuming hands a checkpoint's loop counters, optimizer and scheduler states, callback states and RNG
streams to Lightning and to nvae's callbacks. From a file someone else wrote, each is a lever:

- ModelCheckpoint's state names files (``best_model_path``, ``kth_best_model_path``,
  ``last_model_path``, the keys of ``best_k_models``) that Lightning *removes*, recursively, at the
  next save when they are no longer the best or last. Lightning only checks that a local path has
  the checkpoint folder among its unresolved parents, so ``dirpath/../../victim`` passes, and a path
  of another fsspec scheme (``local:///victim``) is not checked at all. :func:`sanitize_paths` keeps
  a path only when it is a plain local path that resolves inside the current run's checkpoint folder
  and is not a folder; anything else is dropped (the run then forgets that file, nothing more).
- A NaN or negative learning rate, a negative step count, RNG states that are not RNG states:
  :func:`check_training_state` refuses them in one line naming the entry, before any work.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from nvae.checkpoint import RNG_KEY

PATH_FIELDS = ("best_model_path", "kth_best_model_path", "last_model_path")  # ModelCheckpoint's state
BEST_K = "best_k_models"  # ModelCheckpoint's {path: score}
MAX_COUNTER = 2**53  # loop counters beyond this are not counts of steps that ran (float64 stops being exact)


# ------------------------------------------------------------------------------------------ paths
def is_inside(path: object, folders: Iterable[Path]) -> bool:
    """``path`` is a plain local path (no URL or fsspec scheme) of a file strictly inside one of ``folders``."""
    if not isinstance(path, str) or not path or "://" in path or "::" in path or "\x00" in path:
        return False
    try:
        resolved = Path(path).expanduser().resolve()
        if resolved.is_dir():
            return False
        return any(Path(folder).resolve() in resolved.parents for folder in folders)
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name the OS rejects
        return False


def sanitize_paths(checkpoint: dict[str, Any], folders: Iterable[Path]) -> list[str]:
    """Drop, in place, every path in the checkpoint's callback states that is not :func:`is_inside`
    ``folders`` (the run's checkpoint folders); returns ``"<callback>.<field>: <path>"`` for each one dropped."""
    folders = [Path(f) for f in folders if f is not None]
    dropped = []
    for name, state in (checkpoint.get("callbacks") or {}).items():
        if not isinstance(state, dict):
            continue
        short = str(name).split("{", 1)[0]
        for field in PATH_FIELDS:
            if field in state and state[field] not in ("", None) and not is_inside(state[field], folders):
                dropped.append(f"{short}.{field}: {state[field]!r}")
                state[field] = ""
        if isinstance(state.get(BEST_K), dict):
            for path in [p for p in state[BEST_K] if not is_inside(p, folders)]:
                dropped.append(f"{short}.{BEST_K}: {path!r}")
                del state[BEST_K][path]
    return dropped


# ------------------------------------------------------------------------------------------ numbers
def _counter(value: object, entry: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNTER:
        raise ValueError(f"{entry} must be an integer in 0..2^53, got {value!r}")


def _rate(value: object, entry: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{entry} must be a finite number >= 0, got {value!r}")


def check_training_state(checkpoint: Mapping[str, Any], source: str) -> None:
    """ValueError naming the entry when the loop counters, the optimizer's learning rates or the
    schedulers' base rates are not finite, non-negative numbers, or the RNG states are not RNG states."""
    for key in ("epoch", "global_step"):
        if key in checkpoint:
            _counter(checkpoint[key], f"{source}: {key}")
    for i, opt in enumerate(checkpoint.get("optimizer_states") or []):
        groups = opt.get("param_groups") if isinstance(opt, dict) else None
        if not isinstance(groups, list):
            raise ValueError(f"{source}: optimizer_states[{i}].param_groups must be a list")
        for j, group in enumerate(groups):
            for key in ("lr", "initial_lr", "weight_decay"):
                if isinstance(group, dict) and key in group:
                    _rate(group[key], f"{source}: optimizer_states[{i}].param_groups[{j}].{key}")
    for i, sched in enumerate(checkpoint.get("lr_schedulers") or []):
        if not isinstance(sched, dict):
            raise ValueError(f"{source}: lr_schedulers[{i}] must be a dict")
        for key in ("base_lrs", "_last_lr"):
            for j, lr in enumerate(sched.get(key) or []):
                _rate(lr, f"{source}: lr_schedulers[{i}].{key}[{j}]")
    if checkpoint.get(RNG_KEY) is not None:
        check_rng_states(checkpoint[RNG_KEY], f"{source}: {RNG_KEY}")


def check_rng_states(states: object, entry: str) -> None:
    """ValueError naming ``entry`` unless every saved state is one the RNGs accept: each is tried
    (torch, Python, NumPy set from it) and this process's states are put back whatever happens."""
    from nvae.resilience import rng_state, set_rng_state

    if not isinstance(states, list) or not states:
        raise ValueError(f"{entry} must be a non-empty list of per-process RNG states")
    current = rng_state()
    try:
        for rank, state in enumerate(states):
            try:
                if not isinstance(state, dict) or not {"torch", "python", "numpy"} <= set(state):
                    raise TypeError("needs torch, python and numpy states")
                set_rng_state({k: v for k, v in state.items() if k != "cuda"})
            except (TypeError, ValueError, RuntimeError, IndexError, KeyError, OverflowError, AttributeError) as err:
                raise ValueError(f"{entry}[{rank}] is not an RNG state ({err})") from None
    finally:
        set_rng_state(current)
