"""`nvae-restore` as a user runs it: real digits as PNG files, files written, scores, processes,
converted official checkpoints, one-line errors."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from hostile_helpers import one_line
from nvae.checkpoint import build_datamodule, load_checkpoint
from nvae.cli.restore import main
from nvae.convert import convert
from nvae.restore.scores import psnr

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures" / "official"


@pytest.fixture(scope="module")
def digits(quickstart_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 5 test digits of the bundled MNIST, as 28 x 28 PNG files (the model's 32 less its padding)."""
    loaded = load_checkpoint(quickstart_checkpoint)
    dm = build_datamodule(loaded.data, num_workers=0)
    dm.setup("test")
    folder = tmp_path_factory.mktemp("digits")
    for i in range(5):
        x = dm.test_set[i]
        x = x[0] if isinstance(x, (list, tuple)) else x
        Image.fromarray((x[0, 2:-2, 2:-2] * 255).round().byte().numpy()).save(folder / f"{i:03d}.png")
    return folder


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_restore_writes_grid_images_scores_and_one_json_line(quickstart_checkpoint: Path, digits: Path,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    result = main(["--checkpoint", str(quickstart_checkpoint), "--images", str(digits), "--operator", "sr:2",
                   "--iterations", "3", "--output", str(out), "--quiet", "--batch-size", "2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    rows = _rows(out / "scores.csv")
    assert [r["image"] for r in rows] == ["0", "1", "2", "3", "4"] and result["num_images"] == 5
    assert result["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]), abs=1e-3)
    clean = torch.stack([torch.from_numpy(np.array(Image.open(digits / f"{i:03d}.png"))) for i in range(5)])
    clean = (clean >= 128).float().unsqueeze(1)  # the CLI puts the images on the model's 1-bit grid
    saved = torch.stack([torch.from_numpy(np.array(Image.open(out / r["file"]).convert("L")))  # gray PNGs
                         for r in rows]).float() / 255
    # the PNGs hold the restorations rounded to 8 bits (each pixel moved by <= 1/510): PSNR within 0.2 dB
    torch.testing.assert_close(psnr(saved.unsqueeze(1), clean), torch.tensor([float(r["psnr"]) for r in rows],
                                                                           dtype=torch.float64), rtol=0, atol=0.2)
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 30 + 2, 5 * 30 + 2)  # columns: observation, restoration, clean; 28 px + 2 padding
    again = main(["--checkpoint", str(quickstart_checkpoint), "--images", str(digits), "--operator", "sr:2",
                  "--iterations", "3", "--output", str(out), "--overwrite", "--quiet"])
    assert again["psnr"] == pytest.approx(result["psnr"], abs=1e-4)  # same seed, other batch size: same numbers
    message = one_line(lambda: main(["--checkpoint", str(quickstart_checkpoint), "--images", str(digits),
                                     "--output", str(out), "--quiet"]))
    assert "already holds" in message and "--overwrite" in message


def test_the_checkpoints_own_split_reads_the_same_digits_in_every_run(quickstart_checkpoint: Path,
                                                                       tmp_path: Path) -> None:
    """--split test: the bundled digits, dynamically binarized with a per-image seed (the same each run)."""
    base = ["--checkpoint", str(quickstart_checkpoint), "--split", "test", "--operator", "inpaint-half",
            "--iterations", "2", "--quiet", "--num-images", "3"]
    a = main(base + ["--output", str(tmp_path / "a")])
    b = main(base + ["--output", str(tmp_path / "b"), "--batch-size", "1"])
    assert a["num_images"] == 3 and a["psnr"] == pytest.approx(b["psnr"], abs=1e-4)
    main(base[:-1] + ["2", "--output", str(tmp_path / "a"), "--overwrite"])  # fewer images: the third one goes
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == ["000000.png", "000001.png"]


def test_observed_images_with_a_mask_file_and_their_clean_images(quickstart_checkpoint: Path, digits: Path,
                                                                 tmp_path: Path) -> None:
    mask = np.full((28, 28), 255, np.uint8)
    mask[:, 14:] = 0  # right half missing
    Image.fromarray(mask).save(tmp_path / "mask.png")
    observed = tmp_path / "observed"
    observed.mkdir()
    for f in sorted(digits.iterdir()):
        Image.fromarray(np.array(Image.open(f)) * (mask > 0)).save(observed / f.name)
    out = tmp_path / "out"
    result = main(["--checkpoint", str(quickstart_checkpoint), "--observed", str(observed), "--mask",
                   str(tmp_path / "mask.png"), "--clean", str(digits), "--iterations", "2", "--output", str(out),
                   "--quiet", "--sigma", "0.01", "--sigma-dec", "0.1", "--num-images", "3"])
    assert result["operator"] == "mask" and result["num_images"] == 3 and result["psnr"] > 0
    blind = main(["--checkpoint", str(quickstart_checkpoint), "--observed", str(observed), "--mask",
                  str(tmp_path / "mask.png"), "--iterations", "2", "--output", str(tmp_path / "blind"), "--quiet",
                  "--num-images", "2"])
    assert "psnr" not in blind and "psnr" not in _rows(tmp_path / "blind" / "scores.csv")[0]


def test_errors_are_one_line_and_name_the_problem(quickstart_checkpoint: Path, digits: Path, tmp_path: Path) -> None:
    ck = str(quickstart_checkpoint)
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(small / "a.png")
    rgb = tmp_path / "rgb.npz"
    colour = np.zeros((2, 28, 28, 3), np.uint8)
    colour[..., 0] = 255  # gray images stored as RGB (three equal channels) are accepted; colour ones are not
    np.savez(rgb, images=colour)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "mask.png")
    base = ["--checkpoint", ck, "--quiet", "--output", str(tmp_path / "o")]
    cases = {
        "are 20x20, expected 28x28": ["--images", str(small)],
        "have 3 channel(s), the model 1": ["--images", str(rgb)],
        "is 16x16, the images 28x28": ["--images", str(digits), "--mask", str(tmp_path / "mask.png")],
        "--clean goes with --observed": ["--images", str(digits), "--clean", str(digits)],
        "sampling mode": ["--images", str(digits), "--method", "adam", "--num-samples", "2"],
        "scale 3 does not divide": ["--images", str(digits), "--operator", "sr:3"],
        "unknown operator": ["--images", str(digits), "--operator", "zoom"],
        "are 28x28, expected 14x14": ["--observed", str(digits), "--operator", "sr:2"],
    }
    for expected, extra in cases.items():
        assert expected in one_line(lambda: main(base + extra)), expected
    for bad in ("0", "-0.1", "nan"):  # sigma <= 0 (or below 1e-4, where float32 steps overflow): a usage error
        proc = subprocess.run([sys.executable, str(ROOT / "restore.py"), *base, "--images", str(digits),
                               "--sigma", bad], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "--sigma: must be a number from 0.0001 to 10" in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing written by a refused run


def test_lpips_weights_are_checked_and_small_images_refused(quickstart_checkpoint: Path, digits: Path,
                                                           tmp_path: Path) -> None:
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    base = ["--checkpoint", str(quickstart_checkpoint), "--images", str(digits), "--quiet",
            "--output", str(tmp_path / "o")]
    assert "needs images of at least 31 pixels" in one_line(lambda: main(base + ["--lpips-weights", "any.pth"]))
    assert "is not torchvision's vgg weights" in one_line(
        lambda: main(base + ["--lpips-weights", str(tmp_path / "bad.pth"), "--lpips-net", "vgg"]))


@pytest.mark.skipif(not FIXTURES.is_dir() and not os.environ.get("CI"), reason="no official fixtures")
def test_restore_with_a_converted_official_checkpoint_directory_and_lpips(tmp_path: Path) -> None:
    weights = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)  # random: no download here
    model_dir = convert(FIXTURES / "cifar10_tiny" / "checkpoint_released.pt", tmp_path / "released")["checkpoint"]
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=images)
    result = main(["--checkpoint", model_dir, "--images", str(tmp_path / "images.npz"), "--operator", "blur:5,1.0",
                   "--iterations", "2", "--output", str(tmp_path / "o"), "--quiet", "--temperature", "0.9:0.7",
                   "--lpips-weights", str(weights)])
    assert result["num_images"] == 2 and result["temperature"] == [0.9, 0.7]
    assert result["lpips"] > 0 and all(float(r["lpips"]) > 0 for r in _rows(tmp_path / "o" / "scores.csv"))
    assert Image.open(tmp_path / "o" / "images" / "000001.png").size == (32, 32)


def test_two_processes_give_the_same_per_image_numbers(quickstart_checkpoint: Path, digits: Path,
                                                       tmp_path: Path) -> None:
    """5 images over 2 CPU processes in sampling mode (the draws seeded per image and sample)."""
    def run(name: str, *extra: str) -> list[dict]:
        cmd = [sys.executable, str(ROOT / "restore.py"), "--checkpoint", str(quickstart_checkpoint), "--images",
               str(digits), "--operator", "inpaint-half", "--num-samples", "2", "--iterations", "3", "--device", "cpu",
               "--quiet", "--output", str(tmp_path / name), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count('"psnr"') == 1  # rank 0 alone reports
        return _rows(tmp_path / name / "scores.csv")

    one, two = run("one"), run("two", "--devices", "2", "--strategy", "ddp")
    assert [(r["image"], r["sample"], r["file"]) for r in two] == [(r["image"], r["sample"], r["file"]) for r in one]
    for a, b in zip(one, two):  # the same seeds; float32 convolutions may sum in another order in another batch
        assert float(a["psnr"]) == pytest.approx(float(b["psnr"]), abs=1e-3)
        assert a["iterations"] == b["iterations"]
    assert one[0]["psnr"] != one[1]["psnr"]  # the two samples of image 0 differ
