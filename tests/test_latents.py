"""The latent API: encode, decode, partial reconstruction, interpolation, and sample.py's flags."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import fit_on_batch, random_images, tiny_config
from nvae.model import NVAE
from nvae.cli.sample import main as sample_main
from nvae.spec import ImageSpec

SPEC = ImageSpec(channels=1, size=16, num_bits=1, pad=2)


def patterns() -> torch.Tensor:
    """Four very different binary images (blank borders, as padded data)."""
    x = torch.zeros(4, 1, 16, 16)
    x[0, :, 2:14, 2:8] = 1  # left half
    x[1, :, 2:8, 2:14] = 1  # top half
    x[2, :, 2:14, 2:14] = 1  # full
    x[3, :, 5:11, 5:11] = 1  # centre square
    return x


@pytest.fixture(scope="module")
def fitted() -> NVAE:
    """A tiny model fitted to the four patterns, so its posteriors carry which one it saw."""
    torch.manual_seed(0)
    model = NVAE(SPEC, tiny_config())
    fit_on_batch(model, patterns(), steps=150, lr=2e-2)
    return model.eval()


def test_encode_shapes_and_decode_of_all_groups_is_deterministic(fitted: NVAE) -> None:
    x = patterns()
    groups = fitted.encode(x)
    assert len(groups) == fitted.num_groups == 4
    for g, shape in zip(groups, [fitted.topology.latent_shape(g, 4) for g in fitted.topology.groups]):
        assert g.mean.shape == g.std.shape == g.z.shape == shape and (g.std > 0).all()
    torch.testing.assert_close(groups[0].z, groups[0].mean)  # means by default (no flows here)
    z = [g.z for g in groups]
    torch.manual_seed(1)
    a = fitted.decode(z, temperature=1.0)
    torch.manual_seed(2)
    b = fitted.decode(z, temperature=0.3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # every group fixed: no randomness left
    torch.testing.assert_close(fitted.encode(x)[2].mean, groups[2].mean)  # encode with means is deterministic


def test_decoding_the_posterior_reconstructs_better_than_the_prior(fitted: NVAE) -> None:
    x = patterns()
    torch.manual_seed(0)
    recon_error = (fitted.reconstruct(x) - x).abs().mean()
    # the prior's error averaged over 16 draws: one draw's varies 0.30-0.56 between training seeds
    prior_error = torch.stack([(fitted.sample(4) - x).abs().mean() for _ in range(16)]).mean()
    top_only_error = (fitted.reconstruct(x, keep_groups=1) - x).abs().mean()
    assert recon_error < 0.7 * prior_error  # 0.45-0.59 of it over training seeds 0-3
    assert recon_error <= top_only_error + 1e-6  # more groups from the posterior: at least as close


def test_groups_left_out_come_from_the_prior(fitted: NVAE) -> None:
    z = [g.z for g in fitted.encode(patterns())]
    torch.manual_seed(0)
    a = fitted.decode(z[:2], mean=True)
    torch.manual_seed(1)
    b = fitted.decode(z[:2] + [None, None], mean=True)
    assert not torch.equal(a, b)  # the two lower groups were sampled afresh
    with pytest.raises(ValueError, match="latent of group 2 has shape"):
        fitted.decode([z[0], z[1], z[0]])  # group 2 lives on the finer scale
    with pytest.raises(ValueError, match="keep_groups must be in 0..4"):
        fitted.reconstruct(patterns(), keep_groups=5)


def test_interpolation_starts_and_ends_at_the_reconstructions(fitted: NVAE) -> None:
    x = patterns()
    frames = fitted.interpolate(x[:1], x[1:2], steps=5)
    assert frames.shape == (5, 1, 1, 16, 16)
    torch.testing.assert_close(frames[0], fitted.reconstruct(x[:1]))
    torch.testing.assert_close(frames[-1], fitted.reconstruct(x[1:2]))


def test_sample_cli_reconstruct_interpolate_encode(quickstart_checkpoint: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    x = random_images(ImageSpec(channels=1, size=28, num_bits=8), n=3)
    for i, img in enumerate(x):
        Image.fromarray((img[0] * 255).byte().numpy()).save(images / f"{i}.png")
    ck = str(quickstart_checkpoint)
    out = sample_main(["--checkpoint", ck, "--reconstruct", str(images), "--keep-groups", "1", "4",
                       "--output", str(tmp_path / "rec.png")])
    grid = Image.open(tmp_path / "rec.png")
    assert out["task"] == "reconstruct" and out["num_images"] == 3 and out["keep_groups"] == [1, 4]
    assert grid.size == (3 * 34 + 2, 3 * 34 + 2)  # 3 columns; rows: inputs, keep 1, keep 4 (32 px + 2 padding)
    out = sample_main(["--checkpoint", ck, "--interpolate", str(images / "0.png"), str(images / "1.png"),
                       "--steps", "5", "--output", str(tmp_path / "lerp.png")])
    assert Image.open(tmp_path / "lerp.png").size == (5 * 34 + 2, 34 + 2)
    out = sample_main(["--checkpoint", ck, "--encode", str(images), "--output", str(tmp_path / "z.pt")])
    saved = torch.load(tmp_path / "z.pt", weights_only=True)
    assert len(saved["z"]) == out["num_groups"] and saved["z"][0].shape[0] == 3
    with pytest.raises(SystemExit, match="does not exist"):
        sample_main(["--checkpoint", ck, "--reconstruct", str(tmp_path / "missing.png")])


def test_traverse_hook_sees_every_group_top_first_and_default_choice_matches_forward(tiny_rgb: NVAE) -> None:
    """The public traversal's hook: the posterior it sees is the one the model decodes with."""
    model = tiny_rgb.eval()  # one flow per group: the hook's posterior is the pre-flow Gaussian
    x = random_images(model.spec, n=2)
    views = []

    def means_through_flows(view):
        views.append(view)
        return view.flows(view.posterior.mu)

    with torch.no_grad():
        hooked = model.traverse(2, model.encode_features(x), hook=means_through_flows)
        plain = model(x, use_mean=True)
        default = model.traverse(2, model.encode_features(x), hook=lambda view: None, use_mean=True)
    assert [v.index for v in views] == list(range(model.num_groups))
    assert [v.shape for v in views] == [model.topology.latent_shape(g, 2) for g in model.topology.groups]
    # the same z in both: exactly the same decoder input, so the same likelihood parameters
    torch.testing.assert_close(hooked.likelihood.mean(), plain.likelihood.mean(), rtol=0, atol=0)
    torch.testing.assert_close(default.kl, plain.kl, rtol=0, atol=0)  # None: the default posterior choice
    assert not torch.equal(views[0].flows(views[0].posterior.mu), views[0].posterior.mu)  # the flow acts


def test_traverse_prior_in_the_view_is_conditional_on_the_latents_chosen_above(fitted: NVAE) -> None:
    priors: dict[float, list] = {}
    for scale in (0.0, 3.0):
        seen = []

        def top_fixed(view, scale=scale, seen=seen):
            seen.append(view.prior)
            assert view.posterior is None  # decoding: no posterior
            return torch.full(view.shape, scale) if view.index == 0 else view.prior.mu

        with torch.no_grad():
            fitted.traverse(1, None, hook=top_fixed)
        priors[scale] = seen
    torch.testing.assert_close(priors[0.0][0].mu, priors[3.0][0].mu)  # the top prior is fixed
    assert not torch.allclose(priors[0.0][1].mu, priors[3.0][1].mu)  # group 1's prior follows group 0's z
    with pytest.raises(ValueError, match="latent of group 1 has shape"):
        fitted.traverse(1, None, hook=lambda view: torch.zeros(1, 1, 1, 1) if view.index == 1 else None)
