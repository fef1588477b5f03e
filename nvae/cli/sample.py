"""`sample.py`: draw images from a trained NVAE checkpoint (paper sec. 5.2, temperature and BN readjustment).

    python sample.py --checkpoint CKPT [--num-samples N] [--temperature T ...] [--seed S]
        [--batch-size B] [--output PATH] [--overwrite] [--readjust-bn [STEPS]] [--format png|pngs|npz]
        [--decode mean|sample] [--device D] [--no-ema]
    python sample.py --checkpoint CKPT --reconstruct DIR [--keep-groups K ...] | --interpolate A B [--steps N]
        | --encode DIR        (the latent API, see nvae/cli/latent.py)

Outputs are checked before the work and written complete or not at all (see nvae/cli/outputs.py).
The last line printed is one JSON object describing what was written.
Its options: :func:`nvae.cli.parsers.sample_parser`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from nvae.checkpoint import LoadedCheckpoint, load_checkpoint
from nvae.cli import latent
from nvae.cli.common import check_pass_sizes, resolve_device
from nvae.cli.outputs import (OutputError, check_file, json_line, npz_stream, one_line_errors, save_grid, save_png,
                              stale_files)
from nvae.cli.parsers import latent_tasks, parse_sample
from nvae.sampling import (batchnorm_state, bn_cache_path, image_shape, iter_samples, load_batchnorm_state,
                           readjust_batchnorm)

def output_path(base: Optional[str], fmt: str, temperature: float, several: bool) -> Path:
    default = {"png": "samples.png", "pngs": "samples", "npz": "samples.npz"}[fmt]
    path = Path(base or default)
    if several:
        suffix = f"_t{temperature:g}"
        path = path.with_name(path.stem + suffix + path.suffix) if path.suffix else path.with_name(path.name + suffix)
    return path


def check_outputs(args: argparse.Namespace) -> dict[Path, list[Path]]:
    """Every output path, checked before any work; for --format pngs, the files of an earlier run that
    --overwrite will remove (refused without it, or when the folder holds other files)."""
    if latent_tasks(args):
        check_file(latent.output_path(args))
        return {}
    paths = [output_path(args.output, args.format, t, len(args.temperature) > 1) for t in args.temperature]
    if len(set(paths)) < len(paths):
        raise OutputError(f"--temperature {' '.join(f'{t:g}' for t in args.temperature)}: two outputs share a name")
    stale = {}
    for path in paths:
        if args.format == "pngs":
            stale[path] = stale_files(path, args.overwrite)
        else:
            check_file(path)
            stale[path] = []
    return stale


def timed(batches: Iterable[torch.Tensor], clock: list[float]) -> Iterator[torch.Tensor]:
    """``batches``, adding the seconds spent making each to ``clock[0]`` (writing them is not counted)."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(it, None)
        clock[0] += time.perf_counter() - start
        if batch is None:
            return
        yield batch


def write(batches: Iterable[torch.Tensor], path: Path, fmt: str, num: int, shape: tuple[int, int, int]) -> None:
    """Save uint8 (b, C, H, W) batches as one grid, as individual PNGs or as one npz, each file complete
    or absent (:mod:`nvae.cli.outputs`); pngs and npz hold one batch in memory at a time."""
    if fmt == "npz":
        with npz_stream(path, (num, *shape)) as add:
            for batch in batches:
                add(batch.numpy())
    elif fmt == "pngs":
        path.mkdir(parents=True, exist_ok=True)
        done = 0
        try:
            for batch in batches:
                for image in batch:
                    save_png(image, path / f"{done:06d}.png")
                    done += 1
        except OutputError as err:
            raise OutputError(f"{err}; {done} of {num} images (complete) are in '{path}'") from err
    else:
        images = torch.cat(list(batches))
        save_grid(images.float() / 255.0, path, nrow=max(1, int(round(images.shape[0] ** 0.5))))


def sample_all(args: argparse.Namespace, loaded: LoadedCheckpoint, stale: dict[Path, list[Path]]) -> dict:
    """Draw and write the images of every temperature; the JSON result."""
    model, checkpoint = loaded.model, loaded.path
    original_bn = batchnorm_state(model)
    outputs, clock = [], [0.0]
    for t, (path, old) in zip(args.temperature, stale.items()):
        load_batchnorm_state(model, original_bn)  # each temperature starts from the trained statistics
        bn = "none"
        if args.readjust_bn:
            cache = bn_cache_path(checkpoint, t, args.readjust_bn, args.bn_batch_size, args.seed, loaded.weights)
            try:
                cached = readjust_batchnorm(model, t, args.readjust_bn, args.bn_batch_size, cache,
                                            progress=not args.quiet, seed=args.seed)
            except ValueError as err:  # a cache file that is not this model's statistics
                raise SystemExit(f"sample.py: {err}") from None
            bn = f"{args.readjust_bn} steps ({'cached' if cached else 'computed'})"
        for p in old:  # --overwrite: the earlier run's images, removed only now that new ones come
            p.unlink(missing_ok=True)
        batches = iter_samples(model, args.num_samples, t, args.batch_size, args.seed,
                               mean=args.decode == "mean", progress=not args.quiet)
        write(timed(batches, clock), path, args.format, args.num_samples, image_shape(model))
        print(f"t={t:g}: {args.num_samples} images -> {path} (BN readjustment: {bn})")
        outputs.append({"temperature": t, "path": str(path), "bn_readjust": bn})
    return {"outputs": outputs, "num_samples": args.num_samples, "weights": loaded.weights, "decode": args.decode,
            "seed": args.seed,
            "images_per_s": args.num_samples * len(args.temperature) / max(clock[0], 1e-9)}


def main(argv: Optional[list[str]] = None) -> dict:
    """``sample.py`` with the arguments ``argv`` (default: the command line's)."""
    return run_parsed(parse_sample(argv))


def run_parsed(args: argparse.Namespace) -> dict:
    """The command on arguments :func:`~nvae.cli.parsers.parse_sample` read (``nvae-sample`` reads them
    before it imports this module, so ``--help`` never waits for torch)."""
    with one_line_errors("sample.py"):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    """Check the outputs, load the checkpoint, then sample (or run the latent task asked for)."""
    stale = check_outputs(args)
    device = resolve_device(args.device)
    try:
        loaded = load_checkpoint(args.checkpoint, device, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"sample.py: {err}") from None
    model = loaded.model
    check_pass_sizes(model, args, "sample.py")
    print(f"checkpoint: {loaded.path} ({loaded.weights} weights), device: {device}, decode: {args.decode}")
    if latent_tasks(args):
        try:
            result = latent.run(args, model, device)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"sample.py: {err}") from None
    else:
        result = sample_all(args, loaded, stale)
    print(json_line(result, "sample.py"))
    return result
