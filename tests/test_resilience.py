"""Runs that survive: skipped bad steps, rollbacks, EMA, exact resume, preemption, safe checkpoints."""
from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any, Optional

import lightning as L
import pytest
import torch
from torch.utils.data import Dataset

from conftest import random_images, tiny_config
from nvae.checkpoint import check_compatible
from nvae.data import register_datamodule
from nvae.data.base import ImageDataModule
from nvae.guard import StepGuard, TrainingDiverged
from nvae.checkpoint import EMA_KEY, RNG_KEY
from nvae.hparams import group_flat_hparams
from nvae.lightning import NVAEModule
from nvae.resilience import AtomicTorchCheckpointIO, last_checkpoint_path
from nvae.spec import ImageSpec

SPEC = ImageSpec(channels=1, size=16, num_bits=1, pad=2)


@register_datamodule  # its checkpoints name it: resuming checks that the name is allowed
class RandomBinary(ImageDataModule):
    """24 fixed random binary images (6 batches of 4 per epoch), 8 held out."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__(root="", batch_size=batch_size)

    @property
    def image_spec(self) -> ImageSpec:
        return SPEC

    def build_datasets(self) -> tuple[Dataset, Optional[Dataset], Dataset]:
        x = random_images(SPEC, n=32, seed=3)
        return list(x[:24]), None, list(x[24:])


class Inject(L.Callback):
    """Fault injection: a NaN loss at the given steps, or SIGTERM after step ``sigterm_after``."""

    def __init__(self, nan_steps: tuple[int, ...] = (), sigterm_after: Optional[int] = None,
                 signum: int = signal.SIGTERM) -> None:
        self.nan_steps, self.sigterm_after, self.signum = set(nan_steps), sigterm_after, signum
        self.weights_before: dict[int, torch.Tensor] = {}
        self.weights_after: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: NVAEModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self.weights_before[step] = torch.cat([p.detach().flatten() for p in module.parameters()]).clone()
        if step in self.nan_steps:
            original = module.training_loss

            def poisoned(x: torch.Tensor) -> Any:
                module.training_loss = original  # one step only
                loss, *rest = original(x)
                return (loss * float("nan"), *rest)

            module.training_loss = poisoned

    def on_train_batch_end(self, trainer: L.Trainer, module: NVAEModule, *_: Any) -> None:
        step = trainer.global_step - 1
        self.weights_after[step] = torch.cat([p.detach().flatten() for p in module.parameters()]).clone()
        if self.sigterm_after is not None and step == self.sigterm_after:
            os.kill(os.getpid(), self.signum)


def fit(tmp: Path, max_steps: int, callbacks: list[L.Callback] = (), ckpt_path: Optional[str] = None,
        **module_args: Any) -> tuple[L.Trainer, NVAEModule]:
    L.seed_everything(0, verbose=False)
    module = NVAEModule(arch=tiny_config(), image_spec=SPEC, **group_flat_hparams({"warmup_epochs": 0.5, **module_args}))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp), limit_val_batches=1,
                        num_sanity_val_steps=1, callbacks=list(callbacks))
    trainer.fit(module, datamodule=RandomBinary(), ckpt_path=ckpt_path)
    return trainer, module


# ---------------------------------------------------------------------------------------------- StepGuard
def test_guard_skips_spikes_and_nonfinite_and_its_threshold_follows_the_run() -> None:
    guard = StepGuard(skip_factor=10.0, skip_floor=1.0, window=8, min_history=4, rollback_after=0)
    for _ in range(4):
        assert guard.check(True, 2.0) == ""
    assert guard.threshold() == pytest.approx(20.0)
    assert guard.check(True, 25.0) == "spike"
    assert guard.check(False, 2.0) == "nonfinite" and guard.check(True, math.nan) == "nonfinite"
    assert int(guard.skipped) == 3 and int(guard.consecutive) == 3
    # the norm rises for good: skipped norms fill the window, the median follows, skipping stops
    decisions = [guard.check(True, 300.0) for _ in range(8)]
    assert decisions[0] == "spike" and decisions[-1] == "" and int(guard.consecutive) == 0
    assert "" in decisions[:6]  # well before the window is full of the new level


def test_guard_leaves_a_gradient_scalers_overflow_to_the_scaler() -> None:
    """Under 16-mixed an inf gradient of a finite loss is the loss scale's overflow: not a bad step."""
    guard = StepGuard(rollback_after=2)
    assert [guard.check(True, math.inf, loss_scale=2.0 ** k) for k in range(16, 10, -1)] == ["overflow"] * 6
    assert int(guard.skipped) == 0 and int(guard.consecutive) == 0 and not guard.should_roll_back
    assert int(guard.num_norms) == 0  # an overflow's norm does not enter the window
    assert guard.check(False, math.inf, loss_scale=1024.0) == "nonfinite"  # the loss itself is bad
    assert guard.check(True, math.nan, loss_scale=0.5) == "nonfinite"  # overflows even unscaled
    assert guard.check(True, math.inf) == "nonfinite"  # no scaler
    assert int(guard.skipped) == 3 and guard.should_roll_back
    assert guard.check(True, 3.0, loss_scale=1024.0) == "" and int(guard.consecutive) == 0


def test_guard_floor_and_off_switch() -> None:
    guard = StepGuard(skip_factor=10.0, skip_floor=5.0, window=4, min_history=2, rollback_after=0)
    guard.check(True, 0.01)
    guard.check(True, 0.01)
    assert guard.threshold() == 5.0 and guard.check(True, 1.0) == ""  # 100x the median, under the floor
    off = StepGuard(skip_factor=None, rollback_after=0)
    assert all(off.check(True, 10.0 ** k) == "" for k in range(12))


# ---------------------------------------------------------------------------------------------- fault injection
def test_nan_loss_step_is_skipped_and_training_continues(tmp_path: Path) -> None:
    inject = Inject(nan_steps=(3,))
    trainer, module = fit(tmp_path, 6, [inject])
    assert trainer.global_step == 6
    assert int(module.run_callbacks.guard.guard.skipped) == 1
    torch.testing.assert_close(inject.weights_after[3], inject.weights_before[3], rtol=0, atol=0)  # no update
    assert not torch.equal(inject.weights_after[4], inject.weights_before[4])  # the next step updates again
    assert all(torch.isfinite(v).all() for v in module.state_dict().values() if v.is_floating_point())


def test_consecutive_bad_steps_roll_back_and_lower_the_lr(tmp_path: Path) -> None:
    inject = Inject(nan_steps=(4, 5))
    trainer, module = fit(tmp_path, 8, [inject], rollback_after=2, snapshot_every=2, check_every=1)
    assert int(module.run_callbacks.guard.guard.rollbacks) == 1 and float(module.run_callbacks.guard.guard.lr_scale) == 0.5
    # snapshots are taken after good steps 1, 2, 4 (global steps 0, 1, 3): the rollback restores step 3's weights
    torch.testing.assert_close(inject.weights_after[5], inject.weights_after[3], rtol=0, atol=0)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    warmup = 4  # warmup_epochs 0.5 of the 8 steps (one "epoch" when max_steps bounds the run)
    assert lr == pytest.approx(0.5 * module.optim.learning_rate * module._lr_factor(trainer.global_step, warmup))
    assert trainer.global_step == 8


def test_rollbacks_give_up_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match="training diverged: 2 consecutive steps.*1 rollback"):
        fit(tmp_path, 12, [Inject(nan_steps=tuple(range(2, 12)))], rollback_after=2, max_rollbacks=1, check_every=1)


# ---------------------------------------------------------------------------------------------- resume
def final_state(trainer: L.Trainer) -> dict[str, Any]:
    return torch.load(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt", weights_only=True)


def test_sigterm_checkpoint_then_resume_equals_a_straight_run(tmp_path: Path) -> None:
    """2N steps straight == N steps, SIGTERM, resume, N steps: weights, EMA, guard, optimizer (1e-6)."""
    args = dict(ema_decay=0.9, grad_skip_factor=3.0)
    callbacks = lambda: [L.pytorch.callbacks.ModelCheckpoint(save_last=True)]  # noqa: E731
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException after the step completes
        fit(tmp_path / "cut", 10, [*callbacks(), Inject(sigterm_after=3)], **args)
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    assert cut["global_step"] == 4 and EMA_KEY in cut and RNG_KEY in cut
    resumed, _ = fit(tmp_path / "cut", 10, callbacks(), ckpt_path=str(tmp_path / "cut" / "checkpoints" / "last.ckpt"),
                     **args)
    straight, _ = fit(tmp_path / "straight", 10, callbacks(), **args)
    a, b = final_state(straight), final_state(resumed)
    assert a["global_step"] == b["global_step"] == 10
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=1e-6, msg=key)
    for key in a[EMA_KEY]:
        torch.testing.assert_close(b[EMA_KEY][key], a[EMA_KEY][key], rtol=0, atol=1e-6, msg=key)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        for name in opt_a[i]:
            torch.testing.assert_close(opt_b[i][name], opt_a[i][name], rtol=0, atol=1e-6)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_first_ctrl_c_finishes_the_step_and_writes_a_checkpoint(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN, not Python's handler, when run as a background job
    with pytest.raises(SystemExit):
        fit(tmp_path, 10, [L.pytorch.callbacks.ModelCheckpoint(save_last=True), Inject(sigterm_after=2,
                                                                                     signum=signal.SIGINT)])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_emergency_checkpoint_path_needs_no_collective(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a checkpoint callback the path comes from the logger, not from trainer.log_dir (a broadcast
    that DDP processes stopped at different points would hang on)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    def no_collective(*args: object, **kwargs: object) -> None:
        raise AssertionError("a collective was called")

    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = L.Trainer(accelerator="cpu", logger=logger, enable_checkpointing=False, default_root_dir=str(tmp_path))
    monkeypatch.setattr(trainer.strategy, "broadcast", no_collective)
    assert last_checkpoint_path(trainer) == os.path.join(logger.log_dir, "checkpoints", "last.ckpt")
    bare = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    monkeypatch.setattr(bare.strategy, "broadcast", no_collective)
    assert last_checkpoint_path(bare) == os.path.join(str(tmp_path), "checkpoints", "last.ckpt")


def test_resumed_data_order_continues_mid_epoch() -> None:
    from nvae.data.base import ResumableSampler

    data = list(range(24))
    full = ResumableSampler(data, seed=5)
    full.set_epoch(2)
    order = list(full)
    cut = ResumableSampler(data, seed=5)
    cut.resume_at(2, 8)
    cut.set_epoch(2)
    assert list(cut) == order[8:]
    cut.set_epoch(3)
    assert len(list(cut)) == 24  # later epochs are whole again
    shards = [list(ResumableSampler(data, 2, r, seed=5)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == data  # two processes split the data without overlap


class WeightsDuringValidation(L.Callback):
    def __init__(self) -> None:
        self.live: list[torch.Tensor] = []
        self.evaluated: list[torch.Tensor] = []

    def on_validation_start(self, trainer: L.Trainer, module: NVAEModule) -> None:
        self.live.append(torch.cat([p.detach().flatten() for p in module.model.parameters()]).clone())

    def on_validation_batch_start(self, trainer: L.Trainer, module: NVAEModule, *_: Any) -> None:
        self.evaluated.append(torch.cat([p.detach().flatten() for p in module.model.parameters()]).clone())


def test_ema_is_validated_saved_and_loaded_for_sampling(tmp_path: Path) -> None:
    from nvae.checkpoint import load_checkpoint

    seen = WeightsDuringValidation()
    trainer, module = fit(tmp_path, 6, [L.pytorch.callbacks.ModelCheckpoint(save_last=True), seen], ema_decay=0.5)
    live, evaluated = seen.live[-1], seen.evaluated[-1]  # the validation after step 6
    ema = torch.cat([module.run_callbacks.ema.ema.params[n].flatten() for n, _ in module.model.named_parameters()])
    torch.testing.assert_close(evaluated, ema, rtol=0, atol=0)  # validation ran on the averages
    assert not torch.equal(evaluated, live)
    now = torch.cat([p.detach().flatten() for p in module.model.parameters()])
    torch.testing.assert_close(now, live, rtol=0, atol=0)  # the live weights are back after validation
    path = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
    loaded = load_checkpoint(path)
    assert loaded.weights == "ema"
    torch.testing.assert_close(torch.cat([p.flatten() for p in loaded.model.parameters()]), ema, rtol=0, atol=0)
    assert load_checkpoint(path, use_ema=False).weights == "raw"
    # a checkpoint written while validation holds the averages (e.g. preempted then) stores the same
    module.run_callbacks.ema.swap(module, True)
    trainer.save_checkpoint(tmp_path / "during_validation.ckpt")
    module.run_callbacks.ema.swap(module, False)
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    during, after = (torch.load(tmp_path / f, weights_only=True) for f in ("during_validation.ckpt", "after.ckpt"))
    for key in ("state_dict", EMA_KEY):
        for name in after[key]:
            torch.testing.assert_close(during[key][name], after[key][name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_atomic_write_survives_a_crash_mid_write_and_refuses_nan(tmp_path: Path, monkeypatch) -> None:
    io, path = AtomicTorchCheckpointIO(), tmp_path / "last.ckpt"
    good = {"state_dict": {"w": torch.ones(3)}, "global_step": 1}
    io.save_checkpoint(good, path)
    real_save = torch.save

    def crash(obj: Any, f: Any) -> None:
        f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left
    with pytest.warns(UserWarning, match="non-finite values in 1 tensor"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, math.inf])}, "global_step": 3}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_incompatible_checkpoint_names_what_differs() -> None:
    hparams = {"arch": {"num_channels": 8, "num_flows": 0}, "image_spec": {"channels": 1}}
    ckpt = {"hyper_parameters": {"arch": {"num_channels": 16, "num_flows": 0}, "image_spec": {"channels": 1}}}
    with pytest.raises(ValueError, match=r"model.arch.num_channels: checkpoint 16, config 8"):
        check_compatible(ckpt, hparams)
    with pytest.raises(ValueError, match="checkpoint format 4 .*upgrade nvae"):
        check_compatible({**ckpt, "nvae_format": 4}, hparams)
    with pytest.raises(ValueError, match="checkpoint format 1 .*before the architecture became the official"):
        check_compatible({**ckpt, "nvae_format": 1}, hparams)


def test_resume_into_another_architecture_fails_before_training(tmp_path: Path) -> None:
    trainer, _ = fit(tmp_path / "a", 2, [L.pytorch.callbacks.ModelCheckpoint(save_last=True)])
    last = str(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt")
    L.seed_everything(0, verbose=False)
    other = NVAEModule(arch=tiny_config(num_channels=16), image_spec=SPEC)
    t = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                  default_root_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="model.arch.num_channels: checkpoint 8, config 16"):
        t.fit(other, datamodule=RandomBinary(), ckpt_path=last)


def test_warmup_epochs_count_the_real_batches_of_an_epoch(tmp_path: Path) -> None:
    """warmup_epochs 0.5 of an epoch of 6 batches is 3 steps, also when max_steps ends the run mid-epoch
    (4 epochs planned, 8 steps run: 8 / 4 = 2 steps per epoch would be wrong)."""
    module = NVAEModule(arch=tiny_config(), image_spec=SPEC, optim={"warmup_epochs": 0.5})
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, max_steps=8, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        limit_val_batches=0)
    trainer.fit(module, datamodule=RandomBinary())
    factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert trainer.global_step == 8 and module.total_steps == 8
    assert [factor(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])  # linear warm-up over 3 steps
    assert factor(3) == pytest.approx(1.0)  # then the cosine starts at the peak


def test_a_run_s_callbacks_are_built_in_one_place_and_shared() -> None:
    """nvae.training builds what a run needs around the objective; fit, then test, get the same objects."""
    from nvae.callbacks import EMAWeights, GuardedSteps
    from nvae.resilience import PreemptionCheckpoint, RNGState, SafeCheckpointIO
    from nvae.training import TrainerChecks

    module = NVAEModule(arch=tiny_config(), image_spec=ImageSpec(channels=1, size=16, num_bits=1), ema_decay=0.9)
    first, again = module.configure_callbacks(), module.configure_callbacks()
    assert [type(c) for c in first] == [TrainerChecks, GuardedSteps, EMAWeights, RNGState, SafeCheckpointIO,
                                        PreemptionCheckpoint]
    shared = (GuardedSteps, EMAWeights, RNGState)
    assert [c for c in first if isinstance(c, shared)] == [c for c in again if isinstance(c, shared)]
    assert first[2].guard is first[1]  # the EMA skips what the guard skipped
    no_ema = NVAEModule(arch=tiny_config(), image_spec=ImageSpec(channels=1, size=16, num_bits=1)).configure_callbacks()
    assert not any(isinstance(c, EMAWeights) for c in no_ema)
