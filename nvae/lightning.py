"""NVAEModule: training, validation and test steps of NVAE in Lightning (paper sec. 3.2, appendix A).

Adamax (:class:`nvae.optim.Adamax`: torch's update, small parameters stepped together) with linear
learning-rate warm-up then cosine decay, KL warm-up and balancing, spectral and BatchNorm
regularization. Checkpoints hold plain-dict hyperparameters, so a checkpoint alone
rebuilds the model (``NVAEModule.load_from_checkpoint(path)``).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from nvae.checkpoint import (DATA_KEY, EMA_KEY, FORMAT_KEY, FORMAT_VERSION, RNG_KEY, check_names, model_hparams,
                             read_checkpoint, check_compatible)
from nvae.compat import (cpu_capability, cpu_has_bf16, ddp_kwargs, sync_batchnorm_requested,
                          writes_logs_this_step)
from nvae.guard import StepGuard, WeightEMA, grad_norm
from nvae.model import NVAE, NVAEConfig, NVAEOutput
from nvae.objectives import (NELBO, batchnorm_gammas, batchnorm_penalty, bits_per_dim, kl_balance_alpha, kl_warmup,
                             nelbo, regularization_coeff)
from nvae.optim import Adamax
from nvae.spectral import SpectralRegularizer
from nvae.resilience import gather_rng_states, restore_rng
from nvae.spec import ImageSpec

SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # trainer.precision as Lightning spells it


class NVAEModule(L.LightningModule):
    """Trains an :class:`nvae.model.NVAE` by minimizing the regularized negative ELBO."""

    def __init__(
        self,
        arch: NVAEConfig = NVAEConfig(),
        image_spec: Optional[ImageSpec] = None,
        learning_rate: float = 1e-2,
        learning_rate_min: float = 1e-4,
        weight_decay: float = 3e-4,
        adamax_eps: float = 1e-3,
        warmup_epochs: float = 5.0,
        kl_anneal_portion: float = 0.3,
        kl_const_portion: float = 1e-4,
        kl_min_coeff: float = 1e-4,
        kl_balance: bool = True,
        spectral_reg_coeff: float = 1e-2,
        spectral_reg_coeff_init: Optional[float] = None,
        power_iters: int = 4,
        channels_last: bool = False,
        gradient_checkpointing: Union[bool, Literal["none", "cell", "group"]] = False,
        compile: bool = False,
        ema_decay: Optional[float] = None,
        grad_skip_factor: Optional[float] = 10.0,
        grad_skip_floor: float = 1.0,
        rollback_after: int = 20,
        rollback_lr_factor: float = 0.5,
        max_rollbacks: int = 3,
        snapshot_every: int = 100,
        active_kl_threshold: float = 0.1,
    ) -> None:
        """
        Args:
            arch: Network architecture (paper table 6).
            image_spec: Image shape and bit depth; linked from the data module by the command line.
            learning_rate: Peak Adamax learning rate, reached after the warm-up.
            learning_rate_min: Final learning rate of the cosine decay.
            weight_decay: Adamax weight decay.
            adamax_eps: Adamax epsilon (the paper uses 1e-3 for stability).
            warmup_epochs: Epochs of linear learning-rate warm-up.
            kl_anneal_portion: Fraction of training over which the KL weight beta rises to 1.
            kl_const_portion: Fraction of training at the start with beta held at its minimum.
            kl_min_coeff: Minimum KL weight beta.
            kl_balance: Balance the KL across groups while beta < 1 (avoids posterior collapse).
            spectral_reg_coeff: lambda: weight of the spectral and BatchNorm regularizers.
            spectral_reg_coeff_init: If set, lambda starts here and anneals geometrically to
                spectral_reg_coeff as beta goes to 1 (the paper's ImageNet/CelebA-HQ/FFHQ recipe).
            power_iters: Power iterations per step for the spectral norms (10x on the first step).
            channels_last: Run convolutions in channels_last memory format (faster on CPU and GPUs;
                the paper presets turn it on: CIFAR-10 batch 8 on 2 CPU cores 7.6 -> 6.4 s per step).
            gradient_checkpointing: Recompute activations during backward instead of storing them:
                ``group`` (or true) recomputes each latent group, encoder group and pre-/postprocessing
                stack as one unit and keeps only their inputs; ``cell`` recomputes cell by cell (keeps
                every cell's input); false/``none``: off. Measured in the README (Scaling).
            compile: torch.compile the forward pass (the first step compiles: ~100 s on 2 CPU
                cores; on CPU no faster than eager here: MNIST batch 8 0.544 vs 0.557 s per step).
            ema_decay: Keep an exponential moving average of the weights with this decay (e.g.
                0.9999); it is saved in checkpoints and used for validation, sampling and
                evaluation. null: no EMA.
            grad_skip_factor: Skip an update whose gradient norm exceeds this multiple of the
                median of the last 50 norms (and grad_skip_floor); null: skip non-finite steps only.
            grad_skip_floor: The gradient-norm limit never goes below this.
            rollback_after: After this many consecutive skipped steps, return to the last good
                weights and optimizer state and lower the learning rate (0: never).
            rollback_lr_factor: Learning-rate multiplier applied at each rollback.
            max_rollbacks: Stop with an error after this many rollbacks.
            snapshot_every: Good steps between in-memory snapshots for rollbacks (a snapshot costs
                one copy of the weights and the optimizer state in CPU memory).
            active_kl_threshold: A latent channel counts as active (TensorBoard
                train/active_channels/*) when its KL, summed over positions and averaged over the
                batch, exceeds this many nats.
        """
        super().__init__()
        arch = NVAEConfig(**arch) if isinstance(arch, dict) else arch
        image_spec = ImageSpec(**image_spec) if isinstance(image_spec, dict) else (image_spec or ImageSpec())
        hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        hparams.update(arch=asdict(arch), image_spec=asdict(image_spec))
        self.save_hyperparameters(hparams)  # plain dicts: loadable with torch.load(weights_only=True)
        self.model = NVAE(image_spec, arch)
        self.spectral = SpectralRegularizer(self.model, power_iters=power_iters, initial_iters=10 * power_iters)
        self._bn_gammas = batchnorm_gammas(self.model)  # parameters: the same after SyncBatchNorm or .to()
        self.register_buffer("alpha", kl_balance_alpha(self.model.group_scale, self.model.groups_per_scale[::-1]),
                             persistent=False)
        self.spec = image_spec
        self.guard = StepGuard(grad_skip_factor, grad_skip_floor, rollback_after=rollback_after,
                               rollback_lr_factor=rollback_lr_factor, max_rollbacks=max_rollbacks,
                               snapshot_every=snapshot_every)
        self.ema: Optional[WeightEMA] = None
        self._ema_to_load: Optional[dict[str, torch.Tensor]] = None
        self._ema_swapped = False
        self._rng_to_load: Optional[list[dict[str, Any]]] = None
        self._loss_finite = True
        self._step_skipped = False
        self._emergency_save = False  # set by PreemptionCheckpoint: no collectives while saving
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.set_checkpointing(gradient_checkpointing)
        if compile:
            self.model.compile()  # whole forward pass, in place (state-dict keys unchanged)

    # ----------------------------------------------------------------------------- schedules
    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (KL warm-up and LR schedule are relative to it)."""
        trainer = self._trainer
        return max(int(trainer.estimated_stepping_batches), 1) if trainer is not None else 1

    def kl_coeff(self) -> float:
        h = self.hparams
        return kl_warmup(self.global_step, self.total_steps, h.kl_anneal_portion, h.kl_const_portion, h.kl_min_coeff)

    def _lr_factor(self, step: int, warmup_steps: int) -> float:
        """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to lr_min / lr."""
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        floor = self.hparams.learning_rate_min / self.hparams.learning_rate
        progress = min((step - warmup_steps) / max(self.total_steps - warmup_steps, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def configure_optimizers(self) -> Any:
        h = self.hparams
        opt = Adamax(self.parameters(), lr=h.learning_rate, weight_decay=h.weight_decay, eps=h.adamax_eps)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup = min(int(h.warmup_epochs * self.total_steps / epochs), self.total_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: self._lr_factor(step, max(warmup, 1)) * float(self.guard.lr_scale))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self) -> list[L.Callback]:
        """Atomic, finite-only checkpoints and a checkpoint on SIGTERM/SIGINT (nvae.resilience)."""
        from nvae.resilience import PreemptionCheckpoint, SafeCheckpointIO

        present = {type(c) for c in self._trainer.callbacks} if self._trainer is not None else set()
        return [cb() for cb in (SafeCheckpointIO, PreemptionCheckpoint) if cb not in present]  # once per trainer

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the data module, the EMA, every process's RNG states and the format version."""
        checkpoint[FORMAT_KEY] = FORMAT_VERSION
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "hparams"):
            cls = type(datamodule)
            checkpoint[DATA_KEY] = {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                                    "init_args": {k: v for k, v in datamodule.hparams.items()
                                                  if not k.startswith("_")}}  # not LightningCLI's entries
        if self._ema_swapped:  # saved during validation (e.g. preempted): the model holds the averages now
            assert self.ema is not None
            checkpoint["state_dict"].update({f"model.{n}": p.detach().clone() for n, p in self.ema.params.items()})
            checkpoint[EMA_KEY] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        elif self.ema is not None:
            checkpoint[EMA_KEY] = self.ema.state_dict(self.model)
        if self._trainer is not None:
            checkpoint[RNG_KEY] = gather_rng_states(self.trainer, local_only=self._emergency_save)

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
        accepted = inspect.signature(cls.__init__).parameters
        hparams = {k: v for k, v in {**saved, **kwargs}.items() if k in accepted and k != "self"}
        try:
            module = cls(**hparams)
        except TypeError as err:
            raise ValueError(f"{source}: hyper_parameters do not describe an {cls.__name__} ({err})") from None
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading if strict is None else strict)
        if isinstance(map_location, (str, torch.device)):
            module.to(map_location)
        return module

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that names code (:func:`nvae.checkpoint.check_names`), or of another
        architecture or format (naming what differs); stash EMA and RNG."""
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        check_names(checkpoint, f"checkpoint '{path}'" if path else "checkpoint")
        check_compatible(checkpoint, dict(self.hparams))
        self._ema_to_load = checkpoint.get(EMA_KEY)
        self._rng_to_load = checkpoint.get(RNG_KEY)

    def setup(self, stage: str) -> None:
        """Refuse precisions the model does not run in, and SyncBatchNorm under CPU DDP, before any work.

        Under DDP, gradients default to views of DDP's all-reduce buckets (``gradient_as_bucket_view``)
        unless the strategy was given that argument: without it every process holds the gradients
        twice, in the parameters' ``.grad`` and in the buckets (CIFAR-10 preset: 0.49 GiB more per GPU).
        """
        precision = str(self.trainer.precision)
        if precision not in SUPPORTED_PRECISIONS:
            raise ValueError(f"trainer.precision {precision!r} is not supported: use 32, bf16-mixed or 16-mixed "
                             "(float32 weights; the KL, likelihood and spectral norms are computed in float32)")
        strategy = self.trainer.strategy
        if sync_batchnorm_requested(strategy) and self.trainer.world_size > 1 \
                and strategy.root_device.type == "cpu":  # DDP wraps the model after this hook, and fails there
            raise ValueError("trainer.sync_batchnorm needs GPUs: PyTorch's SyncBatchNorm does not run under CPU DDP "
                             "(gloo); drop --trainer.sync_batchnorm on CPU (each process then keeps its own statistics)")
        ddp_args = ddp_kwargs(strategy)  # DDPStrategy's DistributedDataParallel args
        if ddp_args is not None:
            ddp_args.setdefault("gradient_as_bucket_view", True)
        on_cpu = strategy.root_device.type == "cpu"
        if stage == "fit" and precision in ("bf16-mixed", "16-mixed") and on_cpu and not cpu_has_bf16():  # once a run
            rank_zero_warn(f"trainer.precision {precision} on a CPU without bf16 instructions (capability "
                           f"{cpu_capability()}): bf16 runs ~10x slower than float32 here; use --trainer.precision 32")

    def on_fit_start(self) -> None:
        if self.hparams.ema_decay:
            self.ema = WeightEMA(self.model, self.hparams.ema_decay)
            if self._ema_to_load is not None:
                self.ema.load(self._ema_to_load, self.model)
        self._ema_to_load = None

    def on_fit_end(self) -> None:
        """Hyperparameters with the final validation bits/dim (TensorBoard's HPARAMS tab)."""
        bpd = self.trainer.callback_metrics.get("val/bpd")
        if self.logger is not None and bpd is not None:
            self.logger.log_hyperparams(dict(self.hparams), {"hp/val_bpd": float(bpd)})

    def on_train_start(self) -> None:
        """Resume the RNG streams where the checkpoint left them (after the sanity check)."""
        if self._rng_to_load:
            restore_rng(self._rng_to_load, self.trainer.global_rank)
            self._rng_to_load = None

    # ----------------------------------------------------------------------------- guarded updates
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip non-finite or spiking updates (all processes agree), roll back after too many."""
        norm = grad_norm(self.parameters()).to(self.device)
        bad = torch.tensor(0.0 if self._loss_finite else 1.0, device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")  # any process with a bad loss
        scaler = self._grad_scaler()
        loss_scale = None if scaler is None else float(scaler.get_scale())  # the scale of this step's backward
        reason = self.guard.check(bool(bad == 0), float(norm), loss_scale)
        self._step_skipped = bool(reason)
        self.log("train/grad_norm", norm, batch_size=1)
        if loss_scale is not None:
            self.log("train/loss_scale", loss_scale, batch_size=1)
        if reason == "overflow":  # the scaler skips this step and lowers its scale
            self.guard.repair_buffers(self)
            return
        if not reason:
            return
        for p in self.parameters():
            p.grad = None  # Adamax leaves parameters without gradients (and their state) untouched
        if reason == "nonfinite":
            self.guard.repair_buffers(self)
        if self.guard.should_roll_back:
            self.guard.roll_back(self, optimizer)
            if self.ema is not None:
                self.ema = WeightEMA(self.model, self.ema.decay)
            rank_zero_info(f"nvae: step {self.global_step}: {self.hparams.rollback_after} bad steps in a row, "
                           f"rolled back to the last good weights; learning rate x{float(self.guard.lr_scale):g} "
                           f"(rollback {int(self.guard.rollbacks)} of at most {self.hparams.max_rollbacks})")

    def _grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """Lightning's gradient scaler under 16-mixed (it unscales the gradients before the hook above)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._step_skipped:
            if self.ema is not None:
                self.ema.update(self.model)
            self.guard.maybe_snapshot(self, self.optimizers().optimizer)
        self.log_dict({"train/skipped_steps": self.guard.skipped.float(), "train/rollbacks": self.guard.rollbacks.float(),
                       "train/lr_scale": self.guard.lr_scale.float()}, batch_size=1)

    # ----------------------------------------------------------------------------- EMA for evaluation
    def _swap_ema(self, on: bool) -> None:
        if self.ema is not None and self._ema_swapped != on:
            self.ema.swap(self.model)
            self._ema_swapped = on

    def on_validation_epoch_start(self) -> None:
        self._swap_ema(True)

    def on_validation_epoch_end(self) -> None:
        self._swap_ema(False)

    def on_test_epoch_start(self) -> None:
        self._swap_ema(True)

    def on_test_epoch_end(self) -> None:
        self._swap_ema(False)

    # ----------------------------------------------------------------------------- steps
    def _prepare(self, x: Union[torch.Tensor, list, tuple]) -> torch.Tensor:
        x = x[0] if isinstance(x, (list, tuple)) else x
        spec = self.spec
        if x.dim() != 4 or x.shape[1:] != (spec.channels, spec.size, spec.size):
            raise ValueError(f"batch of shape {tuple(x.shape)} does not match model.image_spec (channels "
                             f"{spec.channels}, size {spec.size}): the data gives other images than the model was "
                             "built for; check data.channels / data.image_size")
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def _nelbo(self, x: torch.Tensor, beta: float, balance: bool) -> tuple[NVAEOutput, NELBO]:
        out = self.model(x)
        with torch.autocast(x.device.type, enabled=False):
            log_px = self.model.log_likelihood(out.likelihood, x.float())
            terms = nelbo(log_px.float(), out.kl.float(), beta, self.alpha, balance)
        return out, terms

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, NVAEOutput, NELBO, dict[str, Any]]:
        """The regularized objective of one batch: NELBO with KL warm-up/balancing + lambda (SR + BN)."""
        beta = self.kl_coeff()
        out, terms = self._nelbo(x, beta, self.hparams.kl_balance)
        lam = regularization_coeff(beta, self.hparams.spectral_reg_coeff, self.hparams.spectral_reg_coeff_init)
        spectral = self.spectral()
        bn = batchnorm_penalty(self._bn_gammas)
        loss = terms.loss + lam * (spectral + bn)
        log = {"loss": loss, "nelbo": terms.nelbo.mean(), "recon": terms.recon.mean(), "kl": terms.kl.mean(),
               "bpd": bits_per_dim(terms.nelbo.mean(), self.spec.num_dims), "kl_coeff": beta,
               "spectral": spectral, "bn_penalty": bn, "reg_coeff": lam}
        return loss, out, terms, log

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self._prepare(batch)
        loss, out, terms, log = self.training_loss(x)
        self._loss_finite = bool(torch.isfinite(loss))
        if self._writes_logs_this_step():
            active = out.kl_channels > self.hparams.active_kl_threshold  # (G, L)
            log.update({f"kl_group/{i:02d}": v for i, v in enumerate(out.kl.mean(dim=0))})
            log.update({f"kl_balance/{i:02d}": v for i, v in enumerate(terms.gamma)})
            log.update({f"active_channels/{i:02d}": v for i, v in enumerate(active.sum(dim=1))})
            log["active_channels/total"] = active.sum()
        self.log_dict({f"train/{k}": v for k, v in self._mean_over_processes(log).items()},
                      batch_size=x.shape[0])
        self.log("loss", log["loss"], prog_bar=True, logger=False, batch_size=x.shape[0])
        self.log("bpd", log["bpd"], prog_bar=True, logger=False, batch_size=x.shape[0])
        return loss

    def _writes_logs_this_step(self) -> bool:
        """True on the steps Lightning writes to the logger (every trainer.log_every_n_steps)."""
        if self._trainer is None:
            return True
        return writes_logs_this_step(self.trainer)

    def _mean_over_processes(self, log: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Detached scalars averaged over all processes in one collective (no-op on one process)."""
        names = list(log)
        values = torch.stack([torch.as_tensor(log[k], dtype=torch.float32, device=self.device).detach()
                              for k in names])  # (M,)
        if self._trainer is not None and self.trainer.world_size > 1:
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
        return dict(zip(names, values))

    def _eval_step(self, batch: Any, stage: str) -> None:
        x = self._prepare(batch)
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
