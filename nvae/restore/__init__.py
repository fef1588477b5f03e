"""Image restoration with a trained NVAE as the prior (PnP-HVAE, Prost, Houdard, Almansa, Papadakis,
ICCV 2023, arXiv 2303.11217): the degradation operators with exact adjoints
(:mod:`~nvae.restore.operators`), the latent step (:mod:`~nvae.restore.latent_step`), the PnP loop
(:mod:`~nvae.restore.pnp`), the baselines (:mod:`~nvae.restore.baselines`), one batch by one method with
per-image seeds (:mod:`~nvae.restore.run`) and the scores (:mod:`~nvae.restore.scores`). The command is
``nvae-restore`` (:mod:`nvae.cli.restore`); the guide is docs/restoration.md."""
from nvae.restore.baselines import adam_restore, degraded, encode_decode
from nvae.restore.latent_step import gaussian_product, latent_step, temperatures
from nvae.restore.operators import (AvgPool, Blur, Downsample, GaussianBlur, Identity, Mask, Operator,
                                    conjugate_gradient, gaussian_kernel, parse_operator)
from nvae.restore.pnp import PnPSettings, Restoration, pnp_restore
from nvae.restore.run import METHODS, Method, observe, restore

__all__ = ["AvgPool", "Blur", "Downsample", "GaussianBlur", "Identity", "METHODS", "Mask", "Method", "Operator",
           "PnPSettings", "Restoration", "adam_restore", "conjugate_gradient", "degraded", "encode_decode",
           "gaussian_kernel", "gaussian_product", "latent_step", "observe", "parse_operator", "pnp_restore", "restore",
           "temperatures"]
