"""`evaluate.py`: judge a checkpoint (paper sec. 5): importance-weighted NLL, FID, reconstructions.

    python evaluate.py nll   --checkpoint CKPT [--num-importance-samples K] [--num-images N] [--batch-size B]
                             [--devices N --num-nodes M --strategy ddp] [--per-image CSV]
    python evaluate.py fid   --checkpoint CKPT | --images PATH [--num-samples N] [--temperature T]
                             [--readjust-bn [STEPS]] [--inception-weights FILE] [--reference PATH]
                             [--protocol nvae|official] [--devices N --num-nodes M --strategy ddp]
    python evaluate.py recon --checkpoint CKPT [--output PNG] [--num-images N]

Each prints a one-line summary; the last line of output is one JSON object with the numbers.
The data set comes from the checkpoint's own data settings (``--data-root`` etc. override them).
Its options: :func:`nvae.cli.parsers.evaluate_parser`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Optional

import torch

from nvae.checkpoint import LoadedCheckpoint
from nvae.cli.common import data_loader, end_distributed, eval_dataset, launch, load, resolve_device
from nvae.cli.outputs import check_file, check_folder, json_line, one_line_errors, save_grid, save_text
from nvae.cli.parsers import evaluate_parser
from nvae.metrics.likelihood import NLLResult, gather_rows, per_image_nll


def run_nll(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """IW NLL over the split, sharded over the processes asked for (:mod:`nvae.metrics.likelihood`)."""
    k = args.num_importance_samples
    fabric = launch(args)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    device = fabric.device if fabric is not None else resolve_device(args.device)
    args.quiet_rank = rank != 0
    loaded = load(args, device)
    dataset = eval_dataset(loaded, args)
    n = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    if n == 0:
        raise SystemExit("evaluate.py: no images to evaluate (empty split or --num-images 0)")
    start = time.perf_counter()
    rows = per_image_nll(loaded.model, dataset, range(rank, n, world), k, args.batch_size, args.seed, device,
                         progress=not args.quiet and rank == 0)
    rows = gather_rows(rows.to(device), n, world, fabric.all_gather if fabric is not None else None)
    if rank != 0:
        return None
    res = NLLResult.from_rows(rows, loaded.model.spec.num_dims, k)
    if args.per_image:
        lines = ["index,log_px_nats,elbo_nats"] + [f"{int(i)},{lp:.6f},{e:.6f}" for i, lp, e in rows.tolist()]
        save_text("\n".join(lines) + "\n", Path(args.per_image))
    unit = "nats" if loaded.model.spec.num_bits == 1 else "bits/dim"
    headline = f"{res.nll_nats:.2f} nats" if unit == "nats" else f"{res.bpd:.4f} bits/dim"
    print(f"IW NLL (K={k}, {res.num_images} {args.split} images, {world} process(es)): {headline} "
          f"[{res.nll_nats:.2f} nats, {res.bpd:.4f} bpd]; negative ELBO {res.nelbo_nats:.2f} nats, "
          f"{res.nelbo_bpd:.4f} bpd")
    return {**res.as_dict(), "split": args.split, "weights": loaded.weights, "likelihood": _likelihood(loaded),
            "processes": world, "seconds": round(time.perf_counter() - start, 2)}


def _likelihood(loaded: LoadedCheckpoint) -> str:
    """The likelihood the numbers were computed with, and its settings (the bins of a mixture)."""
    return loaded.model.likelihood_family.describe(loaded.model.cfg)


@torch.no_grad()
def run_recon(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    loaded = load(args, device)
    model = loaded.model
    torch.manual_seed(args.seed)
    x = torch.cat(list(_take(data_loader(loaded, args, batch_size=args.num_images), args.num_images))).to(device)
    out = model(x)
    nelbo = (-model.log_likelihood(out.likelihood, x) + out.kl.sum(dim=1)).cpu()
    recon = out.likelihood.mean()
    pad = model.spec.pad
    pairs = torch.stack([x, recon], dim=1).flatten(0, 1)  # (2N, C, H, W): input, reconstruction, ...
    if pad:
        pairs = pairs[..., pad:-pad, pad:-pad]
    save_grid(pairs, Path(args.output), nrow=16)
    print(f"{x.shape[0]} reconstructions -> {args.output} (columns: input, reconstruction); "
          f"negative ELBO {nelbo.mean():.2f} nats per image")
    return {"nelbo_nats_mean": nelbo.mean().item(), "nelbo_nats": [round(v, 3) for v in nelbo.tolist()],
            "num_images": x.shape[0], "output": args.output, "weights": loaded.weights, "likelihood": _likelihood(loaded)}


def _take(loader: Any, n: int) -> Any:
    """The first ``n`` images of a loader, batch by batch."""
    count = 0
    for x in loader:
        x = x[0] if isinstance(x, (list, tuple)) else x
        yield x[: n - count]
        count += x.shape[0]
        if count >= n:
            return


def check_outputs(args: argparse.Namespace) -> None:
    """The files and folders a command will write, checked before any work."""
    if args.command == "nll" and args.per_image:
        check_file(Path(args.per_image), "--per-image")
    elif args.command == "recon":
        check_file(Path(args.output))
    elif args.command == "fid" and not args.reference:
        check_folder(Path(args.stats_cache), "--stats-cache")


def main(argv: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """``evaluate.py`` with the arguments ``argv`` (default: the command line's)."""
    return run_parsed(evaluate_parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """The command on arguments :func:`~nvae.cli.parsers.evaluate_parser` read (``nvae-eval`` reads them
    before it imports this module, so ``--help`` never waits for torch); None on a rank other than 0."""
    with one_line_errors("evaluate.py"):
        check_outputs(args)
        try:
            if args.command == "fid":
                from nvae.cli.fid import run_fid

                result = run_fid(args)
            else:
                result = {"nll": run_nll, "recon": run_recon}[args.command](args)
        finally:
            end_distributed()  # --devices / --num-nodes: the process group this run made, if any
    if result is not None:  # None: a process other than rank 0
        print(json_line(result, "evaluate.py"))
    return result
