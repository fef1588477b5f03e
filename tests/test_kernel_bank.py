"""The kernel bank (nvae.ops.kernel_bank): a training step's weight-normalized kernels made in a few
batched calls equal those made layer by layer, and so do the losses, gradients, BatchNorm statistics
and power-iteration vectors of whole training steps: the first (10x iterations), later ones, after
a resume, under activation checkpointing and with either backend."""
from __future__ import annotations

import pytest
import torch

from conftest import random_images, tiny_config
from nvae.lightning import NVAEModule
from nvae.ops import Conv2d
from nvae.ops.kernel_bank import KernelBank, group_convs
from nvae.spec import ImageSpec

SPEC = ImageSpec(channels=3, size=16, num_bits=8)


def _module(batched: bool, backend: str = "plain", channels_last: bool = False, checkpointing: str = "none",
            seed: int = 0) -> NVAEModule:
    torch.manual_seed(seed)
    module = NVAEModule(arch=tiny_config(num_flows=1, backend=backend), image_spec=SPEC,
                        channels_last=channels_last, gradient_checkpointing=checkpointing)
    module.model.kernel_bank.batched = batched
    return module


@pytest.mark.parametrize("channels_last", [False, True])
def test_bank_kernels_are_the_layers_own(channels_last: bool) -> None:
    """Each kernel equals ``normalized_weight`` (masked flow kernels included) and is laid out as its
    weight (plain weights too); nothing stays set after the block."""
    model = _module(True, channels_last=channels_last).model
    convs = [m for m in model.modules() if isinstance(m, Conv2d)]
    assert any(c.mask is not None for c in convs) and any(c.log_weight_norm is None for c in convs)
    with model.kernel_bank.in_use() as stacks:
        assert stacks is not None and len(stacks) == len(model.kernel_bank.groups)
        for group, stack in zip(model.kernel_bank.groups, stacks):
            for conv in group:
                # The same products and one norm per row over the same elements, summed in another
                # order: float32 rounding, ~1e-7 relative.
                torch.testing.assert_close(conv.step_kernel, conv.normalized_weight(), rtol=1e-6, atol=1e-7)
                assert conv.step_kernel.stride() == conv.weight.stride()
    assert all(c.step_kernel is None for c in convs)


def test_the_bank_batches_by_default_and_per_layer_makes_nothing() -> None:
    """Batched unless asked for the per-layer form, on every device (a meta-device model stands in for a GPU's)."""
    module = NVAEModule(arch=tiny_config(), image_spec=SPEC)
    bank = module.model.kernel_bank
    assert bank.batched is True and bank.active()
    bank.batched = False
    assert not bank.active()
    with bank.in_use() as stacks:
        assert stacks is None
        assert all(c.step_kernel is None for g in bank.groups for c in g)
    with torch.device("meta"):
        meta = NVAEModule(arch=tiny_config(), image_spec=SPEC).model.kernel_bank
    assert meta.active()


def test_bank_clears_its_kernels_when_the_block_fails() -> None:
    model = _module(True).model
    with pytest.raises(RuntimeError, match="boom"):
        with model.kernel_bank.in_use():
            raise RuntimeError("boom")
    assert all(m.step_kernel is None for m in model.modules() if isinstance(m, Conv2d))


def test_groups_are_the_spectral_regularizers() -> None:
    """The regularizer iterates on the bank's stacks by position: both group the same way."""
    module = _module(True)
    assert [[id(c) for c in g] for g in module.model.kernel_bank.groups] == \
        [[id(c) for c in g] for g in module.spectral._groups]
    convs = [m for m in module.model.modules() if isinstance(m, Conv2d)]
    assert [[id(c) for c in g] for g in group_convs(convs)] == [[id(c) for c in g] for g in KernelBank(convs).groups]


def _train(module: NVAEModule, steps: int, first_seed: int = 0) -> tuple[list[torch.Tensor], dict, dict]:
    """Losses of ``steps`` SGD steps on one batch; the last step's gradients; the buffers after it.

    SGD, not Adamax: the biases of convolutions followed by BatchNorm have a true gradient of 0, and
    Adamax would turn their rounding noise into steps of a full learning rate in either direction.
    """
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)
    x = module._prepare(random_images(SPEC, n=4))
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(first_seed + step)  # the same posterior draws on both paths
        loss = module.training_loss(x)[0]
        loss.backward()
        losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        opt.step()  # the next step's kernels come from the updated weights
    return losses, grads, {n: b.clone() for n, b in module.named_buffers()}


def _assert_same(a: tuple[list[torch.Tensor], dict, dict], b: tuple[list[torch.Tensor], dict, dict]) -> None:
    # Batched and per-layer kernels differ by float32 rounding (~1e-7 relative, see above); three
    # SGD steps carry that into losses of ~5e3 nats at ~1e-7 relative. Gradients are
    # compared against their largest entry (BatchNorm-followed biases have a true gradient of 0).
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert a[1].keys() == b[1].keys()
    for name, grad in b[1].items():
        scale = max(grad.abs().max().item(), 1.0)
        torch.testing.assert_close(a[1][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert a[2].keys() == b[2].keys()
    for name, buf in b[2].items():
        torch.testing.assert_close(a[2][name], buf, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend, channels_last, checkpointing", [
    ("plain", False, "none"), ("plain", True, "group"), ("plain", False, "cell"), ("cpu", False, "none"),
    ("cpu", True, "group")])
def test_batched_training_steps_match_the_per_layer_form(backend: str, channels_last: bool, checkpointing: str) -> None:
    """Three steps (the first with 10x power iterations): losses, gradients, BN statistics, u and v."""
    batched = _train(_module(True, backend, channels_last, checkpointing), steps=3)
    per_layer = _train(_module(False, backend, channels_last, checkpointing), steps=3)
    _assert_same(batched, per_layer)


def test_a_resumed_batched_run_continues_as_the_per_layer_one() -> None:
    """A module loaded from a per-layer run's state continues with power_iters (not the first
    step's 10x) and matches the per-layer run continuing in the same process."""
    donor = _module(False)
    _train(donor, steps=2)
    state = {k: v.clone() for k, v in donor.state_dict().items()}
    resumed = _module(True, seed=1)  # other initial weights and u, v: all of them come from the state
    resumed.load_state_dict(state)
    _assert_same(_train(resumed, steps=1, first_seed=2), _train(donor, steps=1, first_seed=2))
