"""Nothing lost when a run stops: atomic checkpoints, a checkpoint on preemption, exact resume.

- :class:`SafeCheckpointIO` makes every checkpoint write atomic (temporary file, fsync, rename), so
  a kill mid-write never leaves a truncated ``last.ckpt``, and refuses to write weights that are
  not finite (the previous checkpoint stays).
- :class:`PreemptionCheckpoint` turns SIGTERM (cluster preemption, via Lightning's own handler)
  and the first Ctrl+C into "stop after this step", then writes ``last.ckpt``; rerunning the same
  command with ``--resume auto`` continues from it (:func:`find_resume_checkpoint`).
- Exact resume needs the RNG streams of every process (:class:`RNGState`, :func:`gather_rng_states`)
  and the data order (:class:`nvae.data.base.ResumableSampler`); everything else is Lightning's
  checkpoint.
"""
from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nvae.checkpoint import RNG_KEY, STATE_KEY
from nvae.compat import dump_checkpoint, request_stop
from nvae.guard import nonfinite_entries

LAST = "last.ckpt"


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(states: list[dict[str, Any]], rank: int) -> None:
    """This rank's saved state; a rank without one (emergency checkpoint) derives a distinct stream
    from rank 0's."""
    set_rng_state(states[rank] if rank < len(states) else states[0])
    if rank >= len(states):
        seed = int(torch.randint(2**62, (rank + 1,))[-1])
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(trainer: L.Trainer, local_only: bool = False) -> list[dict[str, Any]]:
    """RNG states of all processes, rank order (every process must call this together), or only
    this process's when ``local_only`` (an emergency save cannot risk a collective)."""
    mine = rng_state()
    if local_only:
        return [mine]
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        states: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(states, mine)
        return states
    return [mine]


class RNGState(L.Callback):
    """Saves every process's RNG states in checkpoints (``nvae_rng``) and restores them when training
    resumes, after the sanity check, so a resumed run draws what the uninterrupted one would have."""

    def __init__(self) -> None:
        self.local_only = False
        """Set during an emergency save (:class:`PreemptionCheckpoint`): no collective, this process's states only."""
        self._to_load: Optional[list[dict[str, Any]]] = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = gather_rng_states(trainer, local_only=self.local_only)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._to_load = checkpoint.get(RNG_KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_load:
            restore_rng(self._to_load, trainer.global_rank)
            self._to_load = None


# ------------------------------------------------------------------------------------------ atomic writes
class AtomicTorchCheckpointIO(TorchCheckpointIO):
    """torch.save to ``path.tmp``, fsync, rename over ``path``; non-finite weights are not written."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        bad = nonfinite_entries(checkpoint.get(STATE_KEY, {}))
        if bad:
            rank_zero_warn(f"not writing checkpoint '{path}': non-finite values in {len(bad)} tensor(s), e.g. "
                           f"{bad[0]}; the previous checkpoint is kept")
            return
        path = Path(path)
        if "://" in str(path):  # remote file systems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


class SafeCheckpointIO(L.Callback):
    """Installs :class:`AtomicTorchCheckpointIO` as the strategy's checkpoint writer."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicTorchCheckpointIO()


# ------------------------------------------------------------------------------------------ preemption
def last_checkpoint_path(trainer: L.Trainer) -> str:
    """Where an emergency ``last.ckpt`` goes: the checkpoint callback's folder, else the first logger's
    folder (``trainer.default_root_dir`` without one) + ``checkpoints``.

    Found without ``trainer.log_dir``: that property broadcasts, a collective that processes stopped
    at different points would hang on (reachable with ``trainer.enable_checkpointing false``).
    """
    folder = getattr(trainer.checkpoint_callback, "dirpath", None)
    if not folder:
        logger = trainer.loggers[0] if trainer.loggers else None
        root = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir
        folder = os.path.join(root, "checkpoints")
    return os.path.join(folder, LAST)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or a first Ctrl+C: finish the step, write ``last.ckpt``, exit (a second Ctrl+C aborts).

    ``rng``: the run's :class:`RNGState`, told to save without a collective during an emergency save.
    """

    def __init__(self, rng: Optional[RNGState] = None) -> None:
        self._previous: Any = None
        self.rng = rng

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def on_interrupt(signum: int, frame: Any) -> None:
            rank_zero_info("\nnvae: stopping after this step and writing a checkpoint (Ctrl+C again to abort)")
            request_stop(trainer)  # what Lightning's SIGTERM handler does
            signal.signal(signal.SIGINT, signal.default_int_handler)

        try:
            self._previous = signal.signal(signal.SIGINT, on_interrupt)
        except ValueError:  # not the main thread (e.g. a notebook's worker): keep the default
            self._previous = None

    def _restore(self) -> None:
        if self._previous is not None:
            try:
                signal.signal(signal.SIGINT, self._previous)
            except ValueError:
                pass
            self._previous = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        path = last_checkpoint_path(trainer)
        callback = trainer.checkpoint_callback
        if callback is not None and hasattr(callback, "last_model_path"):
            callback.last_model_path = path  # its own file: a resumed run overwrites it instead of adding last-v1
        if trainer.world_size == 1:
            trainer.save_checkpoint(path)
        else:
            # The processes may be at different points of Lightning's SIGTERM broadcast: no collective
            # here. The weights are identical everywhere, so rank 0 alone writes (its RNG state only).
            if self.rng is not None:
                self.rng.local_only = True
            try:
                if trainer.is_global_zero:
                    checkpoint = dump_checkpoint(trainer)
                    trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
            finally:
                if self.rng is not None:
                    self.rng.local_only = False
        rank_zero_info(f"nvae: stopped at step {trainer.global_step}; checkpoint written to {path}. "
                       "Rerun the same command with --resume auto to continue.")


def find_resume_checkpoint(*folders: Optional[str]) -> Optional[Path]:
    """The newest ``last.ckpt`` (or ``last-vN.ckpt``) under the given folders (recursively), or None."""
    found = [p for folder in folders if folder and os.path.isdir(folder) for p in Path(folder).rglob("last*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
