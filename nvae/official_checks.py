"""What an official checkpoint holds, checked before nvae builds or allocates anything from it.

A checkpoint from someone else is data to judge: a field of the wrong type, out of range or not
finite stops the conversion with one :class:`OfficialFormatError` line naming it; nothing is
converted silently (``int(3.7)``, ``bool("no")``) and nothing raises a traceback. Checked here, each
where nvae uses it: the ``args`` fields nvae maps, the state dict's entries as tensors (type,
dtype, storage, finiteness; their names and shapes are :func:`nvae.official.check_layout`'s), the
Adamax state nvae carries over, ``epoch`` and ``global_step``. Not read, so not checked: the
``scheduler``, ``grad_scalar`` and ``arch_instance`` entries, the ``args`` nvae does not map (``seed``,
``epochs``, ...), parameter-group entries besides ``params``, ``lr``, ``betas``, ``eps`` and
``weight_decay``, and optimizer states of indices no parameter group lists.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Mapping, Optional

import torch


class OfficialFormatError(ValueError):
    """An official checkpoint nvae cannot read or map (the message names the field or tensor)."""


# ------------------------------------------------------------------------------------------ limits
# The paper's six presets (../shared/fixtures/official/manifest) reach at most: 192 channels
# (ImageNet-32), 5 latent scales, 2 preprocessing blocks of 3 cells (MNIST), 30 groups per scale
# (CIFAR-10), 20 latents per group, 2 cells per group, 2 flow pairs (CelebA-HQ, FFHQ), 10 mixture
# components, batch 200 (MNIST) and 292 cells in all (CelebA-HQ: 36 groups of 2 + 2 cells and 2 x 2
# flow cells, plus 4 pre/postprocessing cells). Each limit leaves room (5x the paper or more) yet
# keeps the layout check within seconds: it builds the model on the meta device (no memory; the
# time grows with the modules built, ~4,000 for CelebA-HQ). Memory is bounded by that check and by
# nvae.limits.check_fits (the model's bytes against the memory available), not by these numbers: the
# model nvae then allocates matches the file's own tensors shape for shape.
INT_LIMITS: dict[str, tuple[int, int]] = {
    "num_channels_enc": (1, 2048), "num_channels_dec": (1, 2048),
    "num_latent_scales": (1, 8),  # 2^8 = 256, the largest official image side (per data set: _check_geometry)
    "num_groups_per_scale": (1, 256), "min_groups_per_scale": (1, 256), "num_latent_per_group": (1, 1024),
    "num_preprocess_blocks": (1, 8), "num_postprocess_blocks": (1, 8),
    "num_preprocess_cells": (1, 32), "num_postprocess_cells": (1, 32),
    "num_cell_per_cond_enc": (1, 32), "num_cell_per_cond_dec": (1, 32),
    "num_nf": (0, 16), "num_mixture_dec": (1, 256), "num_x_bits": (1, 8), "batch_size": (1, 1 << 16),
}
MAX_CELLS = 1024
"""Cells in all (encoder, decoder, flows, pre/postprocessing): 3.5x the paper's 292; ~5 s to lay out."""
MAX_COUNT = 2 ** 24
"""Largest epoch or step: the float32 Adamax step counts exactly up to 2^24 (16.7M); the paper's
longest runs take well under a million steps."""
# name -> (lowest, highest, lowest allowed): the ranges nvae's optim and objective groups accept
FLOAT_LIMITS: dict[str, tuple[float, float, bool]] = {
    "learning_rate": (0.0, math.inf, False), "learning_rate_min": (0.0, math.inf, True),
    "weight_decay": (0.0, math.inf, True), "warmup_epochs": (0.0, math.inf, True),
    "kl_anneal_portion": (0.0, 1.0, True), "kl_const_portion": (0.0, 1.0, True), "kl_const_coeff": (0.0, 1.0, True),
    "weight_decay_norm": (0.0, math.inf, True), "weight_decay_norm_init": (0.0, math.inf, True),
}
BOOL_FIELDS = ("ada_groups", "use_se", "res_dist", "weight_decay_norm_anneal")
STR_FIELDS = ("dataset", "arch_instance", "data")


# ------------------------------------------------------------------------------------------ values
def _integer(value: Any, what: str, low: int, high: int) -> int:
    """``value`` as an int in [low, high]; a bool, float, string, None, list or tensor is refused."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise OfficialFormatError(f"{what}: must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise OfficialFormatError(f"{what}: {_show(value)} is outside {low}..{high}")
    return value


def _number(value: Any, what: str, low: float, high: float, low_allowed: bool = True) -> float:
    """``value`` (int or float, not bool) as a finite float in its range."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise OfficialFormatError(f"{what}: must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise OfficialFormatError(f"{what}: must be finite, got {value}")
    if value < low or (value == low and not low_allowed) or value > high:
        bound = f"{'>=' if low_allowed else '>'} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        raise OfficialFormatError(f"{what}: must be {bound}, got {value:g}")
    return value


def _show(value: Any) -> str:
    """A short description of a value for an error line (never a whole list or tensor)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"  # repr() refuses ints over 4,300 digits
    if isinstance(value, (bool, int, float, str)) or value is None:
        text = repr(value)
        return text if len(text) <= 40 else f"{text[:37]}..."
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


# ------------------------------------------------------------------------------------------ the file
def check_checkpoint(ckpt: Any, path: str) -> None:
    """A dict with ``args`` (the official ``argparse.Namespace``) and a ``state_dict`` dict."""
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "args" not in ckpt:
        raise OfficialFormatError(f"'{path}' is not an official NVAE checkpoint (no 'state_dict' and 'args')")
    if not isinstance(ckpt["args"], argparse.Namespace):
        raise OfficialFormatError(f"'{path}': 'args' is a {type(ckpt['args']).__name__}, not the official Namespace")
    if not isinstance(ckpt["state_dict"], dict):
        raise OfficialFormatError(f"'{path}': 'state_dict' is a {type(ckpt['state_dict']).__name__}, not a dict")


# ------------------------------------------------------------------------------------------ args
def check_args(args: Mapping[str, Any], sizes: Mapping[str, int]) -> None:
    """Every ``args`` field nvae maps, where present, of the right type and within its limits
    (``sizes``: image side per official data set); a missing field is :func:`nvae.official.run_from_args`'s
    to name. Raises before anything is built."""
    for name in STR_FIELDS:
        if name in args and not isinstance(args[name], str):
            raise OfficialFormatError(f"official args: {name}: must be a string, got {_show(args[name])}")
    for name in BOOL_FIELDS:
        if name in args and not isinstance(args[name], bool):
            raise OfficialFormatError(f"official args: {name}: must be True or False, got {_show(args[name])}")
    mnist = args.get("dataset") == "mnist"
    for name, (low, high) in INT_LIMITS.items():
        if name in args and not (name == "num_x_bits" and mnist):  # MNIST is binarized whatever the flag
            _integer(args[name], f"official args: {name}", low, high)
    anneal = args.get("weight_decay_norm_anneal", False)
    for name, (low, high, low_allowed) in FLOAT_LIMITS.items():
        if name in args and (name != "weight_decay_norm_init" or anneal):
            _number(args[name], f"official args: {name}", low, high, low_allowed)
    _check_geometry(args, sizes)
    _check_cells(args)


def _check_geometry(args: Mapping[str, Any], sizes: Mapping[str, int]) -> None:
    """The image side must be divisible by the total downsampling: 2^(preprocess blocks + scales - 1)."""
    if not {"dataset", "num_preprocess_blocks", "num_latent_scales"} <= set(args) or args["dataset"] not in sizes:
        return
    size, blocks, scales = sizes[args["dataset"]], args["num_preprocess_blocks"], args["num_latent_scales"]
    if 2 ** (blocks + scales - 1) > size:
        raise OfficialFormatError(f"official args: num_latent_scales: {scales} scales after {blocks} preprocessing "
                                  f"block(s) downsample by {2 ** (blocks + scales - 1)}, more than "
                                  f"{args['dataset']}'s {size}x{size} images allow")


def _check_cells(args: Mapping[str, Any]) -> None:
    """At most :data:`MAX_CELLS` cells in all (the groups per scale as nvae's ``groups_per_scale``)."""
    needed = ("num_groups_per_scale", "num_latent_scales", "num_cell_per_cond_enc", "num_cell_per_cond_dec",
              "num_preprocess_blocks", "num_preprocess_cells", "num_postprocess_blocks", "num_postprocess_cells")
    if not set(needed) <= set(args):
        return
    groups, n = 0, args["num_groups_per_scale"]
    for _ in range(args["num_latent_scales"]):
        groups += n
        if args.get("ada_groups", False):
            n = max(args.get("min_groups_per_scale", 1), n // 2)
    per_group = args["num_cell_per_cond_enc"] + args["num_cell_per_cond_dec"] + 2 * args.get("num_nf", 0)
    cells = (groups * per_group + args["num_preprocess_blocks"] * args["num_preprocess_cells"]
             + args["num_postprocess_blocks"] * args["num_postprocess_cells"])
    if cells > MAX_CELLS:
        raise OfficialFormatError(f"official args: num_groups_per_scale: {groups} latent groups of {per_group} cells "
                                  f"make {cells} cells, more than the {MAX_CELLS} nvae lays out "
                                  "(the paper's largest model has 292)")


# ------------------------------------------------------------------------------------------ counters
def check_count(official: Mapping[str, Any], key: str) -> int:
    """``epoch`` or ``global_step``: an int (or a 0-d integer tensor) in 0..MAX_COUNT; 0 when absent."""
    value = official.get(key, 0)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not (value.is_floating_point() or value.is_complex()):
        value = value.item()
    return _integer(value, f"official checkpoint: '{key}'", 0, MAX_COUNT)


# ------------------------------------------------------------------------------------------ tensors
def check_tensor(value: Any, what: str, integer: bool = False) -> torch.Tensor:
    """A dense CPU tensor of real floating-point (``integer``: integer) values, each backed by its own
    storage (no expanded view of a few bytes posing as gigabytes), finite (``integer``: >= 0)."""
    if not isinstance(value, torch.Tensor):
        raise OfficialFormatError(f"{what} is {_show(value)}, not a tensor")
    if value.layout != torch.strided or value.device.type != "cpu":
        raise OfficialFormatError(f"{what} is a {value.layout} tensor on {value.device}, not a dense one")
    real = value.is_floating_point()
    whole = not (real or value.is_complex() or value.dtype == torch.bool)
    if (integer and not whole) or (not integer and not real):
        raise OfficialFormatError(f"{what} has dtype {value.dtype}, not {'integer' if integer else 'floating point'}")
    if value.numel() * value.element_size() > value.untyped_storage().nbytes():
        raise OfficialFormatError(f"{what} claims {value.numel():,} values of shape {tuple(value.shape)} on "
                                  f"{value.untyped_storage().nbytes():,} bytes of storage")
    if real and not bool(torch.isfinite(value).all()):
        raise OfficialFormatError(f"{what} holds NaN or infinite values")
    if integer and bool((value < 0).any()):
        raise OfficialFormatError(f"{what} holds negative values")
    return value


def check_state_dict(state: Mapping[Any, Any], counters: tuple[str, ...]) -> None:
    """Every entry named by a string and a valid tensor: integer for names ending in ``counters``
    (BatchNorm's ``num_batches_tracked``), floating point otherwise."""
    for key, value in state.items():
        if not isinstance(key, str):
            raise OfficialFormatError(f"official state dict: key {_show(key)} is not a tensor name")
        check_tensor(value, f"official '{key}'", integer=key.endswith(counters))


# ------------------------------------------------------------------------------------------ optimizer
def check_optimizer(state: Any, names: list[str]) -> Optional[dict[str, Any]]:
    """The official Adamax state's single parameter group (None without an optimizer state); checks
    its hyper-parameters and each listed parameter's ``step``, ``exp_avg`` and ``exp_inf`` (shapes
    are :func:`nvae.official.place`'s). ``names``: the official parameters in optimizer order."""
    if state is None:
        return None
    if not isinstance(state, dict):
        raise OfficialFormatError(f"official optimizer: is {_show(state)}, not an optimizer state dict")
    groups = state.get("param_groups")
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)):
        raise OfficialFormatError(f"official optimizer: 'param_groups' must be a list of one group, "
                                  f"got {_show(groups)}")
    group = groups[0]
    _check_group(group)
    params = group.get("params")
    if not isinstance(params, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in params):
        raise OfficialFormatError(f"official optimizer: param_groups[0] 'params' must be a list of indices, "
                                  f"got {_show(params)}")
    if len(params) != len(names) or len(set(params)) != len(params):
        raise OfficialFormatError(f"official optimizer: its group holds {len(params)} parameters ({len(set(params))} "
                                  f"distinct), its model {len(names)}: not this checkpoint's optimizer")
    moments = state.get("state")
    if not isinstance(moments, dict):
        raise OfficialFormatError(f"official optimizer: 'state' must be a dict, got {_show(moments)}")
    for name, idx in zip(names, params):
        if idx in moments:
            _check_entry(moments[idx], f"official optimizer state of '{name}'")
    return group


def _check_group(group: Mapping[str, Any]) -> None:
    what = "official optimizer: param_groups[0]"
    for key, low_allowed in (("lr", True), ("eps", False), ("weight_decay", True)):
        if key in group:
            _number(group[key], f"{what} '{key}'", 0.0, math.inf, low_allowed)
    if "betas" in group:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise OfficialFormatError(f"{what} 'betas': must be two numbers, got {_show(betas)}")
        for beta in betas:
            _number(beta, f"{what} 'betas'", 0.0, 1.0)
            if beta == 1.0:
                raise OfficialFormatError(f"{what} 'betas': must be below 1, got {betas!r}")


def _check_entry(entry: Any, what: str) -> None:
    """One parameter's Adamax state: a ``step`` count and finite ``exp_avg`` and ``exp_inf`` moments."""
    if not isinstance(entry, dict):
        raise OfficialFormatError(f"{what}: is {_show(entry)}, not a dict")
    check_step(entry.get("step", 0), f"{what}: 'step'")
    for kind in ("exp_avg", "exp_inf"):
        if kind not in entry:
            raise OfficialFormatError(f"{what}: '{kind}' missing")
        check_tensor(entry[kind], f"{what}: '{kind}'")


def check_step(step: Any, what: str) -> int:
    """An optimizer step: an int, an integral float or a 0-d real tensor of such a value, in 0..MAX_COUNT."""
    if isinstance(step, torch.Tensor) and step.dim() == 0 and not step.is_complex():
        step = step.item()
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    return _integer(step, what, 0, MAX_COUNT)
