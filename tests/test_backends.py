"""model.arch.backend: the CPU backend (nvae.accel.cpu) and the plain PyTorch core compute the same
training step: loss, every gradient and every BatchNorm statistic of the tiny model. The core
trains, samples and evaluates with the CPU backend's package hidden."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_images, tiny_config
from nvae.lightning import NVAEModule
from nvae.ops import Conv2d
from nvae.spec import ImageSpec

SPEC = ImageSpec(channels=3, size=16, num_bits=8)


def _step(backend: str, channels_last: bool, checkpointing: str, steps: int = 2
          ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Losses of ``steps`` training steps (spectral and BN penalties included), then the last step's
    gradients and the buffers (BatchNorm running statistics, power-iteration vectors)."""
    torch.manual_seed(0)
    module = NVAEModule(arch=tiny_config(num_flows=1, backend=backend), image_spec=SPEC,
                        channels_last=channels_last, gradient_checkpointing=checkpointing)
    assert all((m.accel is not None) == (backend == "cpu") for m in module.modules() if isinstance(m, Conv2d))
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
def test_cpu_backend_and_plain_core_train_the_same(channels_last: bool, checkpointing: str) -> None:
    fused_losses, fused_grads, fused_buffers = _step("cpu", channels_last, checkpointing)
    plain_losses, plain_grads, plain_buffers = _step("plain", channels_last, checkpointing)
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


HIDDEN = """
import importlib.abc, sys

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "nvae.accel.cpu" or name.startswith("nvae.accel.cpu."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None

sys.meta_path.insert(0, Hide())
out, configs = sys.argv[1], sys.argv[2]
from nvae.cli.train import main as train
from nvae.cli.sample import main as sample
from nvae.cli.evaluate import main as evaluate
from nvae.ops import Conv2d
cli = train(["fit", "--config", f"{configs}/quickstart.yaml", "--config", f"{configs}/debug.yaml",
             "--trainer.default_root_dir", out, "--trainer.logger.init_args.save_dir", out])
model = cli.model.model
assert model.backend == "plain" and not [m for m in model.modules() if isinstance(m, Conv2d) and m.accel is not None]
ckpt = cli.trainer.checkpoint_callback.last_model_path
sample(["--checkpoint", ckpt, "--num-samples", "2", "--output", f"{out}/s.png", "--device", "cpu"])
evaluate(["nll", "--checkpoint", ckpt, "-K", "2", "--num-images", "2", "--device", "cpu", "--quiet"])
try:
    from nvae.accel import install
    install(model, "cpu")
except ValueError as err:
    print("refused:", err)
assert not [m for m in sys.modules if m.startswith("nvae.accel.cpu")]
print("trained, sampled and evaluated without the CPU backend")
"""


def test_the_core_runs_with_the_cpu_backend_hidden(tmp_path: Path) -> None:
    """Train two steps, sample and evaluate with nvae.accel.cpu unimportable: the plain core does all of it
    (``auto`` falls back to ``plain``), and asking for ``cpu`` is one line."""
    configs = Path(__file__).resolve().parent.parent / "configs"
    proc = subprocess.run([sys.executable, "-c", HIDDEN, str(tmp_path), str(configs)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained, sampled and evaluated without the CPU backend" in proc.stdout
    assert "refused: model.arch.backend cpu: the CPU backend cannot be imported" in proc.stdout
    assert (tmp_path / "s.png").is_file()


def test_the_former_fused_ops_spelling_reads_as_a_backend() -> None:
    """Older checkpoints and configs say ``fused_ops: true/false``; they load as ``cpu`` / ``plain``."""
    from nvae.arch import NVAEConfig

    assert (NVAEConfig(fused_ops=True).backend, NVAEConfig(fused_ops=False).backend) == ("cpu", "plain")
    assert NVAEConfig(fused_ops=False).fused_ops is None and NVAEConfig().backend == "auto"
    with pytest.raises(ValueError, match="model.arch.backend must be one of auto, plain, cpu, got 'gpu'"):
        NVAEConfig(backend="gpu")
