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
import math
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from nvae.cli.common import data_loader, launch, load, resolve_device
from nvae.metrics import fid as F
from nvae.sampling import bn_cache_path, bn_seed, iter_samples, readjust_batchnorm

OFFICIAL_BN_STEPS, OFFICIAL_BN_BATCH = 500, 2  # the official FID evaluation's BatchNorm readjustment


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


def _cropped(loader: Iterable[Any], pad: int) -> Iterator[torch.Tensor]:
    """Data batches without the padding the data pipeline added (generated images have none)."""
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        yield x[..., pad:-pad, pad:-pad] if pad else x


def _reference_file(reference: Optional[str]) -> Optional[F.FeatureStats]:
    """``--reference`` read before any work when it holds statistics (an .npz with mu and sigma, as nvae,
    pytorch-fid and torch-fidelity save them; one line when one is missing); None for images or no file."""
    path = Path(reference or "")
    if not reference or path.is_dir():
        return None
    if not path.is_file():
        raise SystemExit(f"evaluate.py: --reference: no .npz file or image folder at '{path}'")
    try:
        if path.suffix == ".npz" and {"mu", "sigma"} & set(F.npz_arrays(path)):
            return F.FeatureStats.load(path)
    except ValueError as err:
        raise SystemExit(f"evaluate.py: --reference: {err}") from None
    return None


def _read_images(path: str, rank: int, world: int) -> torch.Tensor:
    """This process's share of the ``--images`` to score (one line naming a damaged file)."""
    try:
        return F.load_images(path)[rank::world]
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"evaluate.py: --images: {err}") from None


def _reference(args: argparse.Namespace, loaded: Any, extractor: torch.nn.Module, device: torch.device,
               stats: Optional[F.FeatureStats]) -> tuple[F.FeatureStats, str]:
    """Reference statistics: a stats/image file given by --reference, or the checkpoint's data split."""
    if args.reference:
        path = Path(args.reference)
        if stats is not None:
            return stats, str(path)
        try:
            images = F.load_images(path)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"evaluate.py: --reference: {err}") from None
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


def _readjust(model: Any, loaded: Any, temperature: float, steps: int, bn_batch: int, seed: int, rank: int,
              fabric: Any, progress: bool) -> bool:
    """BatchNorm readjusted at ``temperature`` from the run's ``seed`` (:func:`nvae.sampling.bn_seed`: the
    statistics sample.py computes for that seed); True when it came from the cache beside the checkpoint.
    A cache there already is read by every process (a bad one is then one line on each: none waits for
    another); else rank 0 readjusts and caches, and the others read that cache."""
    cache = bn_cache_path(loaded.path, temperature, steps, bn_batch, seed, loaded.weights)
    try:
        present = cache.is_file()
        if fabric is not None:
            fabric.barrier()  # every process has decided before rank 0 may write the cache
        if present:
            return readjust_batchnorm(model, temperature, steps, bn_batch, cache, progress=progress)
        if rank == 0:
            # seeded here rather than with readjust_batchnorm's ``seed`` (the same draws): the caller's RNG
            # state does not matter to fid, whose batches are seeded one by one (image_seed)
            torch.manual_seed(bn_seed(seed))
            readjust_batchnorm(model, temperature, steps, bn_batch, cache, progress=progress)
        if fabric is not None:
            fabric.barrier()
            if rank != 0:
                readjust_batchnorm(model, temperature, steps, bn_batch, cache, progress=False)
    except ValueError as err:
        raise SystemExit(f"evaluate.py: {err}") from None
    return False


def generate(model: Any, num: int, temperature: float, batch_size: int, seed: int, rank: int, world: int,
             mean: bool, quantize: Optional[bool], progress: bool) -> Iterator[torch.Tensor]:
    """This process's share of the ``num`` generated images, batch by batch (:func:`nvae.sampling.iter_samples`):
    their features are taken as they come, so memory does not grow with ``num``."""
    return iter_samples(model, num, temperature, batch_size, seed, mean=mean, progress=progress,
                        quantize=quantize, rank=rank, world=world)


def gathered_stats(local: F.FeatureStats, fabric: Any, average: bool) -> F.FeatureStats:
    """The statistics of every process's features (:func:`nvae.metrics.fid.merge_stats`)."""
    if fabric is None:
        return local
    count = torch.tensor([float(local.count)], dtype=torch.float64, device=fabric.device)
    mean, cov = local.mean.to(fabric.device), local.cov.to(fabric.device)
    counts, means, covs = (fabric.all_gather(t) for t in (count, mean, cov))  # (W, 1), (W, D), (W, D, D)
    parts = [(int(n.item()), m, c) for n, m, c in zip(counts, means, covs)]
    return F.merge_stats(parts, average=average)


def run_fid(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    if not args.checkpoint and not args.images:
        raise SystemExit("evaluate.py: fid needs --checkpoint CKPT or --images PATH")
    fabric = launch(args)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    device = fabric.device if fabric is not None else resolve_device(args.device)
    args.quiet_rank = rank != 0
    progress = not args.quiet and rank == 0
    # the inputs are checked before the work: checkpoint, counts, reference statistics, images, then Inception
    loaded = load(args, device) if args.checkpoint else None
    if not args.images and math.ceil(args.num_samples / args.batch_size) < 2 * world:
        raise SystemExit(f"evaluate.py: --num-samples {args.num_samples} gives fewer than 2 batches of "
                         f"--batch-size {args.batch_size} per process ({world} processes)")
    reference_stats = _reference_file(args.reference) if rank == 0 else None
    images = _read_images(args.images, rank, world) if args.images else None
    try:
        extractor = F.inception_extractor(args.inception_weights, allow_download=args.allow_download)
    except (FileNotFoundError, ValueError) as err:  # missing, or not a plain weights file of the right network
        raise SystemExit(f"evaluate.py: {err}") from None
    extractor = extractor.to(device).eval()
    start = time.perf_counter()
    official = args.protocol == "official"
    protocol: dict[str, Any] = {"protocol": args.protocol, "processes": world}
    if official and not args.reference:
        args.split, args.num_bits = "train", 8  # the official statistics: the training set at 8 bits
    if images is not None:
        batches = _batches(images, args.batch_size)
        protocol["images"] = args.images
    else:
        model = loaded.model
        steps, bn_batch = (OFFICIAL_BN_STEPS, OFFICIAL_BN_BATCH) if official else (args.readjust_bn, args.bn_batch_size)
        bn = "none"
        if steps:
            cached = _readjust(model, loaded, args.temperature, steps, bn_batch, args.seed, rank, fabric,
                               progress)
            bn = f"{steps} steps of {bn_batch} at t={args.temperature:g} ({'cached' if cached else 'computed'})"
        sample_t = 1.0 if official else args.temperature
        batches = generate(model, args.num_samples, sample_t, args.batch_size, args.seed, rank, world,
                           mean=official or args.decode == "mean", quantize=False if official else None,
                           progress=progress)
        protocol.update(temperature=args.temperature, sample_temperature=sample_t, bn_readjust=bn,
                        decode="unrounded mean" if official else args.decode, weights=loaded.weights)
    try:
        local = F.compute_stats(batches, extractor, device, progress)
        generated = gathered_stats(local, fabric, average=official)  # official: per-process statistics averaged
        if rank != 0:
            return None
        reference, described = _reference(args, loaded, extractor, device, reference_stats)
        fid = F.fid_from_stats(generated, reference)
    except ValueError as err:  # too few images, statistics of another extractor, ...
        raise SystemExit(f"evaluate.py: {err}") from None
    seconds = time.perf_counter() - start
    how = ", ".join(f"{k}={v}" for k, v in protocol.items())
    known = reference.count_known
    against = f"{reference.count} images of {described}" if known else f"the statistics in {described}"
    print(f"FID {fid:.3f}: {generated.count} generated images ({how}) vs {against}")
    return {"fid": fid, "num_generated": generated.count, "num_reference": reference.count if known else None,
            **protocol, "seconds": round(seconds, 2)}
