"""`restore.py` / `nvae-restore`: restore images with a trained NVAE as the prior (PnP-HVAE, Prost
et al., ICCV 2023), and score the restorations.

    nvae-restore --checkpoint CKPT|DIR --images DIR|NPZ --operator inpaint-box --sigma 0.05 --output OUT
    nvae-restore --checkpoint CKPT|DIR --split test --num-images 8 --operator sr:2 ...
    nvae-restore --checkpoint CKPT|DIR --observed DIR|NPZ [--mask PNG] [--clean DIR|NPZ] --operator sr:2 ...

With ``--images`` (or ``--split``, the checkpoint's own data) the clean images are degraded by the
operator and seeded noise, then restored and scored (PSNR, SSIM, and LPIPS with ``--lpips-weights``);
with ``--observed`` the images are already degraded. OUT receives grid.png (observation | restorations
| clean), images/NNNNNN.png (image i's restoration s is number i * N + s), scores.csv (one row per
restoration); the last line printed is one JSON object. ``--devices 2 --strategy ddp`` shares the
images between processes (per-image seeds: the same numbers as one process). See docs/restoration.md.
Its options: :func:`nvae.cli.parsers.restore_parser`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from nvae.checkpoint import load_checkpoint
from nvae.cli import restore_io as io
from nvae.cli.common import end_distributed, launch, resolve_device
from nvae.cli.outputs import json_line, one_line_errors, save_grid, save_png, save_text
from nvae.cli.parsers import restore_parser
from nvae.limits import check_batch
from nvae.metrics.images import read_image_file
from nvae.metrics.likelihood import gather_rows
from nvae.restore.baselines import degraded
from nvae.restore.pnp import PnPSettings
from nvae.restore.run import Method, observe, restore
from nvae.restore.scores import load_lpips, psnr, ssim

PROG = "nvae-restore"
COLUMNS = ["row", "image", "sample", "psnr", "ssim", "lpips", "iterations", "seconds"]


def _method(args: argparse.Namespace) -> Method:
    settings = PnPSettings(sigma=args.sigma, sigma_dec=args.sigma_dec, beta=args.beta, temperature=args.temperature,
                           iterations=args.iterations, tol=args.tol, patience=args.patience)
    return Method(args.method, settings, args.num_samples, args.lr, args.seed)


def run(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    if args.clean and not args.observed:
        raise ValueError("--clean goes with --observed (with --images or --split the images are the clean ones)")
    method = _method(args)
    fabric = launch(args)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    device = fabric.device if fabric is not None else resolve_device(args.device)
    out = Path(args.output)
    stale = io.check_output(out, args.overwrite)
    loaded = load_checkpoint(args.checkpoint, device, use_ema=not args.no_ema)
    model = loaded.model
    shape = io.image_shape(model)
    op = io.operator(args, shape)
    clean = io.clean_images(args.images or args.clean, "--images" if args.images else "--clean", model,
                            args.num_images) if (args.images or args.clean) else None
    if args.split:
        clean = io.SplitImages(loaded.data, args.split, model, args.num_images, args.seed)
    observed = io.observed_images(args.observed, op, shape, args.num_images) if args.observed else None
    if observed is not None and clean is not None and clean.shape[0] != observed.shape[0]:
        raise ValueError(f"--clean has {clean.shape[0]} images, --observed {observed.shape[0]}")
    if args.lpips_weights and clean is None:
        raise ValueError("--lpips-weights scores against clean images: give --clean with --observed")
    lpips = load_lpips(args.lpips_weights, args.lpips_net, min(shape[1:])) if args.lpips_weights else None
    n, k = (observed if observed is not None else clean).shape[0], method.num_samples
    check_batch(model.spec, model.cfg, min(args.batch_size, n) * k, "--batch-size x --num-samples")
    mine = list(range(rank, n, world))
    bar = tqdm(total=len(mine), desc=f"{method.name} {_operator_name(args)}", unit="img",
               disable=args.quiet or rank != 0)
    rows = []
    for start in range(0, len(mine), args.batch_size):
        idx = mine[start:start + args.batch_size]
        began = time.perf_counter()
        truth = clean[idx].to(device) if clean is not None else None
        y = observed[idx].to(device) if observed is not None else observe(op, truth, args.sigma, idx, args.seed)
        with torch.no_grad():
            restored, iterations = restore(model, op, y, idx, method,
                                           progress=lambda it: bar.set_postfix(iteration=it, refresh=False))
        seconds = (time.perf_counter() - began) / len(idx)
        bad = (~torch.isfinite(restored.flatten(1)).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"the restoration of image {idx[bad[0]]} is not finite: lower --lr (adam) or raise "
                             f"--sigma / --sigma-dec")
        for b, i in enumerate(idx):
            for s in range(k):
                png = (restored[b, s].clamp(0, 1) * 255).round().byte().cpu()
                save_png(png, out / "images" / f"{i * k + s:06d}.png")
            scores = [float("nan")] * 3
            if clean is not None:
                ref = truth[b:b + 1].expand(k, -1, -1, -1)
                scores = [psnr(restored[b], ref), ssim(restored[b], ref),
                          lpips(restored[b], ref) if lpips is not None else torch.full((k,), float("nan"))]
            for s in range(k):
                rows.append([i * k + s, i, s, *(float(v[s]) if torch.is_tensor(v) else v for v in scores),
                             int(iterations[b, s]), seconds])
        bar.update(len(idx))
    bar.close()
    table = torch.tensor(rows, dtype=torch.float64).reshape(-1, len(COLUMNS))
    table = gather_rows(table.to(device), n * k, world, fabric.all_gather if fabric is not None else None, per_item=k)
    if rank != 0:
        return None
    for p in stale:  # an earlier run's images (or temporary files) that this run did not replace
        if not p.stem.isdigit() or int(p.stem) >= n * k:
            p.unlink(missing_ok=True)
    _write_scores(table, out / "scores.csv", clean is not None, lpips is not None)
    _write_grid(out, op, clean, observed, args, model.spec.channels, k)
    return _summary(table, args, method, world, clean is not None, lpips is not None, n)


def _write_scores(table: torch.Tensor, path: Path, scored: bool, with_lpips: bool) -> None:
    columns = ["image", "sample", "file", "iterations", "seconds"] + (["psnr", "ssim"] if scored else []) + \
        (["lpips"] if with_lpips else [])
    lines = [",".join(columns)]
    for row, image, sample, p, s, lp, it, sec in table.tolist():
        values = [f"{int(image)}", f"{int(sample)}", f"images/{int(row):06d}.png", f"{int(it)}", f"{sec:.4f}"]
        values += [f"{p:.4f}", f"{s:.5f}"] if scored else []
        values += [f"{lp:.5f}"] if with_lpips else []
        lines.append(",".join(values))
    save_text("\n".join(lines) + "\n", path)


def _write_grid(out: Path, op: Any, clean: Any, observed: Optional[torch.Tensor],
                args: argparse.Namespace, channels: int, k: int) -> None:
    """grid.png: one row per image (the first --grid-rows): observation (as an image), restorations, clean."""
    rows = min(args.grid_rows, (observed if observed is not None else clean).shape[0])
    idx = list(range(rows))
    truth = clean[idx] if clean is not None else None
    y = observed[idx] if observed is not None else observe(op, truth, args.sigma, idx, args.seed)
    tiles = []
    for i in idx:
        tiles.append(degraded(op, y[i:i + 1])[0])
        for s in range(k):
            img = torch.from_numpy(read_image_file(out / "images" / f"{i * k + s:06d}.png").copy()).permute(2, 0, 1)
            tiles.append(img[:channels].float() / 255.0)
        if clean is not None:
            tiles.append(truth[i])
    save_grid(torch.stack(tiles), out / "grid.png", nrow=1 + k + (clean is not None))


def _operator_name(args: argparse.Namespace) -> str:
    return "mask" if args.mask else args.operator or "inpaint-box"


def _summary(table: torch.Tensor, args: argparse.Namespace, method: Method, world: int, scored: bool,
             with_lpips: bool, n: int) -> dict[str, Any]:
    _, _, _, p, s, lp, it, sec = table.T
    result: dict[str, Any] = {"method": method.name, "operator": _operator_name(args), "sigma": args.sigma,
                              "num_images": n, "num_samples": method.num_samples}
    if scored:
        result.update(psnr=round(p.mean().item(), 4), ssim=round(s.mean().item(), 5))
    if with_lpips:
        result["lpips"] = round(lp.mean().item(), 5)
    result.update(seconds_per_image=round(sec.mean().item(), 4),  # all of an image's restorations
                  iterations=round(it.mean().item(), 2), processes=world, output=args.output)
    if method.name == "pnp":
        st = method.settings
        result.update(sigma_dec=st.sigma_dec, beta=st.beta, temperature=list(st.temperature),
                      max_iterations=st.iterations)
    scores = f"PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}" if scored else "no clean images: no scores"
    print(f"{method.name} on {result['operator']} (sigma {args.sigma:g}), {n} image(s): {scores}; "
          f"{result['seconds_per_image']:.3f} s per image -> {args.output}/")
    return result


def main(argv: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """``nvae-restore`` with the arguments ``argv`` (default: the command line's)."""
    return run_parsed(restore_parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """The command on arguments :func:`~nvae.cli.parsers.restore_parser` read (``nvae-restore`` reads them
    before it imports this module, so ``--help`` never waits for torch); None on a rank other than 0."""
    with one_line_errors(PROG):
        try:
            result = run(args)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"{PROG}: error: {err}") from None
        finally:
            end_distributed()
    if result is not None:
        print(json_line(result, PROG))
    return result
