"""The weight EMA, and BatchNorm statistics that belong to its weights.

``model.ema_decay`` keeps an exponential moving average of the weights (:class:`WeightEMA`).
BatchNorm's running statistics are no weights: the live model's describe the activations of the
live weights, and the averaged weights evaluated with them lose (the quickstart with decay 0.99
ended at 114.25 nats against 99.89 without; docs/performance.md). So the averages get statistics
of their own, re-estimated the way the paper readjusts them before sampling (sec. 5.2, BN
readjustment; sec. 3.1 on BatchNorm's momentum): :func:`estimate_batchnorm` runs training batches
through the model holding the averages, in train mode without gradients, every BatchNorm layer
reset and averaging its batches cumulatively (``momentum=None``: each batch counts the same).

The batches (:func:`estimation_batches`) and the posterior noise come from a seed of the run's seed
and the global step (:func:`estimate_seed`, :func:`seeded`), with every RNG state restored after:
the estimate is a function of the averaged weights and the step, training draws what it would have
drawn without it, and a resumed run estimates the same statistics. SyncBatchNorm layers normalize
each process's batch alone while estimating (:func:`local_batchnorm`): an emergency checkpoint is
written by rank 0 alone and may not wait for the other processes.
"""
from __future__ import annotations

import random
import types
from contextlib import contextmanager
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nvae.compat import BatchNormBase, foreach_lerp_
from nvae.sampling import batchnorm_buffers

MAX_BN_BATCHES = 10_000  # model.ema_bn_batches: 20x the official code's 500 readjustment batches


# ------------------------------------------------------------------------------------------ the averages
class WeightEMA:
    """Exponential moving average of a module's floating-point parameters (its decay warmed up:
    :meth:`decay_at`), and the BatchNorm statistics of those averages.

    Kept out of the module's buffers on purpose: DDP would broadcast it every step. ``stats`` are the
    statistics of the current averages (:func:`estimate_batchnorm`), None until estimated and again
    after each update. While swapped in (:meth:`swap`), the module holds the averages and ``stats``,
    and ``params`` and ``live_stats`` hold the live weights and statistics.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"model.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.stats: Optional[dict[str, torch.Tensor]] = None
        self.live_stats: Optional[dict[str, torch.Tensor]] = None  # set while swapped in

    @property
    def swapped(self) -> bool:
        """Whether the module holds the averages now."""
        return self.live_stats is not None

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (1 for the first): ``min(decay, (1 + step)
        / (10 + step))``, the warm-up of TensorFlow's ExponentialMovingAverage. A fixed decay d keeps
        d^step of the random initialization in the average (0.99 over the quickstart's 470 steps:
        0.9%; 0.9999 over 20,000 steps: 13.5%); warmed up, the average spans about the last tenth of
        the steps until the decay reaches d."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int, keep: Optional[torch.Tensor] = None) -> None:
        """The average after optimizer step ``step``, one :meth:`decay_at` towards the live weights; the
        statistics no longer fit it. With ``keep`` (0-d, 1.0 or 0.0 on the device: the step guard's
        decision) the average moves only if it is 1, without the flag being read back."""
        names = [n for n, p in module.named_parameters()]
        live = [p.detach() for p in module.parameters()]
        avg = [self.params[n] for n in names]
        if avg[0].device != live[0].device:
            self.to(live[0].device)
            avg = [self.params[n] for n in names]
        weight = 1.0 - self.decay_at(step)
        if keep is None:
            foreach_lerp_(avg, live, weight)
        else:
            delta = torch._foreach_sub(live, avg)  # avg + w (live - avg), as lerp computes it for w < 0.5
            torch._foreach_mul_(delta, keep.to(live[0].device) * weight)
            torch._foreach_add_(avg, delta)
        self.stats = None

    def to(self, device: torch.device) -> None:
        self.params = {n: p.to(device) for n, p in self.params.items()}

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """A full state dict of ``module`` for the averages: averaged parameters, their BatchNorm
        statistics (the module's own where none were estimated), the other buffers as they are."""
        if self.swapped:
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
        average = {**self.params, **(self.stats or {})}
        return {k: average.get(k, v).detach().clone() for k, v in module.state_dict().items()}

    def load(self, state: dict[str, torch.Tensor], module: nn.Module, statistics: bool = False) -> None:
        """Averages from a checkpoint's EMA entry; ValueError naming the first missing or misshapen weight
        (or misshapen statistic). Its BatchNorm statistics are read with ``statistics`` (a validation or
        test of the file) where it has them all; else they are estimated again when needed (a resumed run,
        which has its training data: the same ones)."""
        wanted = dict(module.named_parameters())
        buffers = batchnorm_buffers(module) if statistics else {}
        if not all(isinstance(state.get(k), torch.Tensor) for k in buffers):
            buffers = {}  # an entry of weights alone
        for n, t in {**wanted, **buffers}.items():
            if not isinstance(state.get(n), torch.Tensor) or state[n].shape != t.shape:
                raise ValueError(f"checkpoint EMA entry: {n!r} is missing or not of shape {tuple(t.shape)}")
        device = next(module.parameters()).device
        self.params = {n: state[n].to(device).clone() for n in wanted}
        self.stats = None
        if buffers:
            self.set_stats(module, {k: state[k].to(b.dtype) for k, b in buffers.items()})

    @torch.no_grad()
    def swap(self, module: nn.Module) -> None:
        """Exchange the module's parameters with the averages, and its BatchNorm statistics with
        ``stats`` when they are estimated (call again to swap back)."""
        for n, p in module.named_parameters():
            kept = p.detach().clone()
            p.copy_(self.params[n])
            self.params[n] = kept
        buffers = batchnorm_buffers(module)
        if self.swapped:
            for k, v in self.live_stats.items():
                buffers[k].copy_(v)
            self.live_stats = None
        else:
            self.live_stats = {k: v.detach().clone() for k, v in buffers.items()}
            if self.stats is not None:
                self.set_stats(module, self.stats)

    @torch.no_grad()
    def set_stats(self, module: nn.Module, stats: dict[str, torch.Tensor]) -> None:
        """Keep ``stats`` as the averages' statistics, and put them into the module while it holds the averages."""
        buffers = batchnorm_buffers(module)
        self.stats = {k: v.detach().to(buffers[k].device).clone() for k, v in stats.items()}
        if self.swapped:
            for k, v in self.stats.items():
                buffers[k].copy_(v)


# ------------------------------------------------------------------------------------------ their statistics
def estimate_seed(run_seed: int, step: int) -> int:
    """The RNG seed of the estimate at global step ``step`` of a run seeded ``run_seed``."""
    return (run_seed * 1_000_003 + step) % 2**63


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Inside the block torch (CPU and ``device``), Python and NumPy draw from ``seed``; their states
    are restored afterwards."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def estimation_batches(dataset: Dataset, batch_size: int, count: int, collate: Callable[[list], Any],
                       generator: torch.Generator) -> Iterator[Any]:
    """``count`` batches of ``batch_size`` items of ``dataset``, drawn by ``generator`` without
    replacement (a fresh permutation whenever the data is used up); a data set without a length is
    read in its own order."""
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        yield from islice(iter(DataLoader(dataset, batch_size=batch_size, collate_fn=collate)), count)
        return
    if n == 0:
        raise ValueError("model.ema_bn_batches: the training data set is empty, no batch to estimate BatchNorm "
                         "statistics from")
    order = torch.empty(0, dtype=torch.long)
    for _ in range(count):
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        chosen, order = order[:batch_size], order[batch_size:]
        yield collate([dataset[int(i)] for i in chosen])


@contextmanager
def local_batchnorm(layers: Iterable[nn.Module]) -> Iterator[None]:
    """SyncBatchNorm layers among ``layers`` normalize with this process's batch alone inside the
    block (BatchNorm's own forward: no collective)."""
    synced = [m for m in layers if isinstance(m, nn.SyncBatchNorm)]
    for m in synced:
        m.forward = types.MethodType(BatchNormBase.forward, m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in synced:
            del m.forward


@torch.no_grad()
def estimate_batchnorm(model: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any]
                       ) -> tuple[dict[str, torch.Tensor], int]:
    """BatchNorm statistics of ``model``'s current weights: every layer reset, then ``forward(batch)``
    for each batch in train mode without gradients, each layer averaging its batch means and
    (unbiased) variances cumulatively. A batch that leaves a statistic non-finite is undone.
    Returns (statistics by buffer name, batches counted); the model's own statistics, momenta and
    train/eval mode are as before."""
    layers = [m for m in model.modules() if isinstance(m, BatchNormBase)]
    buffers = batchnorm_buffers(model)
    before = {k: v.clone() for k, v in buffers.items()}
    momenta, was_training, counted = [m.momentum for m in layers], model.training, 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        model.train()
        with local_batchnorm(layers):
            for batch in batches:
                kept = {k: v.clone() for k, v in buffers.items()}
                forward(batch)
                if all(bool(torch.isfinite(v).all()) for v in buffers.values()):
                    counted += 1
                else:
                    for k, v in kept.items():
                        buffers[k].copy_(v)
        stats = {k: v.clone() for k, v in buffers.items()}
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for k, v in before.items():
            buffers[k].copy_(v)
        model.train(was_training)
    return stats, counted


__all__ = ["MAX_BN_BATCHES", "WeightEMA", "estimate_batchnorm", "estimate_seed", "estimation_batches",
           "local_batchnorm", "seeded"]
