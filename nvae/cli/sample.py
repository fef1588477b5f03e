"""`sample.py`: draw images from a trained NVAE checkpoint (paper sec. 5.2, temperature and BN readjustment).

    python sample.py --checkpoint CKPT [--num-samples N] [--temperature T ...] [--seed S]
        [--batch-size B] [--output PATH] [--readjust-bn [STEPS]] [--format png|pngs|npz]
        [--decode mean|sample] [--device D] [--no-ema]
    python sample.py --checkpoint CKPT --reconstruct DIR [--keep-groups K ...] | --interpolate A B [--steps N]
        | --encode DIR        (the latent API, see nvae/cli/latent.py)

The last line printed is one JSON object describing what was written.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from nvae.checkpoint import load_checkpoint
from nvae.cli import latent
from nvae.cli.common import DEFAULT_BN_STEPS, add_bn_batch_size, device_arg, positive_temperature, resolve_device
from nvae.sampling import batchnorm_state, bn_cache_path, load_batchnorm_state, readjust_batchnorm, sample_images


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Lightning checkpoint written by train.py")
    p.add_argument("--num-samples", type=int, default=64, help="images per temperature")
    p.add_argument("--temperature", type=positive_temperature, nargs="+", default=[1.0],
                   help="prior temperature(s): scales the prior standard deviations; one output each")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument("--batch-size", type=int, default=100, help="images per forward pass")
    p.add_argument("--output", default=None,
                   help="file (png grid / npz) or folder (pngs); default samples.png, samples.npz or samples/")
    p.add_argument("--readjust-bn", type=int, nargs="?", const=DEFAULT_BN_STEPS, default=None, metavar="STEPS",
                   help=f"re-estimate BatchNorm statistics on STEPS batches of samples at each temperature "
                        f"(paper sec. 5.2; {DEFAULT_BN_STEPS} when no number is given); cached beside the checkpoint")
    add_bn_batch_size(p)
    p.add_argument("--format", choices=["png", "pngs", "npz"], default="png",
                   help="png: one grid per temperature; pngs: one file per image; npz: uint8 array 'images' (N, C, H, W)")
    p.add_argument("--decode", choices=["mean", "sample"], default="mean",
                   help="output the likelihood's mean for each latent sample, or a sample from it")
    p.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    latent.add_arguments(p)
    return p


def output_path(base: Optional[str], fmt: str, temperature: float, several: bool) -> Path:
    default = {"png": "samples.png", "pngs": "samples", "npz": "samples.npz"}[fmt]
    path = Path(base or default)
    if several:
        suffix = f"_t{temperature:g}"
        path = path.with_name(path.stem + suffix + path.suffix) if path.suffix else path.with_name(path.name + suffix)
    return path


def write(images: torch.Tensor, path: Path, fmt: str) -> None:
    """Save uint8 (N, C, H, W) images as a grid, as individual PNGs or as one npz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, images=images.numpy())
        tmp.replace(path)
    elif fmt == "pngs":
        path.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            save_image(img.float() / 255.0, path / f"{i:06d}.png")
    else:
        nrow = max(1, int(round(images.shape[0] ** 0.5)))
        save_image(make_grid(images.float() / 255.0, nrow=nrow, padding=2, pad_value=0.5), path)


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        raise SystemExit("sample.py: --num-samples and --batch-size must be >= 1")
    device = resolve_device(args.device)
    try:
        loaded = load_checkpoint(args.checkpoint, device, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"sample.py: {err}") from None
    model = loaded.model
    print(f"checkpoint: {loaded.path} ({loaded.weights} weights), device: {device}, decode: {args.decode}")
    if latent.wanted(args):
        try:
            result = latent.run(args, model, device)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"sample.py: {err}") from None
        print(json.dumps(result))
        return result
    original_bn = batchnorm_state(model)
    outputs, seconds = [], 0.0
    for t in args.temperature:
        load_batchnorm_state(model, original_bn)  # each temperature starts from the trained statistics
        bn = "none"
        if args.readjust_bn:
            cache = bn_cache_path(loaded.path, t, args.readjust_bn, args.bn_batch_size)
            cached = readjust_batchnorm(model, t, args.readjust_bn, args.bn_batch_size, cache, progress=not args.quiet)
            bn = f"{args.readjust_bn} steps ({'cached' if cached else 'computed'})"
        start = time.perf_counter()
        images = sample_images(model, args.num_samples, t, args.batch_size, args.seed,
                               mean=args.decode == "mean", progress=not args.quiet)
        seconds += time.perf_counter() - start
        path = output_path(args.output, args.format, t, len(args.temperature) > 1)
        write(images, path, args.format)
        print(f"t={t:g}: {images.shape[0]} images -> {path} (BN readjustment: {bn})")
        outputs.append({"temperature": t, "path": str(path), "bn_readjust": bn})
    result = {"outputs": outputs, "num_samples": args.num_samples, "weights": loaded.weights,
              "decode": args.decode, "seed": args.seed,
              "images_per_s": args.num_samples * len(args.temperature) / max(seconds, 1e-9)}
    print(json.dumps(result))
    return result
