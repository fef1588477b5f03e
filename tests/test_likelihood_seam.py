"""The likelihood seam: a family added in one place (a class here, one registry entry) is chosen by
name in ``model.arch`` and trains through the command line like the built-in ones."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nvae.checkpoint import load_checkpoint
from nvae.cli.train import main
from nvae.likelihoods import LIKELIHOODS, likelihood_name
from nvae.model import NVAEConfig
from nvae.spec import ImageSpec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class Gaussian:
    """Independent Normal values N(mu, sigma^2) on [0, 1] images (a density, not a grid's masses)."""

    def __init__(self, params: torch.Tensor) -> None:
        self.mu, log_sigma = params.chunk(2, dim=1)  # (B, C, H, W) each
        self.sigma = torch.exp(log_sigma.clamp(-7.0, 2.0))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((x - self.mu) / self.sigma) ** 2 - torch.log(self.sigma) - 0.5 * math.log(2 * math.pi)

    def mean(self, quantize: bool = False) -> torch.Tensor:
        return self.mu.clamp(0.0, 1.0)

    def sample(self) -> torch.Tensor:
        return (self.mu + self.sigma * torch.randn_like(self.mu)).clamp(0.0, 1.0)


class GaussianFamily:
    def head_channels(self, spec: ImageSpec, cfg: NVAEConfig) -> int:
        return 2 * spec.channels

    def build(self, params: torch.Tensor, spec: ImageSpec, cfg: NVAEConfig) -> Gaussian:
        return Gaussian(params)

    def describe(self, cfg: NVAEConfig) -> str:
        return "gaussian"


def test_a_gaussian_likelihood_added_in_one_place_trains(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(LIKELIHOODS, "gaussian", GaussianFamily())  # the registry line
    cli = main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "debug.yaml"),
                "--model.arch.likelihood", "gaussian", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.trainer.global_step == 2
    model = load_checkpoint(cli.trainer.checkpoint_callback.last_model_path).model
    assert model.likelihood_name == "gaussian" and model.head[-1].out_channels == 2  # mean and log-sigma
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())

    x = torch.rand(3, 1, model.spec.size, model.spec.size)
    with torch.no_grad():
        out = model(x)
        ours = model.log_likelihood(out.likelihood, x)
    lik, p = out.likelihood, model.spec.pad
    reference = torch.distributions.Normal(lik.mu, lik.sigma).log_prob(x)[..., p:-p, p:-p].flatten(1).sum(dim=1)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-3)  # float32 sums of ~800 terms of size ~1


def test_likelihood_names_are_checked_and_auto_follows_the_bits() -> None:
    with pytest.raises(ValueError, match="model.arch.likelihood must be auto or one of bernoulli, dmol, got 'gaussian'"):
        NVAEConfig(likelihood="gaussian")
    assert likelihood_name("auto", 1) == "bernoulli" and likelihood_name("auto", 8) == "dmol"
    assert likelihood_name("dmol", 1) == "dmol"  # a named family is taken as given
