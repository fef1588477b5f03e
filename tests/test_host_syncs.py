"""A training step reads no device value back to the host: the step guard decides on the device and
the optimizer applies or cancels the update by a 0-d tensor (nvae.optim); the guard's counters are
read every model.guard.check_every steps, where rollbacks happen."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import nvae
import nvae.lightning
from nvae.optim import Adamax
from test_resilience import Inject, fit

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
PACKAGE = str(Path(nvae.__file__).parent)


class CountReads(L.Callback):
    """Counts reads of tensor values made by nvae's code from the start of batch ``first`` to the start
    of batch ``stop`` (so every hook of those steps is inside, whatever the callbacks' order)."""

    def __init__(self, first: int, stop: int) -> None:
        self.first, self.stop = first, stop
        self.active = False
        self.reads: list[str] = []

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.active = self.first <= trainer.global_step < self.stop

    def on_train_end(self, trainer: L.Trainer, *_: Any) -> None:
        self.active = False

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor: torch.Tensor, *args: Any, _original: Any = original, _name: str = name) -> Any:
                caller = inspect.currentframe().f_back
                if self.active and caller.f_code.co_filename.startswith(PACKAGE):
                    self.reads.append(f"{_name} at {caller.f_code.co_filename}:{caller.f_lineno}")
                return _original(tensor, *args)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_training_steps_read_nothing_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps 2-4 (not the first: it reads the regularizer's state once and takes the first snapshot):
    forward, backward, the guard's decision, the optimizer and EMA updates, no read by nvae. The
    optimizer cancels by arithmetic, as on a GPU (on the CPU it reads the flag, which costs nothing)."""
    monkeypatch.setattr(nvae.lightning, "Adamax", functools.partial(Adamax, masked=True))
    counter = CountReads(first=2, stop=5)
    counter.patch(monkeypatch)
    trainer, module = fit(tmp_path, 6, [counter], check_every=100, ema_decay=0.9)
    assert trainer.global_step == 6
    assert counter.reads == []
    # the probe sees reads: at a step where the counters are read (every step here)
    probe = CountReads(first=2, stop=5)
    probe.patch(monkeypatch)
    fit(tmp_path / "probe", 6, [probe], check_every=1)
    assert any("callbacks.py" in r for r in probe.reads)


@pytest.mark.parametrize("masked", [True, False])
def test_a_skipped_step_is_cancelled_between_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, masked: bool) -> None:
    """A NaN loss between reads: that step leaves the weights as they were (the optimizer cancels the
    update by the device flag, or reads it on the CPU), the next one updates, and the counter says so."""
    monkeypatch.setattr(nvae.lightning, "Adamax", functools.partial(Adamax, masked=masked))
    inject = Inject(nan_steps=(3,))
    trainer, module = fit(tmp_path, 6, [inject], check_every=100)
    torch.testing.assert_close(inject.weights_after[3], inject.weights_before[3], rtol=0, atol=0)
    assert not torch.equal(inject.weights_after[4], inject.weights_before[4])
    assert int(module.run_callbacks.guard.guard.skipped) == 1


def test_a_rollback_waits_for_the_next_read(tmp_path: Path) -> None:
    """rollback_after 2 with reads every 3 steps: bad steps 2 and 3 are seen at the read after step 5
    (global steps 0-based: 2, 5, 8 read), and the weights return to the last snapshot."""
    inject = Inject(nan_steps=(3, 4, 5))
    trainer, module = fit(tmp_path, 8, [inject], rollback_after=2, snapshot_every=1, check_every=3)
    guard = module.run_callbacks.guard.guard
    assert int(guard.rollbacks) == 1
    # snapshots at reads after good steps: global steps 0 (the first) and 2; the rollback at step 5
    # restores the weights after step 2
    torch.testing.assert_close(inject.weights_after[5], inject.weights_after[2], rtol=0, atol=0)
