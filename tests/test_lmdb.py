"""The official code's LMDB folders, built here in its format: key str(index), value raw
square RGB bytes (ImageNet-32 of Oord et al.) or an encoded PNG (CelebA-HQ)."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from nvae.data import ImageNet32DataModule, LMDBDataModule
from nvae.data.base import DataError
from nvae.data.lmdb import LMDBImages, decode_image, lmdb_transform

lmdb = pytest.importorskip("lmdb")


def write_lmdb(path: Path, values: list[bytes]) -> None:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(str(i).encode(), value)
    env.close()


def raw_images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_raw_rgb_values_read_back_exactly(tmp_path: Path) -> None:
    train, valid = raw_images(6, 32, 0), raw_images(3, 32, 1)
    write_lmdb(tmp_path / "train.lmdb", [im.tobytes() for im in train])
    write_lmdb(tmp_path / "validation.lmdb", [im.tobytes() for im in valid])
    dm = LMDBDataModule(str(tmp_path), image_size=32, batch_size=2, random_flip=False)
    dm.setup()
    assert len(dm.train_set) == 6 and len(dm.test_set) == 3
    x = next(iter(dm.test_dataloader()))
    assert x.shape == (2, 3, 32, 32)
    torch.testing.assert_close(x, torch.from_numpy(valid[:2]).permute(0, 3, 1, 2).float() / 255)  # 8 bits, no resize
    # ImageNet 32 reads the same folders as Oord et al.'s version
    inet = ImageNet32DataModule(str(tmp_path), batch_size=3, random_flip=False)
    inet.setup()
    torch.testing.assert_close(next(iter(inet.test_dataloader())), torch.from_numpy(valid).permute(0, 3, 1, 2) / 255)


def test_encoded_png_values_are_decoded_cropped_and_resized(tmp_path: Path) -> None:
    images = raw_images(4, 64, 2)
    for name in ("train.lmdb", "validation.lmdb"):
        write_lmdb(tmp_path / name, [png(im) for im in images])
    dm = LMDBDataModule(str(tmp_path), image_size=32, num_bits=5, batch_size=4)
    dm.setup()
    x = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and torch.equal(x * 31, torch.round(x * 31))
    assert decode_image(png(images[0]), "test").size == (64, 64)
    celeba = lmdb_transform(64, 8, train=False, random_flip=False, crop="celeba64")
    assert celeba(Image.fromarray(raw_images(1, 178, 3)[0][:, :, :].repeat(2, axis=0)[:218])).shape == (3, 64, 64)


def test_bad_entries_and_folders_are_named(tmp_path: Path) -> None:
    write_lmdb(tmp_path / "train.lmdb", [b"\x00" * 10, raw_images(1, 4, 0)[0].tobytes()])
    ds = LMDBImages(str(tmp_path / "train.lmdb"), T.Lambda(np.asarray))
    with pytest.raises(DataError, match="key '0'.* 10 bytes are neither"):
        ds[0]
    assert ds[1].shape == (4, 4, 3)
    with pytest.raises(DataError, match="has no key '5'"):
        ds[5]
    again = pickle.loads(pickle.dumps(ds))  # what a loader worker receives: the database reopens there
    assert again[1].shape == (4, 4, 3)
    with pytest.raises(FileNotFoundError, match="official LMDB folders"):
        LMDBDataModule(str(tmp_path / "nowhere"), image_size=32).setup()
