"""The argument parsers of ``sample.py``, ``evaluate.py`` and ``nvae-restore``, and the argument types and
option groups the commands share.

Nothing here imports torch, nor a module that does: the entry points (:mod:`nvae.cli`) parse the command
line first, so ``--help`` and usage errors answer at once, and import torch and the command's module
only to run it. ``--device`` is checked while parsing (:func:`device_arg`), which imports torch then.
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Callable, Optional

from nvae.names import DMOL_BINS, LPIPS_NETS, OPERATOR_NAMES, RESTORE_METHODS

DEFAULT_BN_STEPS = 500
DEFAULT_BN_BATCH = 16  # samples per BN-readjustment pass, as the official code's sampling uses
SEED_LIMIT = 10 ** 12  # image_seed(seed, i) = seed * 1_000_003 + i must fit torch's 64-bit seeds
MAX_GRID = 4096  # images in one sample.py --format png grid: 64 x 64 tiles, already more than one can look at,
#                  and the grid is built in memory as floats (4096 CIFAR images: 50 MB; 256x256 ones: 3.2 GB)
LATENT_TASKS = ("reconstruct", "interpolate", "encode")  # sample.py's latent API (nvae.cli.latent)


# ------------------------------------------------------------------------------------------ argument types
def device_arg(text: str) -> str:
    """argparse ``type`` of ``--device``: checked while parsing, so a missing device is a usage error.
    It imports torch; argparse converts the default ``auto`` only once the whole line is read, after ``--help``."""
    from nvae.cli.common import resolve_device

    try:
        resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse ``type``: an integer >= ``minimum`` (anything else is a usage error naming the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = at_least(1)


def seed_arg(text: str) -> int:
    """argparse ``type`` of ``--seed``: an integer whose per-image seeds fit 64 bits."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or abs(value) >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer between -10**12 and 10**12, got {text!r}")
    return value


def devices_arg(text: str) -> str:
    """argparse ``type`` of ``--devices``: a number of processes >= 1, 'auto', -1 (every GPU) or GPU
    indices '0,1' (as Lightning reads them)."""
    if text in ("auto", "-1") or re.fullmatch(r"[1-9]\d*|\d+(,\d+)+,?|\d+,", text):
        return text
    raise argparse.ArgumentTypeError(f"must be a number of processes >= 1, 'auto', -1 or GPU indices like "
                                     f"'0,1', got {text!r}")


def positive_temperature(text: str) -> float:
    """argparse ``type`` of ``--temperature``: a finite number >= 0."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"temperature must be a finite number >= 0, got {value}")
    return value


def bounded(low: float, high: float) -> Callable[[str], float]:
    """argparse ``type``: a number in [low, high] (bounds that keep every step finite in float32)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a number from {low:g} to {high:g}, got {text!r}")
        return value

    parse.__name__ = f"number in [{low:g}, {high:g}]"
    return parse


def temperature_schedule(text: str) -> tuple[float, float]:
    """argparse ``type`` of ``nvae-restore --temperature``: T or FIRST:LAST, each in (0, 10]."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(0 < v <= 10 for v in values):
        raise argparse.ArgumentTypeError(f"must be T or FIRST:LAST with numbers in (0, 10], got {text!r}")
    return (values[0], values[-1])


# ------------------------------------------------------------------------------------------ option groups
def add_bn_batch_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bn-batch-size", type=positive_int, default=DEFAULT_BN_BATCH,
                   help=f"samples per BN readjustment pass ({DEFAULT_BN_BATCH}: the official code's)")


def add_readjust_bn(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--readjust-bn", type=positive_int, nargs="?", const=DEFAULT_BN_STEPS, default=None,
                   metavar="STEPS", help=help)


def add_common(p: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    """The checkpoint, data, device and seed arguments of every ``evaluate.py`` command."""
    p.add_argument("--checkpoint", required=checkpoint_required, help="Lightning checkpoint written by train.py")
    p.add_argument("--data", default=None, metavar="CLASS_PATH",
                   help="data module to use instead of the checkpoint's (e.g. nvae.data.CIFAR10DataModule)")
    p.add_argument("--data-root", default=None, help="override the data root recorded in the checkpoint")
    p.add_argument("--split", choices=["test", "val", "train"], default="test", help="data split to evaluate on")
    p.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed (posterior samples, binarization, sampling)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_processes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=devices_arg, default="1",
                   help="processes per node (Lightning Fabric): e.g. 8 GPUs, or 2 CPU processes with --strategy ddp; "
                        "each evaluates every (devices x num_nodes)-th image and the results are gathered")
    p.add_argument("--num-nodes", type=positive_int, default=1, help="nodes (torchrun / SLURM, as for train.py)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")


def add_bins(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dmol-bins", choices=list(DMOL_BINS), default=None,
                   help="likelihood bins of a multi-bit model: 'official' (the official code's; converted checkpoints "
                        "default to it) or 'exact' (nvae's); default: the checkpoint's model.arch.dmol_bins")


def add_latent_arguments(p: argparse.ArgumentParser) -> None:
    """``sample.py``'s latent API (:mod:`nvae.cli.latent`)."""
    g = p.add_argument_group("latent API (instead of sampling)")
    g.add_argument("--reconstruct", nargs="+", metavar="IMAGE_OR_DIR",
                   help="write the images above their reconstructions (default output reconstructions.png)")
    g.add_argument("--keep-groups", type=at_least(0), nargs="+", default=None, metavar="K",
                   help="with --reconstruct: take the top K groups from the posterior and sample the rest from "
                        "the prior at --temperature; one row per K (default: all groups)")
    g.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                   help="decode points on the line between the latents of two images (default interpolation.png)")
    g.add_argument("--steps", type=at_least(2), default=8, help="with --interpolate: images from A to B")
    g.add_argument("--encode", nargs="+", metavar="IMAGE_OR_DIR",
                   help="save every group's posterior mean, std and latent to a .pt file (default latents.pt)")


def latent_tasks(args: argparse.Namespace) -> list[str]:
    """The latent tasks ``sample.py`` was asked for (more than one is a usage error)."""
    return [name for name in LATENT_TASKS if getattr(args, name)]


# ------------------------------------------------------------------------------------------ the parsers
def sample_parser() -> argparse.ArgumentParser:
    """``sample.py`` / ``nvae-sample`` (:mod:`nvae.cli.sample`)."""
    p = argparse.ArgumentParser(prog="sample.py", description="`sample.py`: draw images from a trained NVAE checkpoint "
                                "(paper sec. 5.2, temperature and BN readjustment).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Lightning checkpoint written by train.py")
    p.add_argument("--num-samples", type=positive_int, default=64, help="images per temperature")
    p.add_argument("--temperature", type=positive_temperature, nargs="+", default=[1.0],
                   help="prior temperature(s): scales the prior standard deviations; one output each")
    p.add_argument("--seed", type=seed_arg, default=0, help="same seed, same images")
    p.add_argument("--batch-size", type=positive_int, default=100, help="images per forward pass")
    p.add_argument("--output", default=None,
                   help="file (png grid / npz) or folder (pngs); default samples.png, samples.npz or samples/")
    p.add_argument("--overwrite", action="store_true",
                   help="--format pngs: replace the NNNNNN.png images of an earlier run in the output folder "
                        "(a folder holding other files is refused)")
    add_readjust_bn(p, "re-estimate BatchNorm statistics on STEPS batches of samples at each temperature "
                       "(paper sec. 5.2; 500 when no number is given); cached beside the checkpoint")
    add_bn_batch_size(p)
    p.add_argument("--format", choices=["png", "pngs", "npz"], default="png",
                   help=f"png: one grid per temperature (at most {MAX_GRID} images); pngs: one file per image; "
                        f"npz: uint8 array 'images' (N, C, H, W)")
    p.add_argument("--decode", choices=["mean", "sample"], default="mean",
                   help="output the likelihood's mean for each latent sample, or a sample from it")
    p.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_latent_arguments(p)
    return p


def parse_sample(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """``sample.py``'s arguments (``argv``, default the command line's), with the checks across options."""
    parser = sample_parser()
    args = parser.parse_args(argv)
    if len(latent_tasks(args)) > 1:
        parser.error(f"choose one of --{', --'.join(latent_tasks(args))}")
    if args.format == "png" and args.num_samples > MAX_GRID and not latent_tasks(args):
        parser.error(f"argument --num-samples: {args.num_samples} images are too many for one --format png grid "
                     f"(at most {MAX_GRID}); use --format pngs or npz")
    return args


def evaluate_parser() -> argparse.ArgumentParser:
    """``evaluate.py`` / ``nvae-eval`` (:mod:`nvae.cli.evaluate`): the commands nll, fid and recon."""
    parser = argparse.ArgumentParser(prog="evaluate.py", description="`evaluate.py`: judge a checkpoint (paper sec. "
                                     "5): importance-weighted NLL, FID, reconstructions.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    nll = sub.add_parser("nll", help="importance-weighted NLL and ELBO on a data split", formatter_class=fmt)
    add_common(nll)
    nll.add_argument("--num-importance-samples", "-K", type=positive_int, default=1000,
                     help="K (the paper uses 1000)")
    nll.add_argument("--num-images", type=positive_int, default=None,
                     help="evaluate the first N images (default: all)")
    nll.add_argument("--batch-size", type=positive_int, default=500,
                     help="images x samples per forward pass (memory bound)")
    nll.add_argument("--per-image", default=None, metavar="CSV",
                     help="also write each image's IW log p(x) and ELBO (nats) to this CSV file")
    add_bins(nll)
    add_processes(nll)

    fid = sub.add_parser("fid", help="FID of generated images against a data split", formatter_class=fmt)
    add_common(fid, checkpoint_required=False)
    fid.add_argument("--protocol", choices=["nvae", "official"], default="nvae",
                     help="nvae: images at --temperature after optional --readjust-bn, decoded to the rounded "
                          "likelihood mean, against --split; official: what the official evaluate.py computes: BN "
                          "readjusted at --temperature (500 passes of 2 samples), images drawn at t = 1, the unrounded "
                          "mean, against the training split at 8 bits")
    fid.add_argument("--images", default=None, help="score these images (.npz or folder) instead of sampling")
    fid.add_argument("--reference", default=None,
                     help="reference images (.npz or folder) or statistics (.npz with mu and sigma: nvae's, "
                          "pytorch-fid's or torch-fidelity's) instead of the data split")
    fid.add_argument("--num-samples", type=positive_int, default=50_000,
                     help="generated images (the paper uses 50,000)")
    fid.add_argument("--num-reference", type=positive_int, default=None,
                     help="reference images to use (default: whole split)")
    fid.add_argument("--temperature", type=positive_temperature, default=1.0, help="prior temperature of the samples")
    add_readjust_bn(fid, "re-estimate BatchNorm statistics at the temperature before sampling")
    add_bn_batch_size(fid)
    fid.add_argument("--decode", choices=["mean", "sample"], default="mean", help="likelihood mean or sample")
    fid.add_argument("--batch-size", type=positive_int, default=100, help="images per forward pass")
    fid.add_argument("--inception-weights", default=None,
                     help="local pt_inception-2015-12-05 weights file (nothing is downloaded unless --allow-download)")
    fid.add_argument("--allow-download", action="store_true", help="let torch-fidelity download the Inception weights")
    fid.add_argument("--stats-cache", default="fid_stats", help="folder caching reference statistics (.npz)")
    add_processes(fid)
    fid.set_defaults(split="train")

    rec = sub.add_parser("recon", help="reconstructions beside their inputs, and per-image NELBO", formatter_class=fmt)
    add_common(rec)
    rec.add_argument("--output", default="reconstructions.png", help="PNG grid: input, reconstruction, ...")
    rec.add_argument("--num-images", type=positive_int, default=32, help="test images to reconstruct")
    add_bins(rec)
    return parser


def restore_parser() -> argparse.ArgumentParser:
    """``nvae-restore`` / ``restore.py`` (:mod:`nvae.cli.restore`)."""
    p = argparse.ArgumentParser(prog="nvae-restore", description="Restore images with a trained NVAE as the prior "
                                "(PnP-HVAE, Prost et al., ICCV 2023) and score the restorations; docs/restoration.md.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an nvae checkpoint or model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images",
                     help="clean images (folder or .npz) to degrade with --operator and --sigma, then restore")
    src.add_argument("--split", choices=["test", "val", "train"],
                     help="like --images, the clean images of this split of the checkpoint's own data set")
    src.add_argument("--observed", help="degraded images (folder or .npz) to restore")
    p.add_argument("--clean", help="with --observed: the clean images, to score the restorations")
    p.add_argument("--mask", help="inpainting mask image (0 missing, anything else observed) instead of --operator")
    p.add_argument("--operator", default=None,
                   help=f"{', '.join(OPERATOR_NAMES)}; e.g. inpaint-random:0.5, inpaint-half:top, sr:4, blur:9,2.0 "
                        f"(default: inpaint-box)")
    p.add_argument("--sigma", type=bounded(1e-4, 10), default=0.05,
                   help="standard deviation of the observation noise, images in [0, 1]")
    p.add_argument("--method", choices=RESTORE_METHODS, default="pnp",
                   help="pnp (PnP-HVAE), or a baseline: adam (latents by gradient descent), encode-decode, degraded")
    p.add_argument("--sigma-dec", type=bounded(1e-4, 10), default=0.3, help="PnP: the decoder's constant sigma")
    p.add_argument("--beta", type=bounded(1e-3, 1e3), default=1.0, help="PnP: the weight of log p(x|z)")
    p.add_argument("--temperature", type=temperature_schedule, default="1.0", metavar="T|FIRST:LAST",
                   help="prior temperature, or linear from the top group to the last")
    p.add_argument("--iterations", type=positive_int, default=30, help="PnP iterations or Adam steps")
    p.add_argument("--tol", type=bounded(0, 1), default=1e-4,
                   help="PnP: stop when the relative change of x stays below")
    p.add_argument("--patience", type=positive_int, default=3, help="PnP: ... for this many iterations")
    p.add_argument("--lr", type=bounded(1e-6, 10), default=0.05, help="Adam's learning rate")
    p.add_argument("--num-samples", type=positive_int, default=1, help="PnP sampling mode: N restorations per image")
    p.add_argument("--num-images", type=positive_int, default=None, help="the first N images (None: all)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="images per pass")
    p.add_argument("--grid-rows", type=positive_int, default=8, help="images shown in grid.png")
    p.add_argument("--lpips-weights", help=f"torchvision backbone weights for LPIPS ({', '.join(LPIPS_NETS.values())})")
    p.add_argument("--lpips-net", choices=list(LPIPS_NETS), default="alex", help="LPIPS backbone of --lpips-weights")
    p.add_argument("--output", default="restored", help="folder for grid.png, images/ and scores.csv")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in --output")
    p.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=seed_arg, default=0, help="observation noise, random masks, sampling mode")
    p.add_argument("--no-ema", action="store_true", help="the raw weights even if the checkpoint has EMA weights")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_processes(p)
    return p
