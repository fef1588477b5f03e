"""Checkpoints written before the grouped hyper-parameters (format 2, tests/data/format2/README.md)
load, evaluate as the nvae that wrote them did, and resume training."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from nvae.checkpoint import CALLBACKS_KEY, FORMAT_KEY, FORMAT_VERSION, GUARD_STATE_KEY, build_datamodule, \
    load_checkpoint, read_checkpoint
from nvae.lightning import NVAEModule

HERE = Path(__file__).resolve().parent / "data" / "format2"
CKPT = HERE / "tiny.ckpt"
REFERENCE = json.loads((HERE / "reference.json").read_text())


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(3, 1, 32, 32, generator=g) > 0.5).float()


@pytest.mark.parametrize("use_ema", [True, False], ids=["ema", "live"])
def test_format2_checkpoint_computes_what_its_nvae_computed(use_ema: bool) -> None:
    loaded = load_checkpoint(CKPT, use_ema=use_ema)
    assert loaded.weights == ("ema" if use_ema else "raw")
    torch.manual_seed(0)
    with torch.no_grad():
        out = loaded.model(_images(), use_mean=True)
        log_px = loaded.model.log_likelihood(out.likelihood, _images())
    ref = REFERENCE["ema" if use_ema else "live"]
    # The same eval-mode kernels on the same weights: float32 agreement up to summation order
    # (values of ~500 nats; 1e-5 relative is ~20 float32 ulps).
    torch.testing.assert_close(log_px, torch.tensor(ref["log_px"]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.kl.sum(dim=1), torch.tensor(ref["kl"]), rtol=1e-5, atol=1e-4)


def test_format2_hyper_parameters_and_guard_are_upgraded() -> None:
    ckpt = read_checkpoint(CKPT)
    assert ckpt[FORMAT_KEY] == FORMAT_VERSION
    hp = ckpt["hyper_parameters"]
    assert hp["optim"]["learning_rate"] == 2e-3 and hp["optim"]["warmup_epochs"] == 0.5
    assert hp["objective"]["power_iters"] == 2 and hp["objective"]["spectral_reg_coeff"] == 2e-2
    assert hp["guard"]["rollback_after"] == 7 and hp["guard"]["grad_skip_factor"] == 20.0
    assert "learning_rate" not in hp and not [k for k in ckpt["state_dict"] if k.startswith("guard.")]
    guard = ckpt[CALLBACKS_KEY][GUARD_STATE_KEY]
    assert int(guard["num_norms"]) == REFERENCE["guard"]["num_norms"] == 3
    module = NVAEModule.load_from_checkpoint(CKPT)
    assert module.optim.learning_rate == 2e-3 and module.objective.power_iters == 2
    assert module.run_callbacks.guard.config.rollback_after == 7 and module.run_callbacks.ema is not None


def test_format2_checkpoint_resumes_training(tmp_path: Path) -> None:
    """Lightning's resume reads the raw file: NVAEModule.on_load_checkpoint upgrades it in place, the
    guard's counters and the EMA carry on, and training continues to step 4
    (max_epochs leaves room: the file was written at the end of epoch 0, before Lightning marked it done)."""
    ckpt = read_checkpoint(CKPT)
    module = NVAEModule(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    data = build_datamodule(ckpt["nvae_data"])
    trainer = L.Trainer(accelerator="cpu", max_steps=4, max_epochs=3, limit_train_batches=3, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data, ckpt_path=str(CKPT))
    assert trainer.global_step == 4
    guard = module.run_callbacks.guard.guard
    assert int(guard.num_norms) == 4 and int(guard.good_steps) == REFERENCE["guard"]["good_steps"] + 1
    torch.testing.assert_close(guard.norms[:3].double(), torch.tensor(REFERENCE["guard"]["norms"][:3], dtype=torch.float64))
    assert module.run_callbacks.ema.ema is not None
