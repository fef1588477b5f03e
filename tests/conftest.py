"""Shared fixtures: a tiny model configuration (2 scales x 2 groups, 8 channels, 16x16 images)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nvae.model import NVAE, NVAEConfig
from nvae.spec import ImageSpec

torch.set_num_threads(1)


def tiny_config(**overrides: object) -> NVAEConfig:
    base = dict(num_channels=8, num_latent_scales=2, num_groups_per_scale=2, num_latent_per_group=4,
                num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_mixtures=3)
    base.update(overrides)
    return NVAEConfig(**base)


@pytest.fixture
def tiny_rgb() -> NVAE:
    torch.manual_seed(0)
    return NVAE(ImageSpec(channels=3, size=16, num_bits=8), tiny_config(num_flows=1))


@pytest.fixture
def tiny_binary() -> NVAE:
    torch.manual_seed(0)
    return NVAE(ImageSpec(channels=1, size=16, num_bits=1, pad=2), tiny_config())


def random_images(spec: ImageSpec, n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    levels = 2 ** spec.num_bits
    return torch.randint(0, levels, (n, spec.channels, spec.size, spec.size), generator=g).float() / (levels - 1)


def fit_on_batch(model: NVAE, x: torch.Tensor, steps: int, lr: float) -> list[float]:
    """Adamax on the plain negative ELBO of one fixed batch; the loss of every step."""
    opt = torch.optim.Adamax(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(x)
        loss = (-model.log_likelihood(out.likelihood, x) + out.kl.sum(dim=1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="session")
def quickstart_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the quickstart preset after two training steps (debug overlay)."""

    from nvae.cli.train import main

    configs = Path(__file__).resolve().parent.parent / "configs"
    out = tmp_path_factory.mktemp("quickstart")
    cli = main(["fit", "--config", str(configs / "quickstart.yaml"), "--config", str(configs / "debug.yaml"),
                "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out)])
    return Path(cli.trainer.checkpoint_callback.last_model_path)
