"""NVAEModule: the training, validation and test steps of NVAE, its optimizer and schedule (paper sec. 3.2, appendix A).

Adamax (``torch.optim.Adamax``) with linear learning-rate warm-up then cosine decay, KL warm-up
and balancing, spectral and BatchNorm regularization. The hyper-parameters come in groups
(:mod:`nvae.hparams`); the step guard, the weight EMA, exact resume and preemption are callbacks
built by :mod:`nvae.training`, which the module adds. Checkpoints
hold plain-dict hyper-parameters, so a checkpoint alone rebuilds the model.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from nvae.checkpoint import (DATA_KEY, FORMAT_KEY, FORMAT_VERSION, check_compatible, check_names, model_hparams,
                             read_checkpoint, upgrade)
from nvae.checkpoint_state import check_training_state, sanitize_paths
from nvae.compat import attached_trainer, writes_logs_this_step
from nvae.ema import MAX_BN_BATCHES
from nvae.hparams import GuardConfig, ObjectiveConfig, OptimConfig, as_group
from nvae.limits import check_fits
from nvae.loading import check_state, described_model
from nvae.model import NVAE, NVAEConfig, NVAEOutput
from nvae.objectives import (NELBO, batchnorm_gammas, batchnorm_penalty, bits_per_dim, kl_balance_alpha, kl_warmup,
                             layer_index, nelbo, regularization_coeff)
from nvae.optim import Adamax
from nvae.spec import ImageSpec
from nvae.spectral import SpectralRegularizer
from nvae.training import TrainingCallbacks


class NVAEModule(L.LightningModule):
    """Trains an :class:`nvae.model.NVAE` by minimizing the regularized negative ELBO."""

    def __init__(
        self,
        arch: NVAEConfig = NVAEConfig(),
        image_spec: Optional[ImageSpec] = None,
        optim: OptimConfig = OptimConfig(),
        objective: ObjectiveConfig = ObjectiveConfig(),
        guard: GuardConfig = GuardConfig(),
        ema_decay: Optional[float] = None,
        ema_bn_batches: int = 20,
        channels_last: bool = False,
        gradient_checkpointing: Union[bool, Literal["none", "cell", "group"]] = False,
        compile: bool = False,
        active_kl_threshold: float = 0.1,
    ) -> None:
        """
        Args:
            arch: Network architecture (paper table 6).
            image_spec: Image shape and bit depth; linked from the data module by the command line.
            optim: Adamax and its learning-rate schedule.
            objective: KL warm-up and balancing, spectral and BatchNorm regularization.
            guard: Skipping bad steps and rolling back.
            ema_decay: Keep an exponential moving average of the weights with this decay (e.g.
                0.9999; after step n the decay is min(ema_decay, (1 + n) / (10 + n)), so the random
                initialization fades), used for validation, sampling and evaluation and saved in
                checkpoints; null: none.
            ema_bn_batches: Training batches the EMA weights' BatchNorm statistics are re-estimated on
                (train mode, no gradients, cumulative average) before they are validated, tested or
                saved, whenever they changed since the last estimate (nvae.ema; sec. 5.2 readjusts
                BatchNorm the same way before sampling).
            channels_last: Run convolutions in channels_last memory format (faster on CPU; see
                docs/performance.md).
            gradient_checkpointing: Recompute activations during backward instead of storing them:
                ``group`` (or true) per latent group, encoder group and pre-/postprocessing stack;
                ``cell`` cell by cell; false/``none``: off.
            compile: torch.compile the forward pass (the first step compiles, for minutes on CPU).
            active_kl_threshold: A latent channel counts as active (TensorBoard
                train/active_channels/*) when its KL, summed over positions and averaged over the
                batch, exceeds this many nats.
        """
        super().__init__()
        arch = as_group(arch, NVAEConfig, "arch")
        image_spec = as_group(image_spec, ImageSpec, "image_spec")
        self.optim = as_group(optim, OptimConfig, "optim")
        self.objective = as_group(objective, ObjectiveConfig, "objective")
        guard_config = as_group(guard, GuardConfig, "guard")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"model.ema_decay must be in (0, 1) or null, got {ema_decay}")
        if isinstance(ema_bn_batches, bool) or not isinstance(ema_bn_batches, int) or \
                not 1 <= ema_bn_batches <= MAX_BN_BATCHES:
            raise ValueError(f"model.ema_bn_batches must be an integer in 1..{MAX_BN_BATCHES}, got {ema_bn_batches!r}")
        self.save_hyperparameters({  # plain dicts: loadable with torch.load(weights_only=True)
            "arch": asdict(arch), "image_spec": asdict(image_spec), "optim": asdict(self.optim),
            "objective": asdict(self.objective), "guard": asdict(guard_config), "ema_decay": ema_decay,
            "ema_bn_batches": ema_bn_batches, "channels_last": channels_last,
            "gradient_checkpointing": gradient_checkpointing, "compile": compile,
            "active_kl_threshold": active_kl_threshold})
        self.spec, self.channels_last, self.active_kl_threshold = image_spec, channels_last, active_kl_threshold
        check_fits(image_spec, arch, NVAE, "model.arch and image_spec")  # sized on the meta device before allocating
        self.model = NVAE(image_spec, arch)
        power_iters = self.objective.power_iters
        self.spectral = SpectralRegularizer(self.model, power_iters=power_iters, initial_iters=10 * power_iters)
        self._bn_gammas = batchnorm_gammas(self.model)  # parameters: the same after SyncBatchNorm or .to()
        self.register_buffer("_bn_index", layer_index(self._bn_gammas), persistent=False)  # moves with .to()
        topology = self.model.topology
        self.register_buffer("alpha", kl_balance_alpha(topology.group_scales, topology.groups_per_scale),
                             persistent=False)
        self.run_callbacks = TrainingCallbacks.build(guard_config, ema_decay, ema_bn_batches)  # nvae.training: the guard, EMA, ...
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.set_checkpointing(gradient_checkpointing)
        if compile:
            self.model.compile()  # whole forward pass, in place (state-dict keys unchanged)

    def configure_callbacks(self) -> list[L.Callback]:
        """What a run needs around the objective (:class:`nvae.training.TrainingCallbacks`), once per
        trainer: fit, then test, share the same objects."""
        own = self.run_callbacks.all()
        trainer = attached_trainer(self)
        present = {type(c) for c in trainer.callbacks} if trainer is not None else set()
        return [c for c in own if type(c) not in present]  # attached once per trainer

    # ----------------------------------------------------------------------------- schedules
    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (KL warm-up and LR schedule are relative to it)."""
        trainer = attached_trainer(self)
        return max(int(trainer.estimated_stepping_batches), 1) if trainer is not None else 1

    def kl_coeff(self) -> float:
        o = self.objective
        return kl_warmup(self.global_step, self.total_steps, o.kl_anneal_portion, o.kl_const_portion, o.kl_min_coeff)

    def _lr_factor(self, step: int, warmup_steps: int) -> float:
        """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to lr_min / lr."""
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        floor = self.optim.learning_rate_min / self.optim.learning_rate
        progress = min((step - warmup_steps) / max(self.total_steps - warmup_steps, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _steps_per_epoch(self) -> float:
        """Optimizer steps per epoch: the epoch's batches when known (a run cut short by max_steps has
        fewer steps than max_epochs full epochs), else the run's steps over its epochs (max_steps
        without max_epochs: one epoch)."""
        trainer = self.trainer
        total = self.total_steps  # with max_epochs set, this loads the training data (its batches are known)
        batches = trainer.num_training_batches
        if isinstance(batches, int) and batches > 0:
            return max(batches // max(trainer.accumulate_grad_batches, 1), 1)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        return total / epochs

    def configure_optimizers(self) -> Any:
        o = self.optim
        # torch's Adamax, one kernel per operation over all tensors, whose update the step guard can
        # cancel on the device (nvae.optim)
        opt = Adamax(self.parameters(), lr=o.learning_rate, weight_decay=o.weight_decay, eps=o.adamax_eps)
        warmup = max(min(int(o.warmup_epochs * self._steps_per_epoch()), self.total_steps), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self._lr_factor(step, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the format version and the data module (class path and arguments)."""
        checkpoint[FORMAT_KEY] = FORMAT_VERSION
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "hparams"):
            cls = type(datamodule)
            checkpoint[DATA_KEY] = {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                                    "init_args": {k: v for k, v in datamodule.hparams.items()
                                                  if not k.startswith("_")}}  # not LightningCLI's entries

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Union[str, Path], map_location: Any = None,  # type: ignore[override]
                             hparams_file: Optional[str] = None, strict: Optional[bool] = None,
                             weights_only: Optional[bool] = None, **kwargs: Any) -> "NVAEModule":
        """Lightning's loader, made safe: the file is read with ``weights_only=True`` and its names checked
        (:func:`nvae.checkpoint.check_names`), and the module is built from its hyper-parameters directly,
        never through a class or function the file names (Lightning's ``_instantiator``). ``kwargs``
        override hyper-parameters, as in Lightning."""
        if hparams_file is not None or weights_only is False:
            raise ValueError("NVAEModule.load_from_checkpoint: hparams_file and weights_only=False are not supported "
                             "(nvae checkpoints hold their hyper-parameters and load with weights_only=True)")
        checkpoint = read_checkpoint(checkpoint_path, map_location=map_location)
        source = f"checkpoint '{checkpoint_path}'"
        saved = model_hparams(checkpoint, source)
        described_model(saved, source, NVAE)  # its size checked before NVAEModule builds it
        accepted = inspect.signature(cls.__init__).parameters
        hparams = {k: v for k, v in {**saved, **kwargs}.items() if k in accepted and k != "self"}
        try:
            module = cls(**hparams)
        except TypeError as err:
            raise ValueError(f"{source}: hyper_parameters do not describe an {cls.__name__} ({err})") from None
        except ValueError as err:  # a setting out of its range, named by the check that refused it
            raise ValueError(f"{source}: {err}") from None
        module.on_load_checkpoint(checkpoint)
        strict = module.strict_loading if strict is None else strict
        if strict:  # every tensor there, of its shape and kind, finite: one line naming the first that is not
            check_state(checkpoint["state_dict"], module.state_dict(), f"{source}: state_dict")
        module.load_state_dict(checkpoint["state_dict"], strict=strict)
        if isinstance(map_location, (str, torch.device)):
            module.to(map_location)
        return module

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that names code (:func:`nvae.checkpoint.check_names`), or of another
        architecture or format (naming what differs); bring an older format up to date in place."""
        trainer = attached_trainer(self)
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        source = f"checkpoint '{path}'" if path else "checkpoint"
        check_names(checkpoint, source)
        upgrade(checkpoint, source)
        check_compatible(checkpoint, dict(self.hparams))
        check_training_state(checkpoint, source)
        if trainer is not None:  # Lightning hands the callbacks their states after this hook
            folders = [getattr(cb, "dirpath", None) for cb in trainer.checkpoint_callbacks]
            for dropped in sanitize_paths(checkpoint, [f for f in folders if f]):
                rank_zero_warn(f"{source}: {dropped} is not a file in this run's checkpoint folder; forgotten "
                               "(nvae never lets a checkpoint name files to remove)")

    def on_fit_end(self) -> None:
        """Hyperparameters with the final validation bits/dim (TensorBoard's HPARAMS tab)."""
        bpd = self.trainer.callback_metrics.get("val/bpd")
        if self.logger is None or bpd is None:
            return
        if isinstance(self.logger, TensorBoardLogger):  # the only logger whose log_hyperparams takes metrics
            self.logger.log_hyperparams(dict(self.hparams), {"hp/val_bpd": float(bpd)})
        else:
            self.logger.log_hyperparams(dict(self.hparams))

    # ----------------------------------------------------------------------------- steps
    def _prepare(self, x: Union[torch.Tensor, list, tuple]) -> torch.Tensor:
        x = x[0] if isinstance(x, (list, tuple)) else x
        spec = self.spec
        if x.dim() != 4 or x.shape[1:] != (spec.channels, spec.size, spec.size):
            raise ValueError(f"batch of shape {tuple(x.shape)} does not match model.image_spec (channels "
                             f"{spec.channels}, size {spec.size}): the data gives other images than the model was "
                             "built for; check data.channels / data.image_size")
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _nelbo(self, x: torch.Tensor, beta: float, balance: bool) -> tuple[NVAEOutput, NELBO]:
        out = self.model(x)
        with torch.autocast(x.device.type, enabled=False):
            log_px = self.model.log_likelihood(out.likelihood, x.float())
            terms = nelbo(log_px.float(), out.kl.float(), beta, self.alpha, balance)
        return out, terms

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, NVAEOutput, NELBO, dict[str, Any]]:
        """The regularized objective of one batch: NELBO with KL warm-up/balancing + lambda (SR + BN)."""
        beta = self.kl_coeff()
        o = self.objective
        with self.model.kernel_bank.in_use() as stacks:  # kernels made in a few batched calls
            out, terms = self._nelbo(x, beta, o.kl_balance)
            spectral = self.spectral(stacks)  # power iteration on the same stacks
        lam = regularization_coeff(beta, o.spectral_reg_coeff, o.spectral_reg_coeff_init)
        bn = batchnorm_penalty(self._bn_gammas, self._bn_index)
        loss = terms.loss + lam * (spectral + bn)
        log = {"loss": loss, "nelbo": terms.nelbo.mean(), "recon": terms.recon.mean(), "kl": terms.kl.mean(),
               "bpd": bits_per_dim(terms.nelbo.mean(), self.spec.num_dims), "kl_coeff": beta,
               "spectral": spectral, "bn_penalty": bn, "reg_coeff": lam}
        return loss, out, terms, log

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self._prepare(batch)
        loss, out, terms, log = self.training_loss(x)
        trainer = attached_trainer(self)
        if trainer is None or writes_logs_this_step(trainer):  # every trainer.log_every_n_steps
            active = out.kl_channels > self.active_kl_threshold  # (G, L)
            log.update({f"kl_group/{i:02d}": v for i, v in enumerate(out.kl.mean(dim=0))})
            log.update({f"kl_balance/{i:02d}": v for i, v in enumerate(terms.gamma)})
            log.update({f"active_channels/{i:02d}": v for i, v in enumerate(active.sum(dim=1))})
            log["active_channels/total"] = active.sum()
        self.log_dict({f"train/{k}": v for k, v in self._mean_over_processes(log).items()},
                      batch_size=x.shape[0])
        self.log("loss", log["loss"], prog_bar=True, logger=False, batch_size=x.shape[0])
        self.log("bpd", log["bpd"], prog_bar=True, logger=False, batch_size=x.shape[0])
        return loss

    def _mean_over_processes(self, log: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Detached scalars averaged over all processes in one collective (no-op on one process)."""
        names = list(log)
        values = torch.stack([torch.as_tensor(log[k], dtype=torch.float32, device=self.device).detach()
                              for k in names])  # (M,)
        trainer = attached_trainer(self)
        if trainer is not None and trainer.world_size > 1:
            values = trainer.strategy.reduce(values, reduce_op="mean")
        return dict(zip(names, values))

    def _eval_step(self, batch: Any, stage: str) -> None:
        x = self._prepare(batch)
        with self.model.kernel_bank.in_use():
            _, terms = self._nelbo(x, beta=1.0, balance=False)
        n = x.shape[0]
        self.log(f"{stage}/nelbo", terms.nelbo.mean(), batch_size=n, sync_dist=True, prog_bar=(stage == "val"))
        self.log(f"{stage}/bpd", bits_per_dim(terms.nelbo.mean(), self.spec.num_dims), batch_size=n, sync_dist=True)
        self.log(f"{stage}/recon", terms.recon.mean(), batch_size=n, sync_dist=True)
        self.log(f"{stage}/kl", terms.kl.mean(), batch_size=n, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")
