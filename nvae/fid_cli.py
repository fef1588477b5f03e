"""`evaluate.py fid`: FID of generated images against a data split (paper sec. 5, table 3).

Two protocols, both stated in the output. ``nvae`` (default): N images drawn from the prior at the
temperature asked (after optional BatchNorm readjustment at that temperature), decoded to the
likelihood's mean (on the bit grid) by default, against the split asked. ``official``: what the
official ``evaluate.py --eval_mode evaluate_fid`` computes: BatchNorm readjusted at the temperature
asked (500 passes of 2 samples), the images then drawn at t = 1 whatever that temperature, decoded
to the unrounded mean, against the training split at 8 bits. Both use Inception-v3 pool features
(torch-fidelity's network and weights, as torchmetrics uses) of uint8 images, and reference
statistics cached once per (data set, split, count, extractor).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from nvae.checkpoint import resolve_device
from nvae.eval_cli import data_loader, load
from nvae.metrics import fid as F
from nvae.sampling import bn_cache_path, readjust_batchnorm, sample_images

OFFICIAL_BN_STEPS, OFFICIAL_BN_BATCH = 500, 2  # the official FID evaluation's BatchNorm readjustment


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


def _cropped(loader: Iterable[Any], pad: int) -> Iterator[torch.Tensor]:
    """Data batches without the padding the data pipeline added (generated images have none)."""
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        yield x[..., pad:-pad, pad:-pad] if pad else x


def _reference(args: argparse.Namespace, loaded: Any, extractor: torch.nn.Module, device: torch.device
               ) -> tuple[F.FeatureStats, str]:
    """Reference statistics: a stats/image file given by --reference, or the checkpoint's data split."""
    if args.reference:
        path = Path(args.reference)
        stats_file = path.suffix == ".npz" and path.is_file()
        if stats_file and {"mu", "sigma"} <= set(np.load(path, allow_pickle=False).files):
            return F.FeatureStats.load(path), str(path)
        try:
            images = F.load_images(path)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"evaluate.py: {err}") from None
        return F.compute_stats(_batches(images, args.batch_size), extractor, device, not args.quiet,
                               args.num_reference), str(path)
    if loaded is None:
        raise SystemExit("evaluate.py: fid needs --checkpoint (for its data set) or --reference PATH")
    data = {"class_path": args.data, "init_args": {}} if args.data else loaded.data
    args_key = {k: v for k, v in (data or {}).get("init_args", {}).items()
                if k not in ("batch_size", "eval_batch_size", "num_workers")}
    if args.data_root:
        args_key["root"] = args.data_root
    if getattr(args, "num_bits", None):
        args_key["num_bits"] = args.num_bits
    dataset = json.dumps({"class_path": (data or {}).get("class_path"), "init_args": args_key}, sort_keys=True)
    key = F.stats_key(dataset, args.split, args.num_reference, extractor)
    cache = Path(args.stats_cache) / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    loader = data_loader(loaded, args, batch_size=args.batch_size)
    stats = F.reference_stats(_cropped(loader, loaded.model.spec.pad), extractor, cache, key, device,
                              args.num_reference)
    return stats, f"{args.split} split of {(data or {}).get('class_path')} (stats cache {cache})"


def run_fid(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    if not args.checkpoint and not args.images:
        raise SystemExit("evaluate.py: fid needs --checkpoint CKPT or --images PATH")
    loaded = load(args, device) if args.checkpoint else None  # a bad checkpoint fails before Inception loads
    try:
        extractor = F.inception_extractor(args.inception_weights, allow_download=args.allow_download)
    except FileNotFoundError as err:
        raise SystemExit(f"evaluate.py: {err}") from None
    extractor = extractor.to(device).eval()
    start = time.perf_counter()
    protocol: dict[str, Any] = {"protocol": args.protocol}
    if args.protocol == "official" and not args.reference:
        args.split, args.num_bits = "train", 8  # the official statistics: the training set at 8 bits
    if args.images:
        try:
            images = F.load_images(args.images)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"evaluate.py: {err}") from None
        protocol["images"] = args.images
    else:
        model = loaded.model
        official = args.protocol == "official"
        steps, bn_batch = (OFFICIAL_BN_STEPS, OFFICIAL_BN_BATCH) if official else (args.readjust_bn, args.bn_batch_size)
        bn = "none"
        if steps:
            cache = bn_cache_path(loaded.path, args.temperature, steps, bn_batch)
            cached = readjust_batchnorm(model, args.temperature, steps, bn_batch, cache, progress=not args.quiet)
            bn = f"{steps} steps of {bn_batch} at t={args.temperature:g} ({'cached' if cached else 'computed'})"
        sample_t = 1.0 if official else args.temperature
        images = sample_images(model, args.num_samples, sample_t, args.batch_size, args.seed,
                               mean=official or args.decode == "mean", progress=not args.quiet,
                               quantize=False if official else None)
        protocol.update(temperature=args.temperature, sample_temperature=sample_t, bn_readjust=bn,
                        decode="unrounded mean" if official else args.decode, weights=loaded.weights)
    generated = F.compute_stats(_batches(images, args.batch_size), extractor, device, not args.quiet)
    reference, described = _reference(args, loaded, extractor, device)
    fid = F.fid_from_stats(generated, reference)
    seconds = time.perf_counter() - start
    how = ", ".join(f"{k}={v}" for k, v in protocol.items())
    print(f"FID {fid:.3f}: {generated.count} generated images ({how}) vs {reference.count} images of {described}")
    return {"fid": fid, "num_generated": generated.count, "num_reference": reference.count, **protocol,
            "seconds": round(seconds, 2)}
