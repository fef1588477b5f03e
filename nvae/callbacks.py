"""Lightning callbacks: sample grids and reconstructions (sec. 4), the step guard and the weight EMA.

:class:`SampleGrid` is configured in the presets' YAML; :class:`GuardedSteps` and
:class:`EMAWeights` are added by ``NVAEModule.configure_callbacks`` from ``model.guard`` and
``model.ema_decay``, so every run has them and a checkpoint carries their state.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from nvae.checkpoint import EMA_KEY, GUARD_STATE_KEY, STATE_KEY
from nvae.compat import attached_trainer, grad_scaler
from nvae.data.base import shuffle_seed
from nvae.ema import WeightEMA, estimate_batchnorm, estimate_seed, estimation_batches, seeded
from nvae.guard import REASONS, StepGuard, grad_norm
from nvae.optim import Adamax
from nvae.hparams import GuardConfig


class SampleGrid(L.Callback):
    """After validation every ``every_n_epochs`` epochs and at the end of fit: ``num_samples``
    prior samples at each of ``temperatures`` and ``num_reconstructions`` validation images above
    their reconstructions, saved as ``<log_dir>/samples/*.png`` and logged to TensorBoard
    (``samples/t<T>``, ``reconstructions``) when the logger is one. Rank 0 only; validation uses
    the EMA weights (with their BatchNorm statistics) when the model keeps them, and so do these
    images, the final ones included."""

    def __init__(self, num_samples: int = 64, temperatures: Sequence[float] = (1.0, 0.8, 0.6),
                 every_n_epochs: int = 1, num_reconstructions: int = 8) -> None:
        """
        Args:
            num_samples: Images per sample grid.
            temperatures: Prior temperatures, one grid each (the paper samples at 0.6-1.0).
            every_n_epochs: Write the images after every this many validation epochs.
            num_reconstructions: Validation images shown with their reconstructions (0: none).
        """
        super().__init__()
        if num_samples < 1 or every_n_epochs < 1 or num_reconstructions < 0:
            raise ValueError("SampleGrid: num_samples and every_n_epochs must be >= 1, num_reconstructions >= 0")
        if not temperatures or min(temperatures) < 0:
            raise ValueError(f"SampleGrid: temperatures must be a non-empty list of values >= 0, got {temperatures}")
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.temperatures = [float(t) for t in temperatures]
        self.num_reconstructions = num_reconstructions
        self.inputs: Optional[torch.Tensor] = None
        self.last_paths: list[Path] = []

    @property
    def last_path(self) -> Optional[Path]:
        """The last grid written (the first temperature's)."""
        return self.last_paths[0] if self.last_paths else None

    def _out_dir(self, trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    def on_validation_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self.num_reconstructions and self.inputs is None:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.inputs = x[: self.num_reconstructions].detach().float().cpu()

    def _save(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> None:
        # On every process: under DDP trainer.log_dir is a broadcast, and one made by rank 0 alone
        # pairs with the other ranks' next broadcast (the test run after fit then deadlocks).
        self._write(trainer, module, name, self._out_dir(trainer))

    @rank_zero_only
    @torch.no_grad()
    def _write(self, trainer: L.Trainer, module: L.LightningModule, name: str, out: Path) -> None:
        was_training = module.training
        module.eval()
        experiment = getattr(trainer.logger, "experiment", None)
        os.makedirs(out, exist_ok=True)
        self.last_paths = []
        for t in self.temperatures:
            images = module.model.sample(self.num_samples, t).float().cpu()
            grid = make_grid(images, nrow=int(self.num_samples ** 0.5), padding=2, pad_value=0.5)
            path = out / f"{name}_t{t:g}.png"
            save_image(grid, path)
            self.last_paths.append(path)
            if hasattr(experiment, "add_image"):
                experiment.add_image(f"samples/t{t:g}", grid, global_step=trainer.global_step)
        if self.inputs is not None:
            x = self.inputs.to(module.device)
            recon = module.model.reconstruct(x).float().cpu()
            grid = make_grid(torch.cat([x.cpu(), recon]), nrow=x.shape[0], padding=2, pad_value=0.5)
            save_image(grid, out / f"{name}_reconstructions.png")
            if hasattr(experiment, "add_image"):
                experiment.add_image("reconstructions", grid, global_step=trainer.global_step)
        module.train(was_training)

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.inputs = None  # the first batch of this validation is shown

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._save(trainer, module, f"epoch{trainer.current_epoch:04d}")

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """The final grids, of the EMA weights with their statistics when the model keeps them (as the
        grids drawn after each validation are): swapped in on every process, no collective."""
        ema = next((c for c in trainer.callbacks if isinstance(c, EMAWeights) and not c.swapped), None)
        if ema is not None:
            ema.swap(module, True)
        try:
            self._save(trainer, module, "final")
        finally:
            if ema is not None:
                ema.swap(module, False)


def _new_guard(config: GuardConfig) -> StepGuard:
    return StepGuard(config.grad_skip_factor, config.grad_skip_floor, rollback_after=config.rollback_after,
                     rollback_lr_factor=config.rollback_lr_factor, max_rollbacks=config.max_rollbacks,
                     snapshot_every=config.snapshot_every)


class GuardedSteps(L.Callback):
    """Skip non-finite or spiking updates (all processes agree), roll back after too many (:mod:`nvae.guard`).

    After the backward pass and before the optimizer step the guard decides on the device: the
    decision reaches the optimizer as a 0-d tensor (:meth:`nvae.optim.Adamax.apply_if`), so a step
    reads nothing back to the host. Every ``check_every`` steps (and under a gradient scaler, whose
    scale is a host value anyway, every step) the counters are read: after ``rollback_after``
    consecutive skips the last good snapshot is restored and the learning-rate schedule's base rates
    are multiplied by ``rollback_lr_factor`` (saved with the scheduler); BatchNorm statistics a bad
    forward pass made non-finite are put back; a snapshot is taken every ``snapshot_every`` good
    steps. The guard's counters are this callback's checkpoint state.
    """

    def __init__(self, config: GuardConfig) -> None:
        every = config.check_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"model.guard.check_every must be an integer >= 1 (steps between reads of the guard's "
                             f"counters), got {every!r}")
        self.config = config
        self.guard = _new_guard(config)
        self.loss_bad: Optional[torch.Tensor] = None
        self.keep: Optional[torch.Tensor] = None
        """The last step's decision on the device: 1.0 if it updated, 0.0 if it was skipped."""
        self.rolled_back = False
        """Whether the last optimizer step rolled the model back."""
        self._skipped_seen = 0  # the guard's skip count at the last read
        self._snapshot_at = -1  # its good-step count at the last snapshot

    @property
    def state_key(self) -> str:
        return GUARD_STATE_KEY  # where checkpoints keep the counters (nvae.checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.clone() for k, v in self.guard.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The counters from a checkpoint; ValueError naming the entry unless each is a finite tensor
        of its shape, counts non-negative (a file cannot make the guard misjudge or crash later)."""
        own = self.guard.state_dict()
        entry = f"checkpoint callbacks.{GUARD_STATE_KEY}"
        if not isinstance(state_dict, dict) or set(state_dict) != set(own):
            raise ValueError(f"{entry} must hold exactly {', '.join(sorted(own))}")
        for key, value in state_dict.items():
            ok = (isinstance(value, torch.Tensor) and value.shape == own[key].shape and not value.is_complex()
                  and bool(torch.isfinite(value).all()) and bool((value >= 0).all()))
            if not ok:
                raise ValueError(f"{entry}.{key} must be a finite, non-negative tensor of shape {tuple(own[key].shape)}")
        self.guard.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()})
        self._skipped_seen = int(self.guard.skipped)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Counters of this process's own: under ddp_spawn the processes receive this object with its
        tensors in shared memory, where every process would count every skip."""
        state = {k: v.clone() for k, v in self.guard.state_dict().items()}
        self.guard = _new_guard(self.config)
        self.guard.load_state_dict(state)
        self._skipped_seen = int(self.guard.skipped)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.loss_bad = (~torch.isfinite(loss.detach())).to(torch.float32)  # on the device, not read

    def _reads_at(self, trainer: L.Trainer, step: int) -> bool:
        """Whether step ``step`` (0-based) reads the guard's counters back (see the class docstring)."""
        return grad_scaler(trainer) is not None or (step + 1) % self.config.check_every == 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.guard.to(pl_module.device)
        norm = grad_norm(pl_module.parameters()).to(pl_module.device)
        bad = self.loss_bad if self.loss_bad is not None else torch.zeros((), device=pl_module.device)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad.to(pl_module.device), reduce_op="sum")  # any process with a bad loss
        scaler = grad_scaler(trainer)
        loss_scale = None if scaler is None else float(scaler.get_scale())  # the scale of this step's backward
        self.keep, reason = self.guard.decide(bad.to(pl_module.device), norm, loss_scale)
        self.rolled_back = False
        pl_module.log("train/grad_norm", norm, batch_size=1)
        if loss_scale is not None:
            pl_module.log("train/loss_scale", loss_scale, batch_size=1)
        if isinstance(optimizer, Adamax):
            optimizer.apply_if(self.keep)
        elif not bool(self.keep):  # another optimizer: skipping needs the decision on the host
            for p in pl_module.parameters():
                p.grad = None  # torch's optimizers leave parameters without gradients untouched
        if not self._reads_at(trainer, trainer.global_step):
            return
        skipped = int(self.guard.skipped)
        if skipped > self._skipped_seen or REASONS[int(reason)] == "overflow":
            self.guard.repair_buffers(pl_module)  # BatchNorm statistics of a bad forward pass
        self._skipped_seen = skipped
        if self.guard.should_roll_back:
            self.guard.roll_back(pl_module, optimizer)
            if isinstance(optimizer, Adamax):
                optimizer.apply_if(torch.zeros((), device=pl_module.device))  # not this step's gradients
            else:
                for p in pl_module.parameters():
                    p.grad = None
            for config in trainer.lr_scheduler_configs:
                sched = config.scheduler
                sched.base_lrs = [lr * self.config.rollback_lr_factor for lr in sched.base_lrs]
            self.rolled_back = True
            rank_zero_info(f"nvae: step {trainer.global_step}: {self.config.rollback_after} bad steps in a row, "
                           f"rolled back to the last good weights; learning rate x{float(self.guard.lr_scale):g} "
                           f"(rollback {int(self.guard.rollbacks)} of at most {self.config.max_rollbacks})")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._reads_at(trainer, trainer.global_step - 1) or self._snapshot_at < 0:  # the step just taken
            self._maybe_snapshot(pl_module)
        g = self.guard
        pl_module.log_dict({"train/skipped_steps": g.skipped.float(), "train/rollbacks": g.rollbacks.float(),
                            "train/lr_scale": g.lr_scale.float()}, batch_size=1)

    def _maybe_snapshot(self, pl_module: L.LightningModule) -> None:
        """After a good step: a snapshot when none was taken yet or ``snapshot_every`` good steps have passed
        since the last one's multiple (reads the device)."""
        if self.config.rollback_after == 0 or self.rolled_back or (self.keep is not None and not bool(self.keep)):
            return
        good = int(self.guard.good_steps)
        every = self.config.snapshot_every
        if self._snapshot_at >= 0 and good // every <= self._snapshot_at // every:
            return
        if self.guard.take_snapshot(pl_module, pl_module.optimizers().optimizer):
            self._snapshot_at = good


class EMAWeights(L.Callback):
    """An exponential moving average of the model's weights (``model.ema_decay``, reached after a
    warm-up: :meth:`nvae.ema.WeightEMA.decay_at`), updated after every step the guard let through and
    restarted at a rollback. Validation and test run on it with BatchNorm statistics of its own,
    re-estimated on ``bn_batches`` training batches whenever the average moved since the last
    estimate (:mod:`nvae.ema`; under DDP every process takes rank 0's), and checkpoints carry both
    (``nvae_ema``), so sampling and evaluation use them. The live model's weights and statistics are
    put back unchanged after each use; the sanity check before training runs the live model."""

    def __init__(self, decay: float, guard: Optional[GuardedSteps] = None, bn_batches: int = 20) -> None:
        self.decay, self.guard, self.bn_batches = decay, guard, bn_batches
        self.ema: Optional[WeightEMA] = None
        self._to_load: Optional[dict[str, torch.Tensor]] = None
        self._step_seen = 0
        """``trainer.global_step`` at the last update: a batch that ends at the same step took no optimizer
        step (a micro-batch of gradient accumulation), and the average stays."""

    @property
    def swapped(self) -> bool:
        """Whether the model holds the averages now."""
        return self.ema is not None and self.ema.swapped

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._to_load = checkpoint.get(EMA_KEY)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ema = None
        self._restore(pl_module, statistics=False)  # a resumed run estimates them again from its training data
        if self.ema is None:  # a fresh run: the average starts at the live weights
            self.ema = WeightEMA(pl_module.model, self.decay)
        self._step_seen = trainer.global_step

    def _restore(self, pl_module: L.LightningModule, statistics: bool = True) -> None:
        """The averages of the checkpoint this run just loaded (``ckpt_path`` of fit, validate or test): a
        validation or test on a checkpoint runs that checkpoint's averages with its statistics, not those
        left in memory."""
        if self._to_load is not None:
            self.ema = WeightEMA(pl_module.model, self.decay)
            self.ema.load(self._to_load, pl_module.model, statistics)
        self._to_load = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.ema is None or trainer.global_step == self._step_seen:
            return
        self._step_seen = trainer.global_step
        if self.guard is not None and self.guard.rolled_back:
            self.ema = WeightEMA(pl_module.model, self.decay)
        else:  # after a skipped step the weights are unchanged, and so is their average (the guard's flag)
            self.ema.update(pl_module.model, trainer.global_step, None if self.guard is None else self.guard.keep)

    def swap(self, pl_module: L.LightningModule, on: bool, share: bool = False) -> None:
        """Put the averages with their BatchNorm statistics into the model (on; estimated first when
        the average moved since, rank 0's taken by every process when ``share``) or the live weights
        and statistics back (off)."""
        if self.ema is None or self.swapped == on:
            return
        self.ema.swap(pl_module.model)
        if on and self.ema.stats is None:
            self._estimate(pl_module, share)

    def _estimate(self, pl_module: L.LightningModule, share: bool) -> None:
        """Statistics for the averages the model holds now, from training batches (:mod:`nvae.ema`)."""
        trainer = attached_trainer(pl_module)
        loader = trainer.train_dataloader if trainer is not None else None
        if not isinstance(loader, DataLoader):
            rank_zero_warn("nvae: no training data to estimate the EMA weights' BatchNorm statistics from (the "
                           "trainer has not loaded any); they are used with the live weights' statistics")
            return
        batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
        if not batch_size:
            raise ValueError("model.ema_bn_batches: the training DataLoader has no batch_size to draw batches "
                             "of for the EMA weights' BatchNorm statistics")
        model, seed = pl_module.model, estimate_seed(shuffle_seed(), trainer.global_step)

        def forward(batch: Any) -> None:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            with model.kernel_bank.in_use():
                model(pl_module._prepare(x.to(pl_module.device)))

        with seeded(seed, pl_module.device), trainer.precision_plugin.forward_context():
            batches = estimation_batches(loader.dataset, batch_size, self.bn_batches, loader.collate_fn,
                                         torch.Generator().manual_seed(seed))
            stats, counted = estimate_batchnorm(model, batches, forward)
        if share and trainer.world_size > 1:  # every process validates with the same statistics: rank 0's
            counted, stats = trainer.strategy.broadcast((counted, {k: v.cpu() for k, v in stats.items()}), src=0)
        if not counted:
            rank_zero_warn(f"nvae: all {self.bn_batches} batches gave non-finite BatchNorm statistics for the EMA "
                           "weights; they are used with the live weights' statistics")
            return
        self.ema.set_stats(model, stats)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)  # trainer.validate(ckpt_path=...): no fit started
        if not trainer.sanity_checking:  # the sanity check runs the live model: no training batch is loaded yet
            self.swap(pl_module, True, share=True)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap(pl_module, False)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)  # trainer.test(ckpt_path=...): no fit started
        self.swap(pl_module, True, share=True)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap(pl_module, False)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """``nvae_ema``: the averages with their statistics, estimated here (without any collective: an
        emergency save runs on rank 0 alone) when the average moved since the last estimate."""
        if self.ema is None:
            return
        if self.swapped:  # saved during validation (e.g. preempted): the model holds the averages now
            live = {**self.ema.params, **(self.ema.live_stats or {})}
            checkpoint[STATE_KEY].update({f"model.{n}": v.detach().clone() for n, v in live.items()})
        elif self.ema.stats is None:
            self.swap(pl_module, True)
            self.swap(pl_module, False)
        checkpoint[EMA_KEY] = self.ema.state_dict(pl_module.model)
