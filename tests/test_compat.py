"""nvae.compat: each private Lightning/torch attribute nvae reads exists and does what nvae expects (issue 15)."""
from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from nvae import compat


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seen.append((compat.completed_batches(self.trainer), compat.writes_logs_this_step(self.trainer),
                          compat.dump_checkpoint(self.trainer)["global_step"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_lightning_loop_state_during_fit() -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 2)), batch_size=2)
    model = Tiny()
    _trainer(max_steps=3, log_every_n_steps=2).fit(model, data)
    # at a batch's end the batches before it are completed (Lightning counts the batch just after the hook)
    assert [s[0] for s in model.seen] == [0, 1, 2]
    assert [s[2] for s in model.seen] == [1, 2, 3]  # the dump sees the step just taken
    assert all(isinstance(s[1], bool) for s in model.seen) and any(s[1] for s in model.seen)


def test_request_stop_sets_what_lightnings_sigterm_handler_sets() -> None:
    trainer = _trainer()
    assert not trainer._signal_connector.received_sigterm
    compat.request_stop(trainer)
    assert trainer._signal_connector.received_sigterm


def test_strategy_settings() -> None:
    assert compat.sync_batchnorm_requested(_trainer(sync_batchnorm=True, strategy="ddp").strategy)
    assert not compat.sync_batchnorm_requested(_trainer(strategy="ddp").strategy)
    assert compat.ddp_kwargs(DDPStrategy(find_unused_parameters=True)) == {"find_unused_parameters": True}
    assert compat.ddp_kwargs(_trainer().strategy) is None


def test_cpu_bf16_detection_agrees_with_the_capability() -> None:
    has = compat.cpu_has_bf16()
    assert isinstance(has, bool)
    if compat.cpu_capability() in ("AVX2", "DEFAULT", "NO AVX"):
        assert not has  # bf16 dot products come with AVX-512 BF16 or AMX only


def test_a_missing_attribute_fails_in_one_place_naming_it() -> None:
    with pytest.raises(compat.IncompatibleVersion, match="Trainer._signal_connector"):
        compat.request_stop(object())
