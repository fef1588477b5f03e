"""The names the command lines offer as choices, in a module that imports nothing: the argument
parsers (:mod:`nvae.cli.parsers`) read them before torch is imported, so ``--help`` answers at once,
and the modules that implement the names import them from here.
"""
from __future__ import annotations

DMOL_BINS = ("exact", "official")  # the bins of a logistic mixture (nvae.distributions.DiscMixLogistic)
# nvae-restore: the degradations (nvae.restore.operators), the methods (nvae.restore.run) and the LPIPS
# backbones with torchvision's weight files (nvae.restore.scores)
OPERATOR_NAMES = ("inpaint-box", "inpaint-random", "inpaint-half", "sr", "sr-avg", "blur", "denoise")
RESTORE_METHODS = ("pnp", "adam", "encode-decode", "degraded")
LPIPS_NETS = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
