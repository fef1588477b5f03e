"""Mixed precision: bf16-mixed and 16-mixed training follow the float32 loss trajectory (KL,
likelihood, spectral norms and the loss reduction stay in float32); 16-mixed scales the loss.

Lightning turns ``precision="16-mixed"`` on CPU into bf16-mixed, so the 16-mixed tests pass its
float16 mixed-precision plugin explicitly: the same autocast, gradient scaler and optimizer step
as on a GPU, on float16 CPU kernels."""
from __future__ import annotations

from typing import Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from conftest import random_images, tiny_config
from nvae.hparams import group_flat_hparams
from nvae.accel.cpu.conv import ConvAccel
from nvae.lightning import NVAEModule
from nvae.ops import Conv2d
from nvae.spec import ImageSpec

SPEC = ImageSpec(channels=3, size=16, num_bits=5)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))


def fit(precision: str, steps: int = 12, scaler: Optional[torch.amp.GradScaler] = None,
        **module_args: object) -> tuple[L.Trainer, NVAEModule, list[float]]:
    """Train the tiny model on two fixed batches; "16-mixed" runs Lightning's float16 plugin on CPU."""
    L.seed_everything(0, verbose=False)
    module = NVAEModule(arch=tiny_config(num_flows=1), image_spec=SPEC,
                        **group_flat_hparams({"warmup_epochs": 0.0, **module_args}))
    data = random_images(SPEC, n=8, seed=1)
    recorder = LossRecorder()
    amp = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler)]} if precision == "16-mixed" else {}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                        **(amp or {"precision": precision}))
    trainer.fit(module, DataLoader(data, batch_size=4, shuffle=False))
    assert module.model.h0.dtype == torch.float32  # master weights stay float32
    return trainer, module, recorder.losses


def train(precision: str, steps: int = 12) -> list[float]:
    return fit(precision, steps)[2]


def test_bf16_mixed_matches_float32_trajectory() -> None:
    full, bf16 = train("32"), train("bf16-mixed")
    assert len(full) == len(bf16) == 12
    # Tolerance 0.2% per step. Measured: 1.2e-4 with the likelihood and KL in float32; evaluating
    # the likelihood in bf16 instead (8-bit mantissa) gives 6.9e-3, so this catches that mistake.
    for a, b in zip(full, bf16):
        assert abs(a - b) <= 2e-3 * abs(a), (full, bf16)
    assert bf16[-1] < bf16[0] and full[-1] < full[0]


def test_16_mixed_runs_in_float16_and_matches_float32_trajectory(monkeypatch: pytest.MonkeyPatch) -> None:
    """An initial loss scale that never overflows here (256) gives the same steps as float32."""
    full = train("32")
    dtypes: set[torch.dtype] = set()
    convolve = ConvAccel.convolve  # the CPU backend's (the default here): every convolution but the depthwise ones

    def recording(self: ConvAccel, conv: Conv2d, x: torch.Tensor, *args: object) -> torch.Tensor:
        out = convolve(self, conv, x, *args)
        dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(ConvAccel, "convolve", recording)
    trainer, module, half = fit("16-mixed", scaler=torch.amp.GradScaler("cpu", init_scale=256.0))
    assert dtypes == {torch.float16}  # every regular convolution ran in float16
    assert trainer.precision_plugin.scaler.get_scale() == 256.0 and int(module.run_callbacks.guard.guard.skipped) == 0
    # Tolerance 0.2% per step, as for bf16; measured 1e-5 (float16 keeps 10 mantissa bits).
    for a, b in zip(full, half):
        assert abs(a - b) <= 2e-3 * abs(a), (full, half)
    assert half != full  # float16 arithmetic happened


def test_16_mixed_loss_scale_overflows_are_not_bad_steps() -> None:
    """The scaler starts at 2^16, where float16 gradients overflow: it skips those steps and halves its
    scale. They are not the guard's bad steps: with rollback_after=3 they used to end the run
    (TrainingDiverged: no good state was ever reached)."""
    trainer, module, losses = fit("16-mixed", steps=16, rollback_after=3)
    scale = trainer.precision_plugin.scaler.get_scale()
    assert scale < 2.0 ** 16  # overflows happened and were left to the scaler
    assert int(module.run_callbacks.guard.guard.skipped) == 0 and int(module.run_callbacks.guard.guard.rollbacks) == 0
    assert int(module.run_callbacks.guard.guard.good_steps) < 16  # the overflow steps did not update
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_unsupported_precisions_are_refused_before_training(precision: str) -> None:
    """Half or double weights used to crash mid-step (a conv's dtype mismatch, the power iteration's)."""
    with pytest.raises(ValueError, match=f"trainer.precision '{precision}' is not supported: use 32, bf16-mixed"):
        fit(precision, steps=1)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_compiled_forward_matches_eager_on_cpu(monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    """compile=true works on CPU and computes the same loss and gradients (compilation takes minutes: slow).

    Under bf16 autocast the compiled graph returns the fused steps' BatchNorm statistics in bf16;
    their backward needs them in float32 (it failed with "mixed dtype (CPU)" before they were cast).
    """
    def fixed_noise(t: torch.Tensor) -> torch.Tensor:  # the same "random" latents in both runs
        return torch.sin(torch.arange(t.numel(), dtype=t.dtype, device=t.device)).view(t.shape)

    # A compiled graph draws its random numbers in another order than eager code (inductor's
    # generator, and even torch's via fallback_random: KL 29.1 vs 30.8 nats here), so the latents'
    # noise is made deterministic to compare the arithmetic.
    monkeypatch.setattr(torch, "randn_like", fixed_noise)
    torch.manual_seed(0)
    eager = NVAEModule(arch=tiny_config(), image_spec=SPEC)
    compiled = NVAEModule(arch=tiny_config(), image_spec=SPEC, compile=True)
    compiled.load_state_dict(eager.state_dict())
    x = random_images(SPEC, n=4)
    losses, grads = [], []
    for module in (eager, compiled):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            losses.append(module.training_loss(x)[0])
        losses[-1].backward()
        grads.append({n: p.grad for n, p in module.named_parameters()})
    if precision == "bf16-mixed":  # both round to bf16, in different places: compare the whole gradient
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-2, atol=1e-2)
        flat = [torch.cat([g.flatten() for g in gs.values()]) for gs in grads]
        assert torch.isfinite(flat[1]).all()
        assert (flat[1] - flat[0]).norm() <= 0.05 * flat[0].norm()
        return
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-3)
    # Absolute tolerance on the scale of the largest gradient: biases of convs followed by BatchNorm
    # have a zero gradient in exact arithmetic, so their rounding noise has no relative scale.
    scale = max(g.abs().max().item() for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-3, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_warns_once(monkeypatch: pytest.MonkeyPatch, has_bf16: bool) -> None:
    import nvae.training as nvae_training

    monkeypatch.setattr(nvae_training, "cpu_has_bf16", lambda: has_bf16)
    module = NVAEModule(arch=tiny_config(), image_spec=ImageSpec(channels=1, size=16, num_bits=1, pad=2))
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", logger=False)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nvae_training.TrainerChecks().setup(trainer, module, "fit")
        nvae_training.TrainerChecks().setup(trainer, module, "test")  # the test pass after fit does not warn again
    lines = [str(w.message) for w in caught if "bf16 instructions" in str(w.message)]
    assert len(lines) == (0 if has_bf16 else 1)
    if lines:
        assert torch.backends.cpu.get_cpu_capability() in lines[0] and "--trainer.precision 32" in lines[0]
