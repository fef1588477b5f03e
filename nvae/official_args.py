"""The official NVAE training flags (``args`` in an official checkpoint) in nvae's terms: the image
spec, the architecture, the training hyper-parameters and the data module (paper sec. 3 and table 6).

Files written before a flag existed lack it; the official evaluate.py fills three network fields for
them, and the official train.py's defaults stand for the fields the network does not read. A field
that says which network the file holds has no default: its absence is one line naming it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Mapping

from nvae.arch import NVAEConfig
from nvae.official_checks import OfficialFormatError, check_args
from nvae.spec import ImageSpec

# official --dataset -> (channels, image size, padding, nvae data module)
DATASETS: dict[str, tuple[int, int, int, str]] = {
    "mnist": (1, 32, 2, "nvae.data.MNISTDataModule"),  # binarized, padded 28 -> 32: Bernoulli
    "cifar10": (3, 32, 0, "nvae.data.CIFAR10DataModule"),
    "celeba_64": (3, 64, 0, "nvae.data.CelebA64DataModule"),
    "imagenet_32": (3, 32, 0, "nvae.data.ImageNet32DataModule"),
    "celeba_256": (3, 256, 0, "nvae.data.CelebAHQ256DataModule"),
    "ffhq": (3, 256, 0, "nvae.data.FFHQ256DataModule"),
}
ARCH_INSTANCE = "res_mbconv"  # the paper's cells (the official default); the only one nvae builds
# Fields the official evaluate.py fills in for files written before they existed (the November 2020
# releases predate --num_mixture_dec, October 2021): the values every earlier model was built with.
EVALUATE_FILLS: dict[str, Any] = {"ada_groups": False, "min_groups_per_scale": 1, "num_mixture_dec": 10}
# The official train.py's defaults of the fields the network does not read (schedules, regularization,
# data): a file without them still converts, and the conversion says which it filled.
TRAIN_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-2, "learning_rate_min": 1e-4, "weight_decay": 3e-4, "warmup_epochs": 5, "epochs": 200,
    "weight_decay_norm": 0.0, "weight_decay_norm_init": 10.0, "weight_decay_norm_anneal": False,
    "kl_anneal_portion": 0.3, "kl_const_portion": 1e-4, "kl_const_coeff": 1e-4, "batch_size": 200,
}
# Fields without which a file does not say which network it holds (no default is assumed for them)
NETWORK_FIELDS = ("dataset", "num_channels_enc", "num_channels_dec", "num_latent_scales", "num_groups_per_scale",
                  "num_latent_per_group", "num_cell_per_cond_enc", "num_cell_per_cond_dec", "num_preprocess_blocks",
                  "num_preprocess_cells", "num_postprocess_blocks", "num_postprocess_cells", "num_nf", "use_se",
                  "res_dist")


# ------------------------------------------------------------------------------------------ arguments
@dataclass
class OfficialRun:
    """What an official run's ``args`` say, in nvae's terms."""

    spec: ImageSpec
    arch: NVAEConfig
    hparams: dict[str, Any]
    """NVAEModule keyword arguments besides arch and image_spec: the ``optim`` and ``objective`` groups."""
    data: dict[str, Any]
    """{'class_path': ..., 'init_args': {...}} of the matching nvae data module."""
    filled: list[str]
    """``name=value`` of each field the file lacked and the official defaults filled (:func:`fill_defaults`)."""


def _arg(args: Mapping[str, Any], name: str) -> Any:
    if name not in args:
        raise OfficialFormatError(f"official args: no field '{name}'")
    return args[name]


def fill_defaults(args: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``args`` with the official defaults filled in where a field is absent (:data:`EVALUATE_FILLS`,
    :data:`TRAIN_DEFAULTS`), and ``name=value`` for each one filled; one line naming a missing
    :data:`NETWORK_FIELDS` entry (and ``num_x_bits`` outside MNIST), which no default may stand for."""
    args = dict(args)
    needed = [*NETWORK_FIELDS, *([] if args.get("dataset") == "mnist" else ["num_x_bits"])]
    missing = [name for name in needed if name not in args]
    if missing:
        raise OfficialFormatError(f"official args: no field '{missing[0]}' ({len(missing)} missing), which says what "
                                  "network the file holds; no default stands for it")
    filled = []
    for name, value in {**EVALUATE_FILLS, **TRAIN_DEFAULTS}.items():
        if name not in args:
            args[name] = value
            filled.append(f"{name}={value}")
    return args, filled


def run_from_args(args: Mapping[str, Any] | argparse.Namespace) -> OfficialRun:
    """Map the official training flags to nvae; one line naming the field for what nvae does not build
    or for a value of the wrong type or out of range (:func:`nvae.official_checks.check_args`)."""
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    args, filled = fill_defaults(args)
    check_args(args, {name: size for name, (_, size, _, _) in DATASETS.items()})
    dataset = _arg(args, "dataset")
    if dataset not in DATASETS:
        raise OfficialFormatError(f"official args: dataset {dataset!r} is not one nvae maps "
                                  f"({', '.join(DATASETS)})")
    if args.get("arch_instance", ARCH_INSTANCE) != ARCH_INSTANCE:
        raise OfficialFormatError(f"official args: arch_instance {args['arch_instance']!r} is not the paper's "
                                  f"{ARCH_INSTANCE!r}, the only cells nvae builds")
    mixtures = int(args.get("num_mixture_dec", 10))
    if mixtures < 2 and dataset != "mnist":
        raise OfficialFormatError(f"official args: num_mixture_dec {mixtures} (a Normal decoder) is not built by "
                                  "nvae, which uses a discretized logistic mixture")
    if _arg(args, "num_latent_scales") == 1 and _arg(args, "num_groups_per_scale") == 1:
        raise OfficialFormatError("official args: num_latent_scales 1 with num_groups_per_scale 1 is the official "
                                  "vanilla-VAE path, which nvae does not build")
    if _arg(args, "num_channels_enc") != _arg(args, "num_channels_dec"):
        raise OfficialFormatError(f"official args: num_channels_enc {args['num_channels_enc']} differs from "
                                  f"num_channels_dec {args['num_channels_dec']}; nvae uses one channel count")
    channels, size, pad, data_class = DATASETS[dataset]
    bits = 1 if dataset == "mnist" else int(_arg(args, "num_x_bits"))
    spec = ImageSpec(channels=channels, size=size, num_bits=bits, pad=pad)
    try:
        arch = NVAEConfig(
            num_channels=args["num_channels_enc"],
            num_preprocess_blocks=_arg(args, "num_preprocess_blocks"),
            num_preprocess_cells=_arg(args, "num_preprocess_cells"),
            num_postprocess_blocks=_arg(args, "num_postprocess_blocks"),
            num_postprocess_cells=_arg(args, "num_postprocess_cells"),
            num_latent_scales=args["num_latent_scales"],
            num_groups_per_scale=args["num_groups_per_scale"],
            groups_halving=bool(_arg(args, "ada_groups")),
            min_groups_per_scale=_arg(args, "min_groups_per_scale"),
            num_latent_per_group=_arg(args, "num_latent_per_group"),
            num_cell_per_cond_enc=_arg(args, "num_cell_per_cond_enc"),
            num_cell_per_cond_dec=_arg(args, "num_cell_per_cond_dec"),
            num_flows=_arg(args, "num_nf"),
            num_mixtures=mixtures if mixtures >= 2 else 10,
            use_se=bool(_arg(args, "use_se")),
            residual_posterior=bool(_arg(args, "res_dist")),
            dmol_bins="official",
        )
    except ValueError as err:
        raise OfficialFormatError(f"official args: {err}".replace("model.arch.", "")) from None
    anneal = bool(args.get("weight_decay_norm_anneal", False))
    hparams = {
        "optim": {"learning_rate": float(_arg(args, "learning_rate")),
                  "learning_rate_min": float(_arg(args, "learning_rate_min")),
                  "weight_decay": float(_arg(args, "weight_decay")),
                  "warmup_epochs": float(_arg(args, "warmup_epochs"))},
        "objective": {"kl_anneal_portion": float(_arg(args, "kl_anneal_portion")),
                      "kl_const_portion": float(_arg(args, "kl_const_portion")),
                      "kl_min_coeff": float(_arg(args, "kl_const_coeff")),
                      "spectral_reg_coeff": float(_arg(args, "weight_decay_norm")),
                      "spectral_reg_coeff_init": float(args["weight_decay_norm_init"]) if anneal else None},
    }
    init_args: dict[str, Any] = {"root": str(args.get("data", "data")), "batch_size": int(_arg(args, "batch_size"))}
    if dataset != "mnist":
        init_args["num_bits"] = bits
    return OfficialRun(spec, arch, hparams, {"class_path": data_class, "init_args": init_args}, filled)
