"""What several command lines share when they run: devices, loading a checkpoint for a command, data
loaders, launching Lightning Fabric, and ending a distributed run. (Their arguments: :mod:`nvae.cli.parsers`.)
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from nvae.checkpoint import LoadedCheckpoint, build_datamodule, instantiate_datamodule, load_checkpoint
from nvae.data.registry import command_line_datamodule
from nvae.limits import check_batch
from nvae.model import NVAE


# ------------------------------------------------------------------------------------------ devices
def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is a torch.device that must exist on
    this machine (ValueError naming it otherwise, instead of a CUDA initialization traceback later)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: {err}") from None
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here")
    return resolved


# ------------------------------------------------------------------------------------------ running
def launch(args: argparse.Namespace) -> Any:
    """A launched Lightning Fabric when more than one process is asked for (or launched by torchrun/SLURM
    with --num-nodes), else None."""
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    if devices == 1 and args.num_nodes == 1 and args.strategy == "auto":
        return None
    from lightning.fabric import Fabric

    accelerator = "cuda" if resolve_device(args.device).type == "cuda" else "cpu"
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=args.num_nodes, strategy=args.strategy)
    fabric.launch()
    return fabric


def load(args: argparse.Namespace, device: torch.device) -> LoadedCheckpoint:
    """``args.checkpoint`` on ``device`` (``--dmol-bins`` applied), announced unless ``args.quiet_rank``;
    a bad file is a one-line exit."""
    try:
        loaded = load_checkpoint(args.checkpoint, device, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"evaluate.py: {err}") from None
    check_pass_sizes(loaded.model, args, "evaluate.py")
    bins = getattr(args, "dmol_bins", None)
    if bins is not None:
        loaded.model.cfg = dataclasses.replace(loaded.model.cfg, dmol_bins=bins)
    if not getattr(args, "quiet_rank", False):
        print(f"checkpoint: {loaded.path} ({loaded.weights} weights), device: {device}, likelihood: "
              f"{loaded.model.likelihood_family.describe(loaded.model.cfg)}")
    return loaded


def pass_sizes(args: argparse.Namespace) -> dict[str, int]:
    """Images one pass of the network holds, by the option that sets it (a batch never exceeds the images asked)."""
    sizes = {}
    if getattr(args, "batch_size", None):  # sample.py, fid: images; nll: rows of one image's K samples
        most = getattr(args, "num_samples", None) or getattr(args, "num_importance_samples", None) or args.batch_size
        sizes["--batch-size"] = min(args.batch_size, most)
    if getattr(args, "readjust_bn", None) and getattr(args, "bn_batch_size", None):
        sizes["--bn-batch-size"] = args.bn_batch_size
    if getattr(args, "command", None) == "recon" and getattr(args, "num_images", None):
        sizes["--num-images"] = args.num_images  # recon runs all of them in one pass
    return sizes


def check_pass_sizes(model: NVAE, args: argparse.Namespace, prog: str) -> None:
    """Before any image is drawn or read: each pass size must fit this machine (:func:`nvae.limits.check_batch`)."""
    for option, size in pass_sizes(args).items():
        try:
            check_batch(model.spec, model.cfg, size, option)
        except ValueError as err:
            raise SystemExit(f"{prog}: error: {err}") from None


def eval_dataset(loaded: LoadedCheckpoint, args: argparse.Namespace) -> Any:
    """The recorded data module's data set for ``args.split``."""
    loader = data_loader(loaded, args, batch_size=1)
    return loader.dataset


def data_loader(loaded: LoadedCheckpoint, args: argparse.Namespace, batch_size: int) -> Any:
    """The recorded data module's loader for ``args.split`` (no shuffling)."""
    try:
        overrides = dict(root=args.data_root, eval_batch_size=batch_size, num_workers=0,
                         num_bits=getattr(args, "num_bits", None))  # FID's official protocol: 8 bits
        if args.data:  # named on the command line: the user's choice (may be imported)
            dm = instantiate_datamodule(command_line_datamodule(args.data), {}, overrides)
        else:  # named by the checkpoint: nvae's data modules or registered ones only
            dm = build_datamodule(loaded.data, **overrides)
        dm.setup("test")
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"evaluate.py: {err}") from None
    if args.split == "train":
        return torch.utils.data.DataLoader(dm.train_set, batch_size=batch_size, shuffle=False)
    return dm.val_dataloader() if args.split == "val" else dm.test_dataloader()


def end_distributed() -> None:
    """Destroy the default process group, if this run made one, before the process exits.

    Lightning destroys it at exit for NCCL only. A gloo group left to the interpreter's shutdown
    lets its threads outlive their owner: under torchrun with 2 nodes of 1 CPU process each, 5 of
    7 runs failed, a process aborting after its last line ("terminate called without an active
    exception", SIGABRT, so torchrun reported the run as failed) or hanging in torchrun's exit barrier.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
