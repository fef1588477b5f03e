"""Lightning callbacks: sample grids written as PNG files and to TensorBoard (paper sec. 4, samples)."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image


class SampleGrid(L.Callback):
    """After validation every ``every_n_epochs`` epochs and at the end of fit, draws ``num_samples``
    images from the prior at ``temperature`` and saves them as ``<log_dir>/samples/*.png``
    (also logged to TensorBoard when the logger is one)."""

    def __init__(self, num_samples: int = 64, temperature: float = 1.0, every_n_epochs: int = 1) -> None:
        """
        Args:
            num_samples: Images per grid.
            temperature: Prior temperature (scales the prior standard deviations).
            every_n_epochs: Write a grid after every this many validation epochs.
        """
        super().__init__()
        self.num_samples, self.temperature, self.every_n_epochs = num_samples, temperature, every_n_epochs
        self.last_path: Path | None = None

    def _out_dir(self, trainer: L.Trainer) -> Path:
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / "samples"

    @rank_zero_only
    def _write(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> None:
        was_training = module.training
        module.eval()
        images = module.model.sample(self.num_samples, self.temperature).float().cpu()
        module.train(was_training)
        grid = make_grid(images, nrow=int(self.num_samples ** 0.5), padding=2, pad_value=0.5)
        out = self._out_dir(trainer)
        os.makedirs(out, exist_ok=True)
        path = out / f"{name}.png"
        save_image(grid, path)
        self.last_path = path
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(f"samples/t{self.temperature:g}", grid, global_step=trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._write(trainer, module, f"epoch{trainer.current_epoch:04d}")

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        with torch.no_grad():
            self._write(trainer, module, "final")
