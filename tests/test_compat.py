"""nvae.compat: each private Lightning/torch attribute nvae reads exists and does what nvae expects."""
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
                          compat.dump_checkpoint(self.trainer)["global_step"], compat.attached_trainer(self),
                          compat.grad_scaler(self.trainer)))

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
    assert all(s[3] is model.trainer and s[4] is None for s in model.seen)  # float32: no scaler
    assert compat.attached_trainer(Tiny()) is None
    logged = [s[1] for s in model.seen]
    assert all(isinstance(v, bool) for v in logged) and any(logged) and not all(logged)  # every 2nd step only


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


def test_torch_kernels_compute_what_their_public_forms_compute() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)], [torch.randn(3, 4, generator=g),
                                                                           torch.randn(5, generator=g)]
    for ord_ in (2.0, float("inf")):
        expect = [torch.linalg.vector_norm(t, ord_) for t in a]
        torch.testing.assert_close(list(compat.foreach_norm(a, ord_)), expect)
    c = [t.clone() for t in a]
    compat.foreach_lerp_(c, b, 0.25)
    for ci, ai, bi in zip(c, a, b):
        torch.testing.assert_close(ci, torch.lerp(ai, bi, 0.25))
    assert issubclass(torch.nn.BatchNorm2d, compat.BatchNormBase) and issubclass(torch.nn.SyncBatchNorm,
                                                                                 compat.BatchNormBase)


def test_aten_backward_kernels_match_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 5, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, requires_grad=True)
    y = torch.nn.functional.conv2d(x, w, padding=1)
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    ox, ow, _ = compat.conv_backward(grad, x.detach(), w.detach(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                     [True, True, False])
    torch.testing.assert_close(ox, gx)
    torch.testing.assert_close(ow, gw)
    s = torch.nn.functional.silu(x)
    torch.testing.assert_close(compat.silu_backward(torch.ones_like(x), x.detach()),
                               torch.autograd.grad(s.sum(), x)[0])
    weight = torch.ones(3, requires_grad=True)
    bn = torch.nn.functional.batch_norm(x, None, None, weight, None, training=True, eps=1e-5)
    grad_bn = grad[:, :3].contiguous()  # (2, 3, 5, 5), the shape of bn
    gbx, gbw = torch.autograd.grad(bn, (x, weight), grad_bn)
    mean, var = x.detach().mean((0, 2, 3)), x.detach().var((0, 2, 3), unbiased=False)
    ref = compat.batch_norm_backward(grad_bn, x.detach(), weight.detach(), None, None, mean,
                                     1 / torch.sqrt(var + 1e-5), True, 1e-5, [True, True, False])
    torch.testing.assert_close(ref[0], gbx)
    torch.testing.assert_close(ref[1], gbw)
