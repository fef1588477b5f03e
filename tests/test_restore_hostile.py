"""`nvae-restore` given files and settings from others: links, pipes, 16-bit images, odd masks,
pickles as weights, settings that would overflow; each refused in one line or read correctly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from hostile_helpers import one_line, special_file
from nvae.checkpoint import load_checkpoint
from nvae.cli.restore import main
from nvae.cli.restore_io import SplitImages, clean_images, read_mask
from nvae.restore.operators import Mask
from nvae.restore.run import observe
from test_hostile_files import Payload

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    folder = tmp_path / "digits"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((28, 28)) > 0.7).astype(np.uint8) * 255).save(folder / f"{i}.png")
    return folder


def test_a_linked_images_folder_is_refused_and_its_target_untouched(quickstart_checkpoint: Path, digits: Path,
                                                                    tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    for i in range(4):
        (victim / f"{i:06d}.png").write_bytes(b"theirs")
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").symlink_to(victim)
    message = one_line(lambda: main(["--checkpoint", str(quickstart_checkpoint), "--images", str(digits),
                                     "--iterations", "1", "--output", str(out), "--overwrite", "--quiet"]))
    assert "not written by nvae-restore" in message and "images" in message
    assert sorted(p.read_bytes() for p in victim.iterdir()) == [b"theirs"] * 4


def test_a_named_pipe_among_the_images_is_refused_without_blocking(quickstart_checkpoint: Path, digits: Path,
                                                                   tmp_path: Path) -> None:
    special_file(digits / "2.png", "named pipe")
    special_file(tmp_path / "weights.pth", "named pipe")
    lpips = ["--split", "test", "--lpips-net", "vgg", "--lpips-weights", str(tmp_path / "weights.pth")]
    for extra in (["--images", str(digits)], lpips):
        proc = subprocess.run([sys.executable, str(ROOT / "restore.py"), "--checkpoint", str(quickstart_checkpoint),
                               *extra, "--output", str(tmp_path / "o"), "--quiet"],
                              capture_output=True, text=True, timeout=120)  # a read of the pipe would block forever
        assert proc.returncode == 1 and "not a regular file" in proc.stderr and proc.stderr.count("\n") == 1


def test_16_bit_gray_images_are_scaled_not_clipped(quickstart_checkpoint: Path, tmp_path: Path) -> None:
    model = load_checkpoint(quickstart_checkpoint).model
    levels = np.linspace(0, 65535, 28 * 28).reshape(28, 28).astype(np.uint16)
    for name, array in (("8", (levels // 257).astype(np.uint8)), ("16", levels)):
        (tmp_path / name).mkdir()
        Image.fromarray(array).save(tmp_path / name / "a.png")
    eight, sixteen = (clean_images(str(tmp_path / n), "--images", model, None) for n in ("8", "16"))
    assert 0.4 < sixteen.mean() < 0.6  # half the ramp is above 0.5 (clipping at 255 made it all white)
    assert (eight != sixteen).float().mean() < 0.01  # the same picture up to rounding at the threshold


def test_masks_are_read_at_their_own_depth_and_must_hide_and_keep_something(tmp_path: Path) -> None:
    half = np.zeros((28, 28), np.uint16)
    half[:, :14] = 1  # a 16-bit 0/1 mask: 1 is observed, though it rounds to 0 at 8 bits
    Image.fromarray(half).save(tmp_path / "m16.png")
    red = np.zeros((28, 28, 3), np.uint8)
    red[:, :14, 0] = 1  # a barely red pixel is not black: observed
    Image.fromarray(red).save(tmp_path / "red.png")
    for name in ("m16.png", "red.png"):
        mask = read_mask(str(tmp_path / name), (1, 28, 28))
        assert mask.mask[0, :, :14].all() and not mask.mask[0, :, 14:].any()
    for array, what in ((np.zeros((28, 28), np.uint8), "no observed pixel"),
                        (np.full((28, 28), 255, np.uint8), "no missing pixel")):
        Image.fromarray(array).save(tmp_path / "m.png")
        assert what in one_line(lambda: read_mask(str(tmp_path / "m.png"), (1, 28, 28)))


def test_split_images_and_observation_noise_are_drawn_from_different_streams(quickstart_checkpoint: Path) -> None:
    """Dynamic binarization and the observation noise of image i once shared a seed: the noise was larger on
    the pixels the binarization had set (by 0.1 sigma). Now their difference is only the sampling error."""
    loaded = load_checkpoint(quickstart_checkpoint)
    clean = SplitImages(loaded.data, "test", loaded.model, 100, seed=0)[list(range(100))]
    noise = observe(Mask(torch.ones(1, 28, 28)), clean, 1.0, range(100), 0) - clean
    on, off = noise[clean == 1], noise[clean == 0]
    # standard error of the difference of means: sqrt(1/n_on + 1/n_off) ~ 0.011 for ~10,000 set pixels
    bound = 4 * (1 / on.numel() + 1 / off.numel()) ** 0.5
    assert abs(on.mean() - off.mean()) < bound


def test_lpips_weights_must_be_finite_floating_tensors_and_are_never_unpickled(quickstart_checkpoint: Path,
                                                                               tmp_path: Path) -> None:
    # LPIPS reads only the backbone's convolutions: leaving out the classifier keeps each file ~10 MB, not ~230 MB.
    state = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    marker = tmp_path / "MARKER"
    files = {"int.pth": {k: v.long() for k, v in state.items()},
             "nan.pth": {k: v * float("nan") for k, v in state.items()},
             "pickle.pth": {**state, "features.0.weight": Payload(marker)}}
    expected = {"int.pth": "no floating-point", "nan.pth": "not finite", "pickle.pth": "objects other than tensors"}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        message = one_line(lambda: main(["--checkpoint", str(quickstart_checkpoint), "--split", "test", "--quiet",
                                         "--lpips-weights", str(tmp_path / name), "--output", str(tmp_path / "o")]))
        assert "needs images of at least 31" in message  # the digits are refused before any file is read
    from nvae.restore.scores import load_lpips

    for name, what in expected.items():
        assert what in one_line(lambda: load_lpips(tmp_path / name, "alex", 32)), name
    assert not marker.exists()


def test_settings_that_would_overflow_or_hide_nothing_are_refused(quickstart_checkpoint: Path, digits: Path,
                                                                  tmp_path: Path) -> None:
    base = ["--checkpoint", str(quickstart_checkpoint), "--images", str(digits), "--quiet",
            "--output", str(tmp_path / "o")]
    for extra, what in ((["--operator", "blur:99999,1"], "larger than 2 x 28 + 1"),
                        (["--operator", "inpaint-box:0.99"], "hides every pixel"),
                        (["--operator", "inpaint-random:0.0001"], "must hide some and keep some"),
                        (["--mask", str(digits / "0.png"), "--operator", "sr:2"], "--mask is the operator"),
                        (["--lpips-weights", "w.pth", "--method", "degraded"], "at least 31")):
        assert what in one_line(lambda: main(base + extra)), extra
    for option, value in (("--temperature", "1e300"), ("--sigma-dec", "1e-300"), ("--sigma", "1e-20"),
                          ("--lr", "1e300"), ("--tol", "nan"), ("--beta", "0")):
        proc = subprocess.run([sys.executable, str(ROOT / "restore.py"), *base, option, value],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and f"argument {option}: must be" in proc.stderr, (option, proc.stderr)
    assert not (tmp_path / "o").exists()
