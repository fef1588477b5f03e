"""NVAEConfig.fused_ops: the hand-written CPU autograd (nvae.ops) and the plain PyTorch path compute
the same training step: loss, every gradient and every BatchNorm statistic of the tiny model."""
from __future__ import annotations

import pytest
import torch

from conftest import random_images, tiny_config
from nvae.lightning import NVAEModule
from nvae.ops import Conv2d
from nvae.spec import ImageSpec

SPEC = ImageSpec(channels=3, size=16, num_bits=8)


def _step(fused: bool, channels_last: bool, checkpointing: str, steps: int = 2
          ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Losses of ``steps`` training steps (spectral and BN penalties included), then the last step's
    gradients and the buffers (BatchNorm running statistics, power-iteration vectors)."""
    torch.manual_seed(0)
    module = NVAEModule(arch=tiny_config(num_flows=1, fused_ops=fused), image_spec=SPEC,
                        channels_last=channels_last, gradient_checkpointing=checkpointing)
    assert all(m.fused == fused for m in module.modules() if isinstance(m, Conv2d))
    x = module._prepare(random_images(SPEC, n=4))
    losses = []
    for step in range(steps):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(step)  # the same posterior draws on both paths
        loss = module.training_loss(x)[0]
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad for n, p in module.named_parameters()}
    return losses, grads, {n: b.clone() for n, b in module.named_buffers()}


@pytest.mark.parametrize("channels_last, checkpointing", [(False, "none"), (True, "none"), (True, "group")])
def test_fused_and_plain_paths_train_the_same(channels_last: bool, checkpointing: str) -> None:
    fused_losses, fused_grads, fused_buffers = _step(True, channels_last, checkpointing)
    plain_losses, plain_grads, plain_buffers = _step(False, channels_last, checkpointing)
    # Both paths sum in float32 in other orders (recomputed BN outputs, the folded depthwise weight
    # gradient): losses of ~5e3 nats differ by an ulp (5e-4, 1e-7 relative); gradients by ~1e-6 of
    # their largest entry. The biases of convolutions followed by BatchNorm have a true gradient of
    # 0, so theirs is rounding noise (~1e-9): hence the absolute floor of 1e-5 x the largest entry.
    torch.testing.assert_close(fused_losses, plain_losses, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert grad is not None and fused_grads[name] is not None, name
        scale = grad.abs().max().item()
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=name)
    assert fused_buffers.keys() == plain_buffers.keys()
    for name, buf in plain_buffers.items():
        torch.testing.assert_close(fused_buffers[name], buf, rtol=1e-5, atol=1e-6, msg=name)
