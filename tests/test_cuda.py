"""On a CUDA device a training step computes what it computes on the CPU. Marked ``cuda`` and skipped
without a CUDA device, so CI never needs one; ``benchmarks/gpu.py`` runs them (``pytest -m cuda``).

Both devices draw the same noise: ``torch.randn_like`` / ``rand_like`` are replaced by draws from one
seeded CPU generator, moved to the device (the CPU and CUDA generators give different streams).
TF32 is switched off, so the float32 step is float32 on both devices; what remains is the order in
which cuDNN and oneDNN sum, ~1e-6 relative per convolution."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
import torch

from conftest import random_images, tiny_config
from nvae.lightning import NVAEModule
from nvae.spec import ImageSpec

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPEC = ImageSpec(channels=3, size=16, num_bits=5)


@pytest.fixture
def same_noise(monkeypatch: pytest.MonkeyPatch) -> Iterator[torch.Generator]:
    """Noise from one CPU generator on every device; reseed it before each step to compare."""
    g = torch.Generator().manual_seed(0)

    def like(draw: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def drawn(t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            dtype = kwargs.get("dtype") or t.dtype
            return draw(t.shape, generator=g).to(device=t.device, dtype=dtype)
        return drawn

    monkeypatch.setattr(torch, "randn_like", like(torch.randn))
    monkeypatch.setattr(torch, "rand_like", like(torch.rand))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    yield g


def _module(device: str) -> NVAEModule:
    torch.manual_seed(0)  # the same initial weights and power-iteration vectors, built on the CPU
    module = NVAEModule(arch=tiny_config(num_flows=1), image_spec=SPEC, channels_last=True)
    return module.to(device).train()


def _step(module: NVAEModule, g: torch.Generator, precision: str = "32") -> tuple[float, dict[str, torch.Tensor]]:
    """The regularized loss of one batch and its gradients (on the CPU), as a training step makes them."""
    g.manual_seed(1)
    device = next(module.parameters()).device
    x = module._prepare(random_images(SPEC, n=4, seed=2).to(device))
    module.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss = module.training_loss(x)[0]
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in module.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def test_a_float32_step_on_cuda_equals_the_cpu_step(same_noise: torch.Generator) -> None:
    cpu_loss, cpu_grads = _step(_module("cpu"), same_noise)
    cuda_loss, cuda_grads = _step(_module("cuda"), same_noise)
    assert cuda_loss == pytest.approx(cpu_loss, rel=1e-4)
    assert cuda_grads.keys() == cpu_grads.keys() and len(cpu_grads) > 100
    # Per tensor, 0.1% of its norm, plus a floor at 1e-7 of the whole gradient's norm for the biases
    # of convolutions that BatchNorm follows: their gradient is zero but for rounding (norms ~1e-8
    # here, against >= 6e-5 for every other tensor and ~240 for the whole gradient).
    floor = 1e-7 * float(torch.stack([g.norm() for g in cpu_grads.values()]).norm())
    for name, g in cpu_grads.items():
        assert float((cuda_grads[name] - g).norm()) <= 1e-3 * float(g.norm()) + floor, name


def test_a_bf16_mixed_step_on_cuda_follows_float32(same_noise: torch.Generator) -> None:
    """As tests/test_precision.py on the CPU: the likelihood, KL and loss stay in float32, so bf16
    autocast moves the loss by well under 0.2%; every gradient is finite."""
    full_loss, _ = _step(_module("cuda"), same_noise)
    bf16_loss, grads = _step(_module("cuda"), same_noise, "bf16-mixed")  # a fresh module: the same first step
    assert abs(bf16_loss - full_loss) <= 2e-3 * abs(full_loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
