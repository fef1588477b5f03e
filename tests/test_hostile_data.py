"""Image folders from others: decompression bombs, truncated and 16-bit PNGs, symlink loops,
named pipes, and fewer images than a batch each give one line naming the file or the numbers, or the
right images."""
from __future__ import annotations

import os
import signal
import socket
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Optional

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from nvae.cli.train import main as train_main
from nvae.data import ImageFolderDataModule
from nvae.data.base import DataError, ImageDataModule
from nvae.data.files import MAX_IMAGE_PIXELS, list_images, read_image, to_8_bit
from nvae.data.folder import ImageFiles, folder_transform
from nvae.spec import ImageSpec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# ------------------------------------------------------------------------------------------ helpers
def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def write_pngs(folder: Path, n: int, size: int = 6) -> list[Path]:
    """``n`` random 8-bit RGB PNGs ``img00.png``... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"img{i:02d}.png" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return paths


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC of type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: Optional[bytes]) -> bytes:
    """A PNG file: IHDR claiming ``width`` x ``height``, then ``rows`` (filter byte 0 + samples per
    row, big-endian) compressed as IDAT; when ``rows`` is None, a file cut after 16 bytes of pixels."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    if rows is None:
        return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(16)))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def rows_16_bit(levels: np.ndarray) -> bytes:
    """PNG scanlines of a (H, W) or (H, W, C) uint16 array: filter 0, big-endian samples."""
    flat = levels.reshape(levels.shape[0], -1).astype(">u2")
    return b"".join(b"\x00" + row.tobytes() for row in flat)


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging when the block takes longer than ``seconds`` (SIGALRM)."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"took more than {seconds} s (blocked on a named pipe?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------ 1. huge headers
def test_header_over_pils_limit_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    """30000 x 30000 (900 M pixels): PIL's DecompressionBombError, no OSError, used to escape."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(30000, 30000, 8, 2, rows=None))
    with pytest.raises(DataError) as err:
        read_image(str(bomb), "RGB")
    assert one_line(err).startswith(f"cannot read image '{bomb}': Image size (900000000 pixels) exceeds limit")


def test_header_over_our_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    """12000 x 12000 (144 M pixels): PIL only warns; the header alone is refused (no pixel data to
    decode here: decoding would say 'truncated' instead)."""
    assert 12000 * 12000 > MAX_IMAGE_PIXELS
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(12000, 12000, 8, 0, rows=None))
    files = ImageFiles([str(big)], folder_transform(4, 8, False, False), "RGB")
    with pytest.raises(DataError) as err:
        files[0]
    assert one_line(err) == (f"cannot read image '{big}': its header claims 12000 x 12000 pixels (144,000,000), more "
                             f"than the 134,217,728 an image may have here (a decompression bomb?) (delete it, or set "
                             "data.skip_unreadable=true to skip such files)")


def test_huge_headers_are_skipped_with_skip_unreadable(tmp_path: Path) -> None:
    good = write_pngs(tmp_path, 1)[0]
    (tmp_path / "big.png").write_bytes(png_bytes(12000, 12000, 8, 0, rows=None))
    (tmp_path / "bomb.png").write_bytes(png_bytes(30000, 30000, 8, 2, rows=None))
    paths = [str(tmp_path / "big.png"), str(tmp_path / "bomb.png"), str(good)]
    files = ImageFiles(paths, folder_transform(6, 8, False, False), "RGB", skip_unreadable=True)
    with pytest.warns(UserWarning) as warned:
        x = files[0]
    assert [str(w.message).split("': ")[0] for w in warned] == [f"cannot read image '{p}" for p in paths[:2]]
    assert str(warned[1].message).endswith("; skipped (2 unreadable so far)")
    assert x.shape == (3, 6, 6) and files.skipped == set(paths[:2])
    expected = torch.from_numpy(np.array(Image.open(good))).permute(2, 0, 1).float() / 255
    assert torch.equal(x, expected)


# ------------------------------------------------------------------------------------------ 6. truncated
def test_truncated_png_is_a_data_error(tmp_path: Path) -> None:
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    half = tmp_path / "half.png"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        read_image(str(half), "RGB")
    assert one_line(err).startswith(f"cannot read image '{half}': ") and "truncated" in str(err.value)
    assert read_image(str(whole), "RGB").size == (64, 64)


# ------------------------------------------------------------------------------------------ 2. 16-bit
LEVELS_16 = np.array([[0, 257 * 100, 32896, 65535]], dtype=np.uint16)
"""16-bit levels k and their 8-bit levels round(k * 255 / 65535): 0, 100, 128, 255."""
EXPECTED_8 = np.array([[0, 100, 128, 255]], dtype=np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_16_bit_gray_png_keeps_its_levels(tmp_path: Path, mode: str) -> None:
    """PIL writes and reads it as 'I;16'; its own convert('L') clips: everything above 255 was white."""
    path = tmp_path / "gray16.png"
    Image.fromarray(LEVELS_16).save(path)
    assert Image.open(path).mode.startswith("I")
    img = np.asarray(read_image(str(path), mode))
    assert np.array_equal(img if mode == "L" else img[..., 0], EXPECTED_8)
    if mode == "RGB":
        assert (img == img[..., :1]).all()


def test_16_bit_gray_through_the_data_set_is_on_the_grid(tmp_path: Path) -> None:
    path = tmp_path / "gray16.png"
    Image.fromarray(np.repeat(LEVELS_16, 4, axis=0)).save(path)  # 4 x 4: the resize keeps the pixels
    x = ImageFiles([str(path)], folder_transform(4, 8, False, False), "L")[0]
    assert torch.equal(x[0, 0], torch.tensor([0, 100, 128, 255]) / 255.0)


def test_16_bit_rgb_png_keeps_its_levels(tmp_path: Path) -> None:
    """PIL cannot write 48-bit RGB PNGs; written by hand, PIL reads them as 8-bit 'RGB' itself."""
    path = tmp_path / "rgb16.png"
    levels = np.stack([LEVELS_16, LEVELS_16[:, ::-1], LEVELS_16], axis=-1)  # (1, 4, 3)
    path.write_bytes(png_bytes(4, 1, 16, 2, rows_16_bit(levels)))
    img = np.asarray(read_image(str(path), "RGB"))
    assert np.array_equal(img[..., 0], EXPECTED_8) and np.array_equal(img[..., 1], EXPECTED_8[:, ::-1])


@pytest.mark.parametrize("mode", ["I", "I;16B"])
def test_other_16_bit_modes_are_scaled_by_their_depth(mode: str) -> None:
    """'I' (older Pillow's 16-bit PNGs) and big-endian 'I;16B'."""
    if mode == "I":
        img = Image.fromarray(LEVELS_16.astype(np.int32))
    else:
        img = Image.frombytes("I;16B", (4, 1), LEVELS_16.astype(">u2").tobytes())
    assert img.mode == mode
    assert np.array_equal(np.asarray(to_8_bit(img)), EXPECTED_8)


# ------------------------------------------------------------------------------------------ 3. symlinks
def test_symlink_loop_and_duplicates_are_listed_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_pngs(root, 8)
    write_pngs(root / "sub", 2)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # root/sub/loop/sub/loop/...
    (root / "zz_dup.png").symlink_to(root / "img03.png")
    os.link(root / "img04.png", root / "zz_hard.png")
    outside = write_pngs(tmp_path / "elsewhere", 1)[0]
    (root / "out_a.png").symlink_to(outside)
    (root / "out_b.png").symlink_to(outside)
    files = list_images(str(root))
    assert len(files) == 11, files  # 10 + the outside file once
    assert len({os.path.realpath(f) for f in files}) == 11
    assert str(root / "img03.png") in files and str(root / "out_a.png") in files


def test_split_of_a_folder_with_a_loop_is_disjoint(tmp_path: Path) -> None:
    write_pngs(tmp_path, 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "sub" / "dup.png").symlink_to(tmp_path / "img00.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=4, batch_size=2, val_fraction=0.2)
    dm.setup()
    train, held_out = dm.train_set.files, dm.test_set.files
    assert (len(train), len(held_out)) == (8, 2)
    assert not {os.path.realpath(f) for f in train} & {os.path.realpath(f) for f in held_out}


# ------------------------------------------------------------------------------------------ 4. special files
def test_named_pipe_device_and_socket_are_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_pngs(tmp_path, 2)
    os.mkfifo(tmp_path / "x.png")
    (tmp_path / "null.png").symlink_to("/dev/null")
    monkeypatch.chdir(tmp_path)  # a short relative path: AF_UNIX paths are limited to ~100 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("s.png")
        with deadline(10), pytest.warns(UserWarning, match=r"3 name\(s\) with an image extension .* no regular file"):
            files = list_images(str(tmp_path))
        assert files == [str(tmp_path / "img00.png"), str(tmp_path / "img01.png")]
        with deadline(10), pytest.raises(DataError, match=r"x.png': not a regular file"):
            read_image(str(tmp_path / "x.png"), "RGB")  # even when handed one directly


# ------------------------------------------------------------------------------------------ 5. too few images
def test_cli_fewer_images_than_a_batch_is_one_line(tmp_path: Path) -> None:
    """3 images: 2 to train (1 held out) and batch 8 used to train 0 steps and exit 0."""
    write_pngs(tmp_path / "imgs", 3, size=32)
    with pytest.raises(SystemExit) as err:
        train_main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "debug.yaml"),
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.logger=false",
                    "--data", "nvae.data.ImageFolderDataModule", "--data.root", str(tmp_path / "imgs"),
                    "--data.image_size", "32", "--data.channels", "1", "--data.batch_size", "8"])
    assert one_line(err) == ("train.py: error: data.batch_size 8 is larger than the 2 training images: lower "
                             "data.batch_size or add images (an incomplete batch is dropped, so training would take "
                             "no step) (NVAE_DEBUG=1 shows the traceback)")


def test_fewer_images_per_process_than_a_batch(tmp_path: Path) -> None:
    """Each of 2 processes gets 12 // 2 = 6 images: batch 6 fits, batch 7 does not."""
    write_pngs(tmp_path / "train", 12)
    write_pngs(tmp_path / "val", 1)
    for batch in (6, 7):
        dm = ImageFolderDataModule(str(tmp_path), image_size=4, batch_size=batch)
        dm.trainer = SimpleNamespace(world_size=2)
        if batch == 6:
            dm.setup("fit")
            continue
        with pytest.raises(ValueError) as err:
            dm.setup("fit")
        assert one_line(err).startswith("data.batch_size 7 is larger than the 12 training images shared by 2 "
                                        "processes (6 each): lower data.batch_size or add images")


class FixedLists(ImageDataModule):
    """In-memory train / test lists (not registered: used here only)."""

    def __init__(self, num_train: int, num_test: int, batch_size: int = 2) -> None:
        super().__init__(root="mem", batch_size=batch_size)
        self.num_train, self.num_test = num_train, num_test

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(channels=1, size=4, num_bits=8)

    def build_datasets(self) -> tuple[Dataset, Optional[Dataset], Dataset]:
        return [torch.zeros(1, 4, 4)] * self.num_train, None, [torch.zeros(1, 4, 4)] * self.num_test


def test_empty_held_out_split_is_one_line() -> None:
    FixedLists(2, 1).setup("fit")
    FixedLists(2, 0).setup("test")  # evaluate.py reports an empty split itself
    with pytest.raises(ValueError) as err:
        FixedLists(2, 0).setup("fit")
    assert one_line(err) == ("the held-out (test) split of FixedLists under data.root 'mem' has no images: "
                             "add held-out images")
