"""Lightning callbacks: sample grids and reconstructions, as PNG files and TensorBoard images (sec. 4)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image


class SampleGrid(L.Callback):
    """After validation every ``every_n_epochs`` epochs and at the end of fit: ``num_samples``
    prior samples at each of ``temperatures`` and ``num_reconstructions`` validation images above
    their reconstructions, saved as ``<log_dir>/samples/*.png`` and logged to TensorBoard
    (``samples/t<T>``, ``reconstructions``) when the logger is one. Rank 0 only; validation uses
    the EMA weights when the model keeps them, and so do these images."""

    def __init__(self, num_samples: int = 64, temperatures: Sequence[float] = (1.0, 0.8, 0.6),
                 every_n_epochs: int = 1, num_reconstructions: int = 8) -> None:
        """
        Args:
            num_samples: Images per sample grid.
            temperatures: Prior temperatures, one grid each (the paper samples at 0.6-1.0).
            every_n_epochs: Write the images after every this many validation epochs.
            num_reconstructions: Validation images shown with their reconstructions (0: none).
        """
        super().__init__()
        if num_samples < 1 or every_n_epochs < 1 or num_reconstructions < 0:
            raise ValueError("SampleGrid: num_samples and every_n_epochs must be >= 1, num_reconstructions >= 0")
        if not temperatures or min(temperatures) < 0:
            raise ValueError(f"SampleGrid: temperatures must be a non-empty list of values >= 0, got {temperatures}")
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.temperatures = [float(t) for t in temperatures]
        self.num_reconstructions = num_reconstructions
        self.inputs: Optional[torch.Tensor] = None
        self.last_paths: list[Path] = []

    @property
    def last_path(self) -> Optional[Path]:
        """The last grid written (the first temperature's)."""
        return self.last_paths[0] if self.last_paths else None

    def _out_dir(self, trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    def on_validation_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self.num_reconstructions and self.inputs is None:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.inputs = x[: self.num_reconstructions].detach().float().cpu()

    def _save(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> None:
        # On every process: under DDP trainer.log_dir is a broadcast, and one made by rank 0 alone
        # pairs with the other ranks' next broadcast (the test run after fit then deadlocks).
        self._write(trainer, module, name, self._out_dir(trainer))

    @rank_zero_only
    @torch.no_grad()
    def _write(self, trainer: L.Trainer, module: L.LightningModule, name: str, out: Path) -> None:
        was_training = module.training
        module.eval()
        experiment = getattr(trainer.logger, "experiment", None)
        os.makedirs(out, exist_ok=True)
        self.last_paths = []
        for t in self.temperatures:
            images = module.model.sample(self.num_samples, t).float().cpu()
            grid = make_grid(images, nrow=int(self.num_samples ** 0.5), padding=2, pad_value=0.5)
            path = out / f"{name}_t{t:g}.png"
            save_image(grid, path)
            self.last_paths.append(path)
            if hasattr(experiment, "add_image"):
                experiment.add_image(f"samples/t{t:g}", grid, global_step=trainer.global_step)
        if self.inputs is not None:
            x = self.inputs.to(module.device)
            recon = module.model.reconstruct(x).float().cpu()
            grid = make_grid(torch.cat([x.cpu(), recon]), nrow=x.shape[0], padding=2, pad_value=0.5)
            save_image(grid, out / f"{name}_reconstructions.png")
            if hasattr(experiment, "add_image"):
                experiment.add_image("reconstructions", grid, global_step=trainer.global_step)
        module.train(was_training)

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.inputs = None  # the first batch of this validation is shown

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._save(trainer, module, f"epoch{trainer.current_epoch:04d}")

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module, "final")
