"""The official NVAE code's checkpoint format (NVlabs/NVAE): its arguments and its state dict, in nvae's terms.

An official ``checkpoint.pt`` holds ``args`` (an ``argparse.Namespace`` of the training flags), the
model's ``state_dict``, the Adamax ``optimizer`` state, ``epoch`` and ``global_step`` (plus the
scheduler and grad scaler). This module reads such a file without running code (``args`` are mapped
to nvae's terms by :mod:`nvae.official_args`, re-exported here), and maps every tensor name of the
official model to the nvae model's, in either layout the official code writes (:data:`LAYOUTS`; paper
sec. 3; the official code builds the same network, flattening the encoder and decoder towers into
single lists).

What the mapping has to know: the official towers interleave cells and combiners in one list;
the decoder head orders its output channels (per colour channel: means, log-scales,
coefficients) differently from :class:`nvae.distributions.DiscMixLogistic` (per kind: all
channels); convolutions without weight normalization also appear as ``weight_normalized`` (the
same tensor as ``weight``); the power-iteration vectors of the spectral regularizer are not saved.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from nvae.cells import DecoderCell, EncoderCell
from nvae.likelihoods import MixtureOfLogisticsFamily
from nvae.limits import check_archive
from nvae.model import NVAE
from nvae.official_args import OfficialRun, run_from_args
from nvae.official_checks import OfficialFormatError, check_checkpoint, check_state_dict
from nvae.ops import FactorizedReduce, UpsampleConv


# The official default build (neural_operations.SYNC_BN = True, never switched off by its train.py or
# evaluate.py) makes each BatchNorm that get_batchnorm() creates a module holding ``bn``; in a
# res_mbconv decoder cell those are the first and the last BatchNorm (its BN-Swish steps make their own,
# unwrapped). A build with SYNC_BN = False saves them flat. Both layouts are read.
LAYOUTS = {"the official default layout (SyncBatchNorm wrappers)": True, "the flat layout (SYNC_BN = False)": False}
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
ALIAS_SUFFIX = ".weight_normalized"


# ------------------------------------------------------------------------------------------ reading
def read_official(path: str | Path) -> dict[str, Any]:
    """The official checkpoint at ``path``, loaded with ``weights_only=True``: only ``argparse.Namespace``
    (what the format pickles for ``args``) is allowed besides tensors and containers; nothing runs.
    The state dict's entries are checked as tensors (:func:`nvae.official_checks.check_state_dict`)."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"official checkpoint '{path}' {what}")
    try:
        check_archive(path, f"'{path}'")  # nothing inflates beyond what the file holds
    except ValueError as err:
        raise OfficialFormatError(str(err)) from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not such a checkpoint"
        raise OfficialFormatError(f"'{path}' is not a readable official NVAE checkpoint ({type(err).__name__}: "
                                  f"{(str(err).splitlines() or [''])[0][:200]})") from None
    check_checkpoint(ckpt, str(path))
    check_state_dict(ckpt["state_dict"], counters=(".num_batches_tracked",))
    return ckpt


# ------------------------------------------------------------------------------------------ tensor names
def module_pairs(model: NVAE, wrapped: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """(official module name, nvae module) for every module holding tensors, in the official order;
    ``wrapped``: the decoder cells' get_batchnorm() BatchNorms one level deeper (:data:`LAYOUTS`)."""
    yield "stem", model.stem
    for i, cell in enumerate(model.preprocess):
        yield from _cell(f"pre_process.{i}", cell, wrapped)
    # encoder tower, finest first: per group its cells, then its combiner (all but the top group); down cells
    k, enc_groups, enc_down = 0, iter(model.enc_groups), iter(model.enc_down)
    for scale, groups in model.topology.encoder_order():
        for group in groups:
            for cell in next(enc_groups):
                yield from _cell(f"enc_tower.{k}", cell, wrapped)
                k += 1
            if group.index > 0:
                combiner = model.dec_groups[group.index].enc_combiner
                assert combiner is not None
                yield f"enc_tower.{k}.conv", combiner.conv
                k += 1
        if scale.down_after:
            yield from _cell(f"enc_tower.{k}", next(enc_down), wrapped)
            k += 1
    yield "enc0.1", model.enc_top[1]
    for i, group in enumerate(model.dec_groups):
        yield f"enc_sampler.{i}", group.posterior
        for n, flow in enumerate(group.flows):
            for name, shift in (("cell1", flow.forward_order), ("cell2", flow.reverse_order)):
                prefix = f"nf_cells.{i * len(group.flows) + n}.{name}"
                yield f"{prefix}.conv.convz.0", shift.net[0]
                yield f"{prefix}.conv.convz.2", shift.net[2]
                yield f"{prefix}.mu.conv_0", shift.mu
        if group.prior is not None:
            yield f"dec_sampler.{i - 1}.1", group.prior[1]
    # decoder tower, coarsest first: per group its cells (none for the top one) and combiner; up cells
    k, up = 0, iter(model.dec_up)
    for slot, group in zip(model.topology.groups, model.dec_groups):
        if slot.up_before:
            yield from _cell(f"dec_tower.{k}", next(up), wrapped)
            k += 1
        for cell in group.cells:
            yield from _cell(f"dec_tower.{k}", cell, wrapped)
            k += 1
        yield f"dec_tower.{k}.conv", group.dec_combiner.conv
        k += 1
    for i, cell in enumerate(model.postprocess):
        yield from _cell(f"post_process.{i}", cell, wrapped)
    yield "image_conditional.1", model.head[1]


def _cell(prefix: str, cell: nn.Module, wrapped: bool) -> Iterator[tuple[str, nn.Module]]:
    """An official ``Cell``: ``skip``, ``_ops`` (two BN-Swish-conv ops, or one inverted residual) and ``se``.
    In the inverted residual the first and last BatchNorm are get_batchnorm()'s: ``.bn`` when ``wrapped``."""
    if isinstance(cell, EncoderCell):
        if isinstance(cell.skip, FactorizedReduce):
            for j, conv in enumerate(cell.skip.convs):
                yield f"{prefix}.skip.conv_{j + 1}", conv
        b = cell.branch
        yield from [(f"{prefix}._ops.0.bn_act", b[0]), (f"{prefix}._ops.0.conv_0", b[1]),
                    (f"{prefix}._ops.1.bn_act", b[2]), (f"{prefix}._ops.1.conv_0", b[3])]
        se = b[4]
    elif isinstance(cell, DecoderCell):
        o = 0
        if isinstance(cell.skip, UpsampleConv):
            yield f"{prefix}.skip.1", cell.skip.conv
            o = 1  # the official op starts with its nearest-neighbour upsampling layer
        b, ops, bn = cell.branch, f"{prefix}._ops.0.conv", ".bn" if wrapped else ""
        yield from [(f"{ops}.{o}{bn}", b[1]), (f"{ops}.{o + 1}.conv.0", b[2]), (f"{ops}.{o + 1}.conv.1", b[3]),
                    (f"{ops}.{o + 2}.conv.0", b[4]), (f"{ops}.{o + 2}.conv.1", b[5]), (f"{ops}.{o + 3}", b[6]),
                    (f"{ops}.{o + 4}{bn}", b[7])]
        se = b[8]
    else:
        raise TypeError(f"{prefix}: no official layout for {type(cell).__name__}")
    if not isinstance(se, nn.Identity):
        yield f"{prefix}.se.se.0", se.fc[0]
        yield f"{prefix}.se.se.2", se.fc[2]


def key_map(model: NVAE, wrapped: bool = False) -> dict[str, str]:
    """nvae state-dict key -> official state-dict key, for every tensor of ``model``'s state dict, in the
    layout ``wrapped`` says (:data:`LAYOUTS`)."""
    names = {id(m): n for n, m in model.named_modules()}
    keys = {"h0": "prior_ftr0"}
    for official, module in module_pairs(model, wrapped):
        for entry in module.state_dict():  # a leaf module: its own tensors
            keys[f"{names[id(module)]}.{entry}"] = f"{official}.{entry}"
    unmapped = set(model.state_dict()) - set(keys)
    if unmapped:  # a module the walk above does not know: the map must grow with the model
        raise RuntimeError(f"no official name for {len(unmapped)} nvae tensor(s), e.g. {sorted(unmapped)[0]}")
    return keys


def layout_keys(official: Mapping[str, torch.Tensor], model: NVAE) -> dict[str, str]:
    """The key map of the layout ``official`` is written in (:data:`LAYOUTS`): the one whose names it
    holds most of; a name still missing then stops with one line naming it and the layout expected."""
    maps = {name: key_map(model, wrapped) for name, wrapped in LAYOUTS.items()}
    name, keys = max(maps.items(), key=lambda item: sum(k in official for k in item[1].values()))
    missing = [k for k in keys.values() if k not in official]
    if missing:
        raise OfficialFormatError(f"official state dict has no '{missing[0]}' ({len(missing)} missing) in {name}, the "
                                  "closest the file comes to: it is not the architecture its args describe")
    return keys


def head_permutation(model: NVAE) -> torch.Tensor | None:
    """Index i -> the official output channel that becomes nvae's channel i of the likelihood head.

    Official (after the M mixture logits): for each colour channel c, M means, M log-scales, M
    coefficients (channel M + 3M c + M j + m for kind j); nvae: for each kind j, every channel
    (M + M (3 j + c) + m). None for a Bernoulli head (one logit per pixel, same order).
    """
    if not isinstance(model.likelihood_family, MixtureOfLogisticsFamily):
        return None
    m, c = model.cfg.num_mixtures, model.spec.channels
    if c != 3:
        raise OfficialFormatError(f"the official likelihood head is RGB-only; this model has {c} channels")
    perm = list(range(m))
    for j in range(3):  # mean, log-scale, coefficient
        for ch in range(3):
            perm += [m + 3 * m * ch + m * j + k for k in range(m)]
    return torch.tensor(perm)


def to_nvae(official: Mapping[str, torch.Tensor], model: NVAE,
            keys: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """An nvae state dict for ``model`` from an official one (checked by :func:`check_layout` first)."""
    keys = layout_keys(official, model) if keys is None else keys
    check_layout(official, model, keys)
    perm, target = head_permutation(model), model.state_dict()
    return {ours: place(official[theirs], ours, target[ours], perm, f"official '{theirs}'")
            for ours, theirs in keys.items()}


def check_layout(official: Mapping[str, torch.Tensor], model: NVAE, keys: Mapping[str, str]) -> None:
    """Refuses missing, leftover or misshapen official tensors; copies nothing (``model`` may be on the
    meta device). A ``weight_normalized`` entry must be the same values as its ``weight`` (the official
    alias) and is then not a tensor of its own."""
    missing = [o for o in keys.values() if o not in official]
    if missing:
        raise OfficialFormatError(f"official state dict has no '{missing[0]}' ({len(missing)} missing): it is not "
                                  "the architecture its args describe")
    used = set(keys.values())
    leftover = [k for k, v in official.items() if k not in used and not _is_alias(k, v, official, used)]
    if leftover:
        raise OfficialFormatError(f"official tensor '{leftover[0]}' ({len(leftover)} in all) has no place in the "
                                  "nvae model: an architecture nvae does not build")
    target = model.state_dict()
    for ours, theirs in keys.items():
        _check_shape(official[theirs], ours, target[ours], f"official '{theirs}'")


def place(tensor: torch.Tensor, ours: str, like: torch.Tensor, perm: torch.Tensor | None, what: str) -> torch.Tensor:
    """An official tensor (or an optimizer moment of it) laid out as nvae's ``ours``: the likelihood
    head's output channels reordered by ``perm``, shape checked, ``like``'s dtype."""
    _check_shape(tensor, ours, like, what)  # first: a misshapen head would not take the permutation
    if perm is not None and ours.startswith("head.1."):
        tensor = tensor[perm.to(tensor.device)]
    placed = tensor.to(like.dtype).contiguous()
    overflow = (placed.is_floating_point() and tensor.is_floating_point() and placed.device.type != "meta"
                and not bool(torch.isfinite(placed).all()))  # (meta: shapes only, in the layout checks)
    if overflow:
        raise OfficialFormatError(f"{what} overflows {like.dtype} (values beyond its range become infinite)")
    return placed


def _check_shape(tensor: torch.Tensor, ours: str, like: torch.Tensor, what: str) -> None:
    if tensor.shape != like.shape:
        raise OfficialFormatError(f"{what} has shape {tuple(tensor.shape)}, nvae's '{ours}' {tuple(like.shape)}")


def _is_alias(key: str, value: torch.Tensor, official: Mapping[str, torch.Tensor], used: set[str]) -> bool:
    if not key.endswith(ALIAS_SUFFIX):
        return False
    weight = key[:-len(ALIAS_SUFFIX)] + ".weight"
    if weight not in used or not (value is official[weight] or torch.equal(value, official[weight])):
        raise OfficialFormatError(f"official '{key}' is not the alias of '{weight}' it should be")
    return True


def parameter_names(official: Mapping[str, torch.Tensor]) -> list[str]:
    """The official model's parameters in ``model.parameters()`` order (the optimizer's indices):
    state-dict order without BatchNorm buffers and ``weight_normalized`` aliases."""
    return [k for k in official if not k.endswith(BUFFER_SUFFIXES) and not k.endswith(ALIAS_SUFFIX)]


__all__ = ["LAYOUTS", "OfficialFormatError", "OfficialRun", "check_layout", "head_permutation", "key_map",
           "layout_keys", "parameter_names", "place", "read_official", "run_from_args", "to_nvae"]
