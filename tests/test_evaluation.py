"""Sampling, BN readjustment, importance-weighted NLL and the sample/evaluate command lines."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fit_on_batch
from nvae.checkpoint import load_checkpoint
from nvae.cli.evaluate import main as evaluate_main
from nvae.metrics.likelihood import NLLResult, importance_weighted, per_image_nll
from nvae.model import NVAE
from nvae.cli.sample import main as sample_main
from nvae.sampling import batchnorm_state, readjust_batchnorm, sample_images


@pytest.fixture(scope="module")
def trained_binary() -> NVAE:
    """A tiny binary model fitted for 60 steps to a fixed batch of structured images."""
    from conftest import tiny_config
    from nvae.spec import ImageSpec

    torch.manual_seed(0)
    model = NVAE(ImageSpec(channels=1, size=16, num_bits=1, pad=2), tiny_config())
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(16, 1, 16, 16, generator=g) < torch.linspace(0.1, 0.9, 16).view(1, 1, 1, 16)).float()
    fit_on_batch(model, x, steps=60, lr=1e-2)
    model.eval()
    model.fixed_batch = x  # type: ignore[attr-defined]
    return model


def test_iw_bound_is_above_elbo_and_tightens_with_k(trained_binary: NVAE) -> None:
    x = trained_binary.fixed_batch  # type: ignore[attr-defined]
    torch.manual_seed(0)
    ll = {k: importance_weighted(trained_binary, x, k, max_rows=64) for k in (1, 10, 100)}
    elbo = ll[100][1].mean()
    iw1, iw10, iw100 = (ll[k][0].mean() for k in (1, 10, 100))
    assert iw100 >= iw10 >= iw1 - 0.5  # K=1 is a one-sample ELBO: noisy, equal in expectation
    assert iw100 > elbo
    assert abs(iw1 - elbo) < 0.1 * abs(elbo)


def test_iw_chunking_does_not_change_the_estimate(trained_binary: NVAE) -> None:
    x = trained_binary.fixed_batch[:4]  # type: ignore[attr-defined]
    torch.manual_seed(3)
    a = importance_weighted(trained_binary, x, 12, max_rows=48)  # one chunk of 12 samples
    torch.manual_seed(3)
    b = importance_weighted(trained_binary, x, 12, max_rows=4)  # twelve chunks of 1: other draws
    torch.testing.assert_close(a[0], b[0], rtol=0.05, atol=2.0)


def test_evaluate_nll_counts_images_and_converts_units(trained_binary: NVAE) -> None:
    x = trained_binary.fixed_batch  # type: ignore[attr-defined]
    rows = per_image_nll(trained_binary, x, range(7), num_samples=4, max_rows=500, seed=0, device="cpu",
                         progress=False)
    res = NLLResult.from_rows(rows, trained_binary.spec.num_dims, 4)
    assert res.num_images == 7 and res.K == 4
    assert res.bpd == pytest.approx(res.nll_nats / (trained_binary.spec.num_dims * np.log(2)))
    assert res.nll_nats <= res.nelbo_nats + 1.0


def test_sampling_is_seeded_and_temperature_zero_is_the_mean_path(tiny_rgb: NVAE) -> None:
    tiny_rgb.eval()
    a = sample_images(tiny_rgb, 6, 1.0, batch_size=4, seed=1, progress=False)
    b = sample_images(tiny_rgb, 6, 1.0, batch_size=4, seed=1, progress=False)
    c = sample_images(tiny_rgb, 6, 1.0, batch_size=4, seed=2, progress=False)
    assert a.dtype == torch.uint8 and a.shape == (6, 3, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    z1 = sample_images(tiny_rgb, 3, 0.0, seed=1, progress=False)
    z2 = sample_images(tiny_rgb, 3, 0.0, seed=2, progress=False)
    assert torch.equal(z1, z2)  # no randomness left at t = 0 (likelihood mean of the prior means)


def test_padding_is_cropped_from_samples(tiny_binary: NVAE) -> None:
    tiny_binary.eval()
    assert sample_images(tiny_binary, 2, progress=False).shape == (2, 1, 12, 12)


@pytest.mark.parametrize("start_training", [False, True])
def test_bn_readjustment_changes_statistics_restores_mode_and_caches(
        tiny_rgb: NVAE, start_training: bool, tmp_path: Path) -> None:
    tiny_rgb.train(start_training)
    before = batchnorm_state(tiny_rgb)
    cache = tmp_path / "bn.pt"
    assert readjust_batchnorm(tiny_rgb, 0.7, steps=3, batch_size=4, cache=cache, progress=False) is False
    after = batchnorm_state(tiny_rgb)
    assert tiny_rgb.training == start_training
    decoder = [k for k in before if k.startswith(("dec_groups", "dec_up", "postprocess"))]
    encoder = [k for k in before if k.startswith(("preprocess", "enc_"))]
    assert all(not torch.equal(before[k], after[k]) for k in decoder if "running_mean" in k)
    assert all(after[k] == before[k] + 3 for k in decoder if "num_batches" in k)
    assert all(torch.equal(before[k], after[k]) for k in encoder)  # sampling never runs the encoder
    # a second call loads the cache instead of sampling
    from nvae.sampling import load_batchnorm_state
    load_batchnorm_state(tiny_rgb, before)
    assert readjust_batchnorm(tiny_rgb, 0.7, steps=3, batch_size=4, cache=cache, progress=False) is True
    cached = batchnorm_state(tiny_rgb)
    assert all(torch.equal(cached[k], after[k]) for k in after)


def last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def test_sample_cli_png_npz_pngs(quickstart_checkpoint: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    ck = str(quickstart_checkpoint)
    sample_main(["--checkpoint", ck, "--num-samples", "5", "--temperature", "1.0", "0.5", "--output",
                 str(tmp_path / "g.png"), "--readjust-bn", "2", "--bn-batch-size", "3", "--batch-size", "4", "--quiet"])
    out = last_json(capsys)
    assert [o["temperature"] for o in out["outputs"]] == [1.0, 0.5] and out["weights"] == "raw"
    caches = [p.name for p in (quickstart_checkpoint.parent / "bn_cache").glob("*.pt")]
    assert any(n.endswith("-t0.5-s2-b3.pt") for n in caches)  # readjusted with 3 samples per pass
    assert all(Path(o["path"]).exists() for o in out["outputs"])
    sample_main(["--checkpoint", ck, "--num-samples", "7", "--format", "npz", "--output",
                 str(tmp_path / "s.npz"), "--seed", "3", "--quiet"])
    first = np.load(tmp_path / "s.npz")["images"]
    assert first.shape == (7, 1, 28, 28) and first.dtype == np.uint8
    sample_main(["--checkpoint", ck, "--num-samples", "3", "--format", "pngs", "--output",
                 str(tmp_path / "pngs"), "--quiet"])
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 3


def test_sample_cli_same_seed_same_file(quickstart_checkpoint: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        sample_main(["--checkpoint", str(quickstart_checkpoint), "--num-samples", "6", "--format", "npz",
                     "--output", str(tmp_path / f"{name}.npz"), "--seed", "5", "--quiet"])
    assert np.array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"])


def test_evaluate_nll_and_recon_cli(quickstart_checkpoint: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    ck = str(quickstart_checkpoint)
    res = evaluate_main(["nll", "--checkpoint", ck, "-K", "3", "--num-images", "6", "--batch-size", "6", "--quiet"])
    assert res["num_images"] == 6 and res["K"] == 3 and res["nll_nats"] > 0
    assert last_json(capsys)["nll_nats"] == res["nll_nats"]
    res = evaluate_main(["recon", "--checkpoint", ck, "--num-images", "4", "--output", str(tmp_path / "r.png")])
    assert res["num_images"] == 4 and len(res["nelbo_nats"]) == 4 and (tmp_path / "r.png").exists()


def test_clis_fail_with_one_line_on_bad_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    for argv, runner in ((["--checkpoint", str(tmp_path / "missing.ckpt")], sample_main),
                         (["--checkpoint", str(bad)], sample_main),
                         (["nll", "--checkpoint", str(bad)], evaluate_main)):
        with pytest.raises(SystemExit) as err:
            runner(argv)
        message = str(err.value)
        assert "\n" not in message and ("does not exist" in message or "not a readable checkpoint" in message)


def test_checkpoint_records_the_data_module(quickstart_checkpoint: Path) -> None:
    loaded = load_checkpoint(quickstart_checkpoint)
    assert loaded.data["class_path"] == "nvae.data.bundled.BundledMNISTDataModule"
    assert loaded.data["init_args"]["num_test"] == 500
    assert not loaded.model.training


class TinyFeatures(torch.nn.Module):
    """A fixed random conv net standing in for Inception (no weights can be downloaded here)."""

    extractor_id = "tiny-test-net"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().expand(-1, 3, -1, -1) / 255.0
        return self.net(x).flatten(1)


def test_fid_cli_samples_scores_and_caches_reference(quickstart_checkpoint: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import nvae.metrics.fid as fid

    calls = []
    monkeypatch.setattr(fid, "inception_extractor", lambda *a, **k: calls.append(1) or TinyFeatures())
    common = ["fid", "--checkpoint", str(quickstart_checkpoint), "--num-samples", "40", "--num-reference", "60",
              "--batch-size", "20", "--stats-cache", str(tmp_path / "stats"), "--quiet"]
    res = evaluate_main([*common, "--temperature", "0.8", "--readjust-bn", "2"])
    assert res["num_generated"] == 40 and res["num_reference"] == 60 and res["temperature"] == 0.8
    assert res["fid"] > 0 and res["bn_readjust"].startswith("2 steps")
    cached = list((tmp_path / "stats").glob("*.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    # generated images from a file, the same cached reference statistics
    np.savez(tmp_path / "gen.npz", images=sample_images(load_checkpoint(quickstart_checkpoint).model, 40,
                                                        progress=False).numpy())
    again = evaluate_main([*common, "--images", str(tmp_path / "gen.npz")])
    assert again["num_generated"] == 40 and cached[0].stat().st_mtime_ns == stamp
    # a set scored against itself is ~0
    same = evaluate_main(["fid", "--images", str(tmp_path / "gen.npz"), "--reference", str(tmp_path / "gen.npz"),
                          "--quiet"])
    assert abs(same["fid"]) < 1e-6


def test_fid_official_protocol_samples_at_t1_unrounded_after_bn_at_the_asked_t(
        quickstart_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nvae.cli.fid as fid_cli
    import nvae.metrics.fid as fid

    monkeypatch.setattr(fid, "inception_extractor", lambda *a, **k: TinyFeatures())
    monkeypatch.setattr(fid_cli, "OFFICIAL_BN_STEPS", 3)  # 500 passes in the real protocol
    seen = {}

    def spy_readjust(model, temperature, steps, batch_size, cache, progress):  # noqa: ANN001, ANN202
        seen["bn"] = (temperature, steps, batch_size)
        return False

    real_generate = fid_cli.generate

    def spy_generate(model, num, temperature, *rest, mean, quantize, progress):  # noqa: ANN001, ANN002, ANN202
        seen["sample"] = (temperature, mean, quantize)
        return real_generate(model, num, temperature, *rest, mean=mean, quantize=quantize, progress=progress)

    monkeypatch.setattr(fid_cli, "readjust_batchnorm", spy_readjust)
    monkeypatch.setattr(fid_cli, "generate", spy_generate)
    res = evaluate_main(["fid", "--checkpoint", str(quickstart_checkpoint), "--protocol", "official", "--temperature",
                         "0.7", "--num-samples", "20", "--num-reference", "30", "--batch-size", "10", "--stats-cache",
                         str(tmp_path / "stats"), "--quiet"])
    assert seen == {"bn": (0.7, 3, 2), "sample": (1.0, True, False)}
    assert res["protocol"] == "official" and res["sample_temperature"] == 1.0 and res["temperature"] == 0.7
    ours = evaluate_main(["fid", "--checkpoint", str(quickstart_checkpoint), "--num-samples", "20", "--num-reference",
                          "30", "--batch-size", "10", "--stats-cache", str(tmp_path / "stats"), "--quiet"])
    assert ours["protocol"] == "nvae" and ours["sample_temperature"] == 1.0


def test_fid_cli_without_weights_says_how_to_get_them(quickstart_checkpoint: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as err:
        evaluate_main(["fid", "--checkpoint", str(quickstart_checkpoint), "--quiet"])
    assert "--inception-weights" in str(err.value)
