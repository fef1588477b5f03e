"""PnP-HVAE restoration: the loop's fixed points and invariants, on tiny models."""
from __future__ import annotations

import pytest
import torch

from conftest import fit_on_batch, random_images, tiny_config
from nvae.model import NVAE
from nvae.restore.baselines import _upsample_at_samples, adam_restore, degraded, encode_decode
from nvae.restore.operators import Downsample, Identity, Mask
from nvae.restore.pnp import PnPSettings, from_model, pnp_restore, to_model
from nvae.spec import ImageSpec


@pytest.fixture(scope="module")
def rgb() -> NVAE:
    """A DMoL model with a flow per group and padding: every NVAE specific the latent step must handle."""
    torch.manual_seed(0)
    return NVAE(ImageSpec(channels=3, size=16, num_bits=8, pad=2), tiny_config(num_flows=1)).eval()


@pytest.fixture(scope="module")
def fitted() -> NVAE:
    """A tiny binary model fitted to four patterns (as in test_latents): a prior whose decoder responds."""
    from test_latents import SPEC, patterns

    torch.manual_seed(0)
    model = NVAE(SPEC, tiny_config())
    fit_on_batch(model, patterns(), steps=150, lr=2e-2)
    model.zero_grad(set_to_none=True)
    return model.eval()


def _clean(model: NVAE, n: int = 3) -> torch.Tensor:
    """Images at the user's size (the model's size less its padding)."""
    return from_model(random_images(model.spec, n=n), model)


def test_identity_with_vanishing_noise_at_t1_beta1_returns_the_models_reconstruction(rgb: NVAE) -> None:
    x = _clean(rgb)
    with torch.no_grad():
        recon = from_model(rgb(to_model(x, rgb), use_mean=True).likelihood.mean(quantize=False), rgb)
    one = pnp_restore(rgb, Identity(), x, x, PnPSettings(sigma=1e-4, iterations=1))
    # b = 1 - beta T^2 = 0: the product is the posterior itself; only the division's rounding differs
    torch.testing.assert_close(one.mean, recon, rtol=0, atol=1e-5)
    three = pnp_restore(rgb, Identity(), x, x, PnPSettings(sigma=1e-4, iterations=3, tol=0))
    # the data step moves x off y by at most w/(1+w) = 4e-6 (w = (1e-4/0.05)^2): the same fixed point
    torch.testing.assert_close(three.mean, recon, rtol=0, atol=1e-4)
    assert three.iterations.tolist() == [3, 3, 3]


def test_inpainting_keeps_observed_pixels_within_the_noise_and_fills_the_rest_from_the_decoder(rgb: NVAE) -> None:
    x = _clean(rgb)
    op = Mask.box(x.shape, 0.5)
    sigma = 0.01
    y = op(x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
    out = pnp_restore(rgb, op, y, degraded(op, y), PnPSettings(sigma=sigma, sigma_dec=0.1, iterations=4,
                                                               temperature=(0.8, 0.6)))
    m = op.forward(torch.ones_like(x)).bool()
    # observed: x = (y + w mu) / (1 + w) with w = (0.01 / 0.1)^2, so |x - y| <= w / (1 + w) < sigma
    assert (out.x - y)[m].abs().max() <= sigma
    # missing: the data term is silent, so x is the decoder mean there
    torch.testing.assert_close(out.x[~m], out.mean[~m], rtol=0, atol=1e-6)
    assert not torch.allclose(out.mean, x, atol=0.05)  # an untrained prior does not know these images


def test_an_image_restores_the_same_alone_or_in_a_batch_and_the_seed_fixes_sampling(rgb: NVAE) -> None:
    x = _clean(rgb)
    op = Downsample(2)
    y = op(x)
    settings = PnPSettings(sigma=0.02, iterations=3, sample=True, temperature=(0.9, 0.7))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = pnp_restore(rgb, op, y, degraded(op, y), settings, gens([10, 11, 12]))
    again = pnp_restore(rgb, op, y, degraded(op, y), settings, gens([10, 11, 12]))
    alone = pnp_restore(rgb, op, y[1:2], degraded(op, y[1:2]), settings, gens([11]))
    other = pnp_restore(rgb, op, y, degraded(op, y), settings, gens([20, 21, 22]))
    torch.testing.assert_close(again.mean, batch.mean, rtol=0, atol=0)
    # alone vs in a batch of 3: the same arithmetic up to the convolutions' batch-size-dependent reduction order
    torch.testing.assert_close(alone.mean, batch.mean[1:2], rtol=0, atol=1e-5)
    assert (other.mean - batch.mean).abs().max() > 1e-3  # other seeds, other draws


def test_stopping_is_per_image(rgb: NVAE) -> None:
    x = _clean(rgb, n=2)
    y = x.clone()
    y[1] = 0.5  # a flat image and a random one converge at different speeds
    out = pnp_restore(rgb, Identity(), y, y, PnPSettings(sigma=0.05, iterations=40, tol=1e-3, patience=2))
    alone = pnp_restore(rgb, Identity(), y[:1], y[:1], PnPSettings(sigma=0.05, iterations=40, tol=1e-3, patience=2))
    assert out.iterations[0] == alone.iterations[0] < 40
    torch.testing.assert_close(alone.x, out.x[:1], rtol=0, atol=1e-5)  # see the batch test above


def test_degraded_images_fill_masks_with_the_observed_mean_and_upsample_at_the_sampling_positions() -> None:
    y = torch.zeros(1, 1, 4, 4)
    y[..., :2, :] = 0.8
    op = Mask.half((4, 4), "bottom")
    torch.testing.assert_close(degraded(op, op(y)), torch.full((1, 1, 4, 4), 0.8))  # observed top half is 0.8
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    up = _upsample_at_samples(x[..., ::4, ::4], 4)  # Downsample reads pixel 4i; bicubic back at j / 4
    # an interpolant passes through its samples: aligned, pixel 4i gets sample i back (a half-pixel
    # convention, as F.interpolate's, would shift them by 3/8 of a pixel and miss)
    torch.testing.assert_close(up[..., ::4, ::4], x[..., ::4, ::4])
    assert not torch.allclose(up, x)


def test_encode_decode_is_the_reconstruction_of_the_degraded_image(rgb: NVAE) -> None:
    x = _clean(rgb, n=2)
    op = Mask.random(x.shape, 0.5, torch.Generator().manual_seed(0))
    x0 = degraded(op, op(x))
    with torch.no_grad():
        want = from_model(rgb(to_model(x0, rgb), use_mean=True).likelihood.mean(quantize=False), rgb)
    torch.testing.assert_close(encode_decode(rgb, x0), want, rtol=0, atol=1e-5)  # division rounding only


def test_adam_and_pnp_with_a_fitted_prior_fill_a_box_better_than_the_degraded_image(fitted: NVAE) -> None:
    from test_latents import patterns

    x = from_model(patterns(), fitted)  # (4, 1, 12, 12): the patterns inside the padding
    op = Mask.box(x.shape, 0.5)
    y = op(x)
    x0 = degraded(op, y)
    settings = PnPSettings(sigma=0.05, sigma_dec=0.1, iterations=30, temperature=(0.7, 0.7))
    adam = adam_restore(fitted, op, y, x0, settings, lr=0.05)
    pnp = pnp_restore(fitted, op, y, x0, settings)
    error = lambda est: (est - x).square().mean().item()  # noqa: E731
    # 0.094 filled with the mean; 0.013 (Adam) and 0.009 (PnP) with this seed: the prior knows the patterns
    assert error(adam.mean) < 0.5 * error(x0) and error(pnp.mean) < 0.5 * error(x0)
    assert not any(p.grad is not None for p in fitted.parameters())  # Adam computed the latents' gradients only
