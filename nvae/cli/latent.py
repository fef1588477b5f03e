"""The latent API on the command line (used by ``sample.py``): reconstruct, interpolate, encode.

    sample.py --checkpoint CKPT --reconstruct DIR_OR_FILES... [--keep-groups K ...] [--output F.png]
    sample.py --checkpoint CKPT --interpolate A.png B.png [--steps N] [--output F.png]
    sample.py --checkpoint CKPT --encode DIR_OR_FILES... [--output latents.pt]

Images are read as the model was trained: converted to gray or RGB, center-cropped to a square,
resized to the image interior, put on the model's n-bit grid (1 bit: threshold at mid-gray) and
padded like the training data. Its options: :func:`nvae.cli.parsers.add_latent_arguments`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch
from torchvision.transforms.functional import pil_to_tensor, resize

from nvae.cli.outputs import save_grid, save_torch
from nvae.data.base import DataError, quantize
from nvae.data.files import read_image
from nvae.data.base import CenterSquare
from nvae.data.folder import IMAGE_EXTENSIONS
from nvae.model import NVAE


def image_files(paths: Sequence[str]) -> list[Path]:
    """Expand folders (sorted images inside) and check that every file exists."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in '{p}'")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"image '{p}' does not exist")
    return files


def load_for_model(files: Sequence[Path], model: NVAE) -> torch.Tensor:
    """(N, C, H, W) float images on the model's grid, padded as in training."""
    spec = model.spec
    inner = spec.size - 2 * spec.pad
    out = []
    for f in files:
        try:  # the data pipeline's reader: header size checked before decoding, 16-bit scaled, no pipes
            img = read_image(str(f), "L" if spec.channels == 1 else "RGB")
        except DataError as err:
            raise ValueError(str(err)) from None
        x = resize(pil_to_tensor(CenterSquare()(img)), [inner, inner], antialias=True)  # uint8 (C, inner, inner)
        out.append(torch.nn.functional.pad(quantize(x, spec.num_bits), [spec.pad] * 4))
    return torch.stack(out)


DEFAULT_OUTPUTS = {"reconstruct": "reconstructions.png", "interpolate": "interpolation.png", "encode": "latents.pt"}


def output_path(args: argparse.Namespace) -> Path:
    """Where the latent task asked for writes (``--output`` or its default)."""
    task = next(name for name in DEFAULT_OUTPUTS if getattr(args, name))
    return Path(args.output or DEFAULT_OUTPUTS[task])


@torch.no_grad()
def run(args: argparse.Namespace, model: NVAE, device: torch.device) -> dict[str, Any]:
    """Do the one latent task asked for; returns what was written."""
    torch.manual_seed(args.seed)
    t = args.temperature[0]
    if args.reconstruct:
        x = load_for_model(image_files(args.reconstruct), model).to(device)
        keeps = args.keep_groups or [model.num_groups]
        rows = [x] + [model.reconstruct(x, k, t) for k in keeps]
        path = output_path(args)
        save_grid(torch.cat(rows), path, nrow=x.shape[0])
        print(f"{x.shape[0]} images and their reconstructions (rows: input, keep_groups {keeps}) -> {path}")
        return {"task": "reconstruct", "path": str(path), "num_images": x.shape[0], "keep_groups": keeps,
                "num_groups": model.num_groups}
    if args.interpolate:
        a, b = load_for_model(image_files(args.interpolate), model).to(device).split(1)
        frames = model.interpolate(a, b, args.steps)[:, 0]  # (steps, C, H, W)
        path = output_path(args)
        save_grid(frames, path, nrow=args.steps)
        print(f"{args.steps} images from {args.interpolate[0]} to {args.interpolate[1]} -> {path}")
        return {"task": "interpolate", "path": str(path), "steps": args.steps}
    files = image_files(args.encode)
    groups = model.encode(load_for_model(files, model).to(device))
    path = output_path(args)
    save_torch({"files": [str(f) for f in files], "mean": [g.mean.cpu() for g in groups],
                "std": [g.std.cpu() for g in groups], "z": [g.z.cpu() for g in groups]}, path)
    print(f"latents of {len(files)} images ({len(groups)} groups, top first) -> {path}")
    return {"task": "encode", "path": str(path), "num_images": len(files), "num_groups": len(groups)}
