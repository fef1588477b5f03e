"""`train.py`: the training command line, a LightningCLI over NVAEModule and the data modules.

The data module's ``image_spec`` is linked into the model, so image shape and bit depth are
given once. After ``fit`` the held-out negative ELBO of the trained weights is printed.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal, Optional, Sequence

from jsonargparse import Namespace, set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from nvae.checkpoint import model_hparams, read_checkpoint
from nvae.checkpoint_state import check_training_state
from nvae.cli.common import end_distributed
from nvae.config_check import check_command_line, import_policy
from nvae.data import ImageDataModule
from nvae.data.base import DataError
from nvae.guard import TrainingDiverged
from nvae.lightning import NVAEModule
from nvae.loading import described_model
from nvae.model import NVAE
from nvae.presets import describe, resolve_config_args
from nvae.resilience import find_resume_checkpoint
from nvae.training import apply_gpu_recipe

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # dataclass field docs in --help

class NVAECLI(LightningCLI):
    """LightningCLI with NVAE's argument links and a held-out evaluation after fit."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        parser.link_arguments("data.image_spec", "model.image_spec", apply_on="instantiate")
        parser.add_argument("--gpu_recipe", type=Literal["official", "none"], default="none",
                            help="'official': on GPUs train as the official code does, under mixed precision "
                                 "(bf16-mixed where the GPU supports bf16, else 16-mixed with a gradient scaler) "
                                 "with BatchNorm synchronized across processes; on a CPU nothing changes (float32, "
                                 "per-process BatchNorm). 'none': trainer.precision and trainer.sync_batchnorm as "
                                 "given. The paper presets say 'official'")
        parser.add_argument("--resume", type=Optional[str], default=None,
                            help="'auto': continue from the newest last.ckpt under trainer.default_root_dir "
                                 "(start fresh if there is none); or a checkpoint path")

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 (jsonargparse parser, LightningCLI's ArgsType)
        """Preset names to files, and a ``--ckpt_path`` file checked (:func:`nvae.checkpoint.check_names`)
        before LightningCLI reads its hyper-parameters; then Lightning's parsing. (:func:`main` has
        checked the config files for names of code, :mod:`nvae.config_check`.)"""
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        argv = resolve_config_args(list(sys.argv[1:] if args is None else args))
        self.config = parser.parse_args(argv)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config.get(f"{subcommand}.ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in LIGHTNING_CKPT_WORDS:
            check_resume_file(ckpt_path, "--ckpt_path")

    def before_instantiate_classes(self) -> None:
        """Apply ``--gpu_recipe`` to the trainer settings before the trainer is built."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        changed = apply_gpu_recipe(config)
        if changed:
            rank_zero_info(f"gpu_recipe official: {changed} (the official code's GPU training; --gpu_recipe none "
                           "keeps the trainer settings as given)")

    def before_fit(self) -> None:
        """Resolve ``--resume`` into ``ckpt_path`` (fit only)."""
        config = self.config_init[self.subcommand]
        resume = config.get("resume")
        if config.get("weights_only") is None:
            config["weights_only"] = True  # resuming never unpickles code (nvae checkpoints hold tensors and dicts)
        if not resume:
            return
        if resume == "auto":
            callback = self.trainer.checkpoint_callback
            found = find_resume_checkpoint(getattr(callback, "dirpath", None), self.trainer.default_root_dir)
            if found is None:
                rank_zero_info(f"--resume auto: no last.ckpt under {self.trainer.default_root_dir}; starting a new run")
                return
            resume = str(found)
        check_resume_file(resume, "--resume")
        rank_zero_info(f"resuming from {resume}")
        config["ckpt_path"] = resume

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        log_dir = self.trainer.log_dir  # on every process: a broadcast under DDP
        if self.trainer.is_global_zero and results:
            r = results[0]
            print(f"held-out negative ELBO: {r['test/nelbo']:.2f} nats per image "
                  f"({r['test/bpd']:.4f} bits/dim) on the test split")
            ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none"
            print(f"checkpoint: {ckpt}\nlogs and samples: {log_dir}")


LIGHTNING_CKPT_WORDS = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself


def check_resume_file(path: str, option: str) -> None:
    """Before any work: ``path`` is a checkpoint file that names no code (:func:`nvae.checkpoint.read_checkpoint`)
    and whose training state is sane (:func:`nvae.checkpoint_state.check_training_state`); one line otherwise."""
    if Path(path).is_dir():
        raise SystemExit(f"train.py: error: {option}: '{path}' is a folder, not a checkpoint file (e.g. "
                         f"{Path(path) / 'checkpoints' / 'last.ckpt'})")
    if not Path(path).is_file():
        raise SystemExit(f"train.py: error: {option}: checkpoint '{path}' does not exist")
    ckpt = read_checkpoint(path, mmap=True)  # refuse a file that names code before any work
    source = f"checkpoint '{path}'"
    check_training_state(ckpt, source)
    if option == "--ckpt_path":  # LightningCLI builds the model from the file's hyper-parameters
        described_model(model_hparams(ckpt, source), source, NVAE)


def main(args: Optional[list[str]] = None, callbacks: Sequence[Callback] = ()) -> Optional[NVAECLI]:
    """Entry point of train.py: the quickstart preset with no arguments; ``presets`` lists the presets.

    ``callbacks`` join the configured ones (benchmarks/wall_time.py times a run with one)."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv:
        argv = ["fit", "--config", "quickstart"]
    if argv[:1] == ["presets"]:
        print(describe())
        return None
    try:
        argv = resolve_config_args(argv)
        with import_policy(check_command_line(argv)):  # config files checked, jsonargparse's own lock on
            return NVAECLI(NVAEModule, ImageDataModule, subclass_mode_data=True, args=argv,
                           save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                           trainer_defaults={"callbacks": list(callbacks)} if callbacks else None)
    except (ValueError, FileNotFoundError, DataError, TrainingDiverged, MisconfigurationException) as err:
        if os.environ.get("NVAE_DEBUG"):
            raise
        raise SystemExit(f"train.py: error: {err} (NVAE_DEBUG=1 shows the traceback)") from None
    finally:
        end_distributed()

