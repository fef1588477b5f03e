"""torch.compile of the plain path's training objective as a GPU runs it: one graph, no graph break
(the kernel bank, the spectral regularizer and the BatchNorm penalty included), the same loss and
gradients as eager mode, in one process and in two DDP processes (gloo, CPU)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import random_images, tiny_config
from nvae.lightning import NVAEModule
from nvae.spec import ImageSpec

SPEC = ImageSpec(channels=3, size=16, num_bits=8)


class Objective(nn.Module):
    """The module's regularized loss as a forward pass (what DDP and torch.compile wrap)."""

    def __init__(self, module: NVAEModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.training_loss(x)[0]


def _objective() -> tuple[Objective, torch.Tensor]:
    """The tiny plain-backend model (flows included) after one eager step: the first step reads the
    regularizer's state once, which compiled steps never do."""
    torch.manual_seed(0)
    module = NVAEModule(arch=tiny_config(num_flows=1, backend="plain"), image_spec=SPEC)
    x = module._prepare(random_images(SPEC))
    module.training_loss(x)
    return Objective(module), x


def _loss_and_grads(objective: nn.Module, params: list[nn.Parameter], x: torch.Tensor, seed: int
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)  # the same posterior draws in both modes
    loss = objective(x)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), list(grads)


def _assert_same_step(eager: nn.Module, compiled: nn.Module, params: list[nn.Parameter], x: torch.Tensor) -> None:
    """Eager and compiled from the same state: losses and gradients. BatchNorm running statistics move
    with each forward, so each mode runs from a copy of the buffers."""
    buffers = {k: v.clone() for k, v in eager.state_dict().items()}
    loss_e, grads_e = _loss_and_grads(eager, params, x, seed=1)
    eager.load_state_dict(buffers)
    loss_c, grads_c = _loss_and_grads(compiled, params, x, seed=1)
    # aot_eager runs the same kernels in a traced order: float32 sums differ by rounding (~1e-7
    # relative on losses of ~5e3 nats); gradients against their largest entry.
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-4)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5 * max(ge.abs().max().item(), 1.0))


def test_the_training_objective_compiles_as_one_graph_with_the_eager_loss() -> None:
    objective, x = _objective()
    explained = torch._dynamo.explain(objective)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
    params = [p for p in objective.parameters() if p.requires_grad]
    _assert_same_step(objective, torch.compile(objective, backend="aot_eager", fullgraph=True), params, x)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        objective, x = _objective()
        ddp = nn.parallel.DistributedDataParallel(objective)
        explained = torch._dynamo.explain(ddp)(x)
        torch._dynamo.reset()
        params = [p for p in objective.parameters() if p.requires_grad]
        _assert_same_step(objective, torch.compile(ddp, backend="aot_eager"), params, x)
        Path(out, f"rank{rank}").write_text(f"{explained.graph_break_count}")
    finally:
        dist.destroy_process_group()


def test_the_training_objective_compiles_under_ddp(tmp_path: Path) -> None:
    """Two gloo processes: no graph break in DDP's module either, and the compiled loss and
    gradients (before DDP's all-reduce: torch.autograd.grad bypasses it) are the eager ones."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["0", "0"]
