"""BatchNorm readjustment and its cache: ``--seed`` fixes the readjusted statistics (so the images),
the cache key follows the weights file itself (not a model directory's folder, not the stem, not the mtime
alone) and which weights were loaded; ``--encode`` writes the same bytes for the same latents."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_images
from nvae.checkpoint import load_checkpoint
from nvae.cli.evaluate import main as evaluate_main
from nvae.cli.sample import main as sample_main
from nvae.sampling import batchnorm_state, bn_cache_path, bn_seed, image_seed, load_batchnorm_state, readjust_batchnorm
from nvae.spec import ImageSpec
from test_evaluation import TinyFeatures
from test_hostile_outputs import image_npz

BN = ["--readjust-bn", "2", "--bn-batch-size", "2", "--quiet"]


@pytest.fixture
def own_checkpoint(quickstart_checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the quickstart checkpoint whose bn_cache folder is this test's."""
    (tmp_path / "run").mkdir()
    return Path(shutil.copy2(quickstart_checkpoint, tmp_path / "run" / "last.ckpt"))


@pytest.fixture
def model_dir(own_checkpoint: Path, tmp_path: Path) -> Path:
    from nvae.cli import export as export_cli

    export_cli.main([str(own_checkpoint), str(tmp_path / "dir")])
    return tmp_path / "dir"


def only_cache(folder: Path) -> Path:
    caches = list((folder / "bn_cache").glob("*.pt"))
    assert len(caches) == 1, caches
    return caches[0]


def cached_state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(only_cache(folder), weights_only=True)


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ 1. the seed
def test_the_seed_fixes_the_images_when_bn_readjustment_is_computed(own_checkpoint: Path, tmp_path: Path) -> None:
    run = own_checkpoint.parent
    argv = ["--checkpoint", str(own_checkpoint), "--seed", "3", "--num-samples", "4", "--format", "npz", *BN]
    arrays, states = [], []
    for name in ("a.npz", "b.npz"):
        torch.manual_seed(len(arrays) + 100)  # whatever the RNG's state before the run
        out = sample_main([*argv, "--output", str(tmp_path / name)])
        assert out["outputs"][0]["bn_readjust"] == "2 steps (computed)"
        arrays.append(np.load(tmp_path / name)["images"])
        states.append(cached_state(run))
        shutil.rmtree(run / "bn_cache")
    assert same_state(*states)
    np.testing.assert_array_equal(*arrays)
    sample_main([*argv[:3], "4", *argv[4:], "--output", str(tmp_path / "c.npz")])  # --seed 4
    assert not same_state(states[0], cached_state(run))  # another seed: other draws, another cache file
    assert "seed4" in only_cache(run).name


def test_readjust_batchnorm_seed_is_one_stream_apart_from_the_sampling_batches(quickstart_checkpoint: Path) -> None:
    model = load_checkpoint(quickstart_checkpoint).model
    trained = batchnorm_state(model)
    assert bn_seed(3) == image_seed(3, -1) and bn_seed(3) not in {image_seed(3, b) for b in range(1000)}

    def readjusted(**kwargs: int) -> dict[str, torch.Tensor]:
        load_batchnorm_state(model, trained)
        readjust_batchnorm(model, 1.0, steps=2, batch_size=2, progress=False, **kwargs)
        return batchnorm_state(model)

    torch.manual_seed(11)
    rng = torch.get_rng_state()
    first = readjusted(seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left as it was
    torch.manual_seed(12)
    assert same_state(first, readjusted(seed=3))
    assert not same_state(first, readjusted(seed=4))
    torch.manual_seed(bn_seed(3))  # what evaluate.py fid does before it readjusts: the same statistics
    assert same_state(first, readjusted())


def test_fid_readjusts_from_the_seed_as_sample_does(own_checkpoint: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import nvae.metrics.fid as fid

    monkeypatch.setattr(fid, "inception_extractor", lambda *a, **k: TinyFeatures())
    run = own_checkpoint.parent
    ref = image_npz(tmp_path / "ref.npz", 4, 1)
    fid_argv = ["fid", "--checkpoint", str(own_checkpoint), "--seed", "3", "--num-samples", "4", "--batch-size", "2",
                "--reference", str(ref), *BN]
    results = []
    for _ in range(2):
        results.append(evaluate_main(fid_argv))
        assert results[-1]["bn_readjust"].endswith("(computed)")
        state = cached_state(run)
        shutil.rmtree(run / "bn_cache")
    assert results[0]["fid"] == results[1]["fid"]
    sample_main(["--checkpoint", str(own_checkpoint), "--seed", "3", "--num-samples", "2", "--output",
                 str(tmp_path / "s.png"), *BN])
    assert same_state(state, cached_state(run))  # sample.py and fid share the cache: the same statistics


# ------------------------------------------------------------------------------------------ 2. the key
def test_the_cache_key_follows_the_weights_file_of_a_model_directory(model_dir: Path, tmp_path: Path) -> None:
    key = bn_cache_path(model_dir, 1.0, 2, 2)
    assert key.parent == tmp_path / "bn_cache" and key.name.startswith("dir-raw-")
    spare = tmp_path / "spare.safetensors"
    shutil.copyfile(model_dir / "model.safetensors", spare)
    shutil.copyfile(spare, model_dir / "model.safetensors")  # cp other/model.safetensors dir/: the folder unchanged
    assert bn_cache_path(model_dir, 1.0, 2, 2) != key
    argv = ["--checkpoint", str(model_dir), "--num-samples", "2", *BN]
    first = sample_main([*argv, "--output", str(tmp_path / "a.png")])
    assert first["outputs"][0]["bn_readjust"] == "2 steps (computed)"
    assert sample_main([*argv, "--output", str(tmp_path / "b.png")])["outputs"][0]["bn_readjust"].endswith("(cached)")
    os.replace(spare, model_dir / "model.safetensors")  # other weights moved in (another inode)
    again = sample_main([*argv, "--output", str(tmp_path / "c.png")])
    assert again["outputs"][0]["bn_readjust"] == "2 steps (computed)"


def test_the_cache_key_tells_apart_names_copies_and_weights(own_checkpoint: Path) -> None:
    run = own_checkpoint.parent
    v1, v2 = (Path(shutil.copy2(own_checkpoint, run / name)) for name in ("m.v1", "m.v2"))  # one stem, size, mtime
    assert bn_cache_path(v1, 1.0, 2, 2) != bn_cache_path(v2, 1.0, 2, 2)
    assert bn_cache_path(v1, 1.0, 2, 2).name.startswith("m.v1-")
    key = bn_cache_path(v1, 1.0, 2, 2)
    shutil.copy2(v2, run / "tmp")
    os.replace(run / "tmp", v1)  # cp -a m.v2 m.v1: same size and mtime, another file
    assert v1.stat().st_mtime_ns == v2.stat().st_mtime_ns and bn_cache_path(v1, 1.0, 2, 2) != key
    assert bn_cache_path(v1, 1.0, 2, 2, weights="ema") != bn_cache_path(v1, 1.0, 2, 2, weights="raw")
    assert bn_cache_path(v1, 1.0, 2, 2, seed=1) != bn_cache_path(v1, 1.0, 2, 2, seed=0)
    assert bn_cache_path(v1, 1.0, 2, 2).parent == run / "bn_cache"


# ------------------------------------------------------------------------------------------ 3. --encode
def test_encode_writes_the_same_bytes_twice(quickstart_checkpoint: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, img in enumerate(random_images(ImageSpec(channels=1, size=28, num_bits=8), n=2)):
        Image.fromarray((img[0] * 255).byte().numpy()).save(images / f"{i}.png")
    outputs = [tmp_path / "a" / "latents.pt", tmp_path / "b" / "latents.pt"]
    for out in outputs:
        sample_main(["--checkpoint", str(quickstart_checkpoint), "--encode", str(images), "--output", str(out)])
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "a").iterdir())
