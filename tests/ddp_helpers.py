"""Pieces of the DDP test that spawned processes import (they must live in an importable module)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn

from nvae.distributions import Normal


class DeterministicLatents(L.Callback):
    """z = posterior mean in every process during fit, so that a 2-process step and a 1-process
    step on the concatenated batch see the same latents; restored at teardown."""

    def setup(self, trainer, module, stage) -> None:  # noqa: ANN001
        self._sample = Normal.sample
        Normal.sample = lambda self, temperature=1.0: self.mu  # type: ignore[method-assign]

    def teardown(self, trainer, module, stage) -> None:  # noqa: ANN001
        Normal.sample = self._sample  # type: ignore[method-assign]


class FreezeBatchNorm(L.Callback):
    """BatchNorm in eval mode (running statistics): per-process batch statistics would differ."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class SaveFirstGradients(L.Callback):
    """Writes the (all-reduced) gradients of the first optimizer step to ``path`` on rank 0."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:  # noqa: ANN001
        if trainer.global_step == 0 and trainer.is_global_zero:
            grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
            torch.save(grads, Path(self.path))
            ddp = trainer.strategy.model  # DistributedDataParallel under DDP
            torch.save({"bucket_view": bool(getattr(ddp, "gradient_as_bucket_view", False))},
                       Path(self.path).with_suffix(".ddp"))


class RankInterleaved(torch.utils.data.Sampler):
    """Process r of w reads items r, r + w, r + 2w, ... in order (a deterministic DistributedSampler)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _rank_world(self) -> tuple[int, int]:
        dist = torch.distributed
        return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)

    def __iter__(self):  # noqa: ANN204
        rank, world = self._rank_world()
        return iter(range(rank, self.size, world))

    def __len__(self) -> int:
        rank, world = self._rank_world()
        return len(range(rank, self.size, world))


class NanLossOnRank(L.Callback):
    """Fault injection: an infinite loss on one process only, at one step (its gradients stay finite, so only
    the processes' vote on the loss can make the others skip too); records the guard's decisions."""

    def __init__(self, rank: int, step: int, path: str) -> None:
        self.rank, self.step, self.path = rank, step, path

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            original = module.training_loss

            def poisoned(x):  # noqa: ANN001, ANN202
                module.training_loss = original
                loss, *rest = original(x)
                return (loss + float("inf"), *rest)

            module.training_loss = poisoned

    def on_train_end(self, trainer, module) -> None:  # noqa: ANN001
        flat = torch.cat([p.detach().flatten() for p in module.parameters()])
        torch.save({"skipped": int(module.run_callbacks.guard.guard.skipped), "weights": flat},
                   Path(self.path) / f"rank{trainer.global_rank}.pt")


class SigtermAllRanks(L.Callback):
    """Preemption as SLURM / torchrun deliver it: SIGTERM to every process, at the end of step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        import os
        import signal

        if trainer.global_step - 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class RankDependent(torch.utils.data.Dataset):
    """Images that differ by process: rank 1 reads rank 0's inverted (1 - x), so statistics each process
    estimated alone from its training set would differ."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return self.images[index] if rank == 0 else 1.0 - self.images[index]


class BatchNormDuringValidation(L.Callback):
    """Writes the model's BatchNorm statistics at each validation's first batch to ``path/rank<r>.pt``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        from nvae.sampling import batchnorm_state

        if batch_idx == 0 and not trainer.sanity_checking:
            torch.save(batchnorm_state(module.model), Path(self.path) / f"rank{trainer.global_rank}.pt")
