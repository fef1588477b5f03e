"""Bad input stops early with one line naming the field or file, and --resume auto works."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_images, tiny_config
from nvae.cli.train import main as train_main
from nvae.data import ImageFolderDataModule
from nvae.lightning import NVAEModule
from nvae.training import TrainerChecks
from nvae.model import NVAE
from nvae.cli.sample import main as sample_main
from nvae.spec import ImageSpec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_image_size_not_divisible_by_the_downsampling() -> None:
    with pytest.raises(ValueError, match=r"image size 18 is not divisible by 4.*data.image_size") as err:
        NVAE(ImageSpec(channels=1, size=18, num_bits=1), tiny_config())
    one_line(err)


@pytest.mark.parametrize("field, value, match", [
    ("num_channels", 0, "model.arch.num_channels must be an integer >= 1, got 0"),
    ("num_latent_per_group", -2, "model.arch.num_latent_per_group must be an integer >= 1"),
    ("num_flows", -1, "model.arch.num_flows must be an integer >= 0"),
    ("num_groups_per_scale", 1.5, "model.arch.num_groups_per_scale must be an integer"),
    ("num_postprocess_blocks", 2, r"num_postprocess_blocks \(2\) must equal num_preprocess_blocks \(1\)"),
    ("min_groups_per_scale", 5, r"min_groups_per_scale \(5\) must not exceed num_groups_per_scale \(2\)"),
])
def test_bad_architecture_numbers(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        tiny_config(**{field: value})
    one_line(err)


@pytest.mark.parametrize("spec, match", [
    (dict(num_bits=0), r"num_bits must be in 1..8"), (dict(num_bits=9), r"num_bits must be in 1..8 \(1 = binary\), got 9"),
    (dict(channels=0), "channels must be >= 1"), (dict(size=8, pad=4), "pad must be >= 0"),
])
def test_bad_image_spec(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageSpec(**spec)


def test_batch_with_other_channels_than_the_model() -> None:
    module = NVAEModule(arch=tiny_config(), image_spec=ImageSpec(channels=3, size=16, num_bits=8))
    gray = random_images(ImageSpec(channels=1, size=16, num_bits=8), n=2)
    with pytest.raises(ValueError, match=r"batch of shape \(2, 1, 16, 16\) does not match model.image_spec") as err:
        module.training_step(gray, 0)
    one_line(err)


def test_cli_missing_data_root_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as err:
        train_main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "debug.yaml"),
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.logger=false",
                    "--data", "nvae.data.ImageFolderDataModule", "--data.root", str(tmp_path / "nowhere"),
                    "--data.image_size", "32", "--data.channels", "1"])
    assert one_line(err).startswith("train.py: error: image folder not found under") and "data.root" in str(err.value)


def test_cli_bad_num_bits_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as err:
        train_main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.logger=false",
                    "--data", "nvae.data.ImageFolderDataModule", "--data.root", str(tmp_path),
                    "--data.image_size", "32", "--data.num_bits", "12"])
    assert "num_bits must be in 1..8 (1 = binary), got 12" in one_line(err)


def test_cli_lightning_misconfiguration_is_one_line(tmp_path: Path) -> None:
    """Lightning's own refusals of a trainer setting (here: a preset's ModelCheckpoint without checkpointing)."""
    with pytest.raises(SystemExit) as err:
        train_main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.logger=false",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_checkpointing=false"])
    assert one_line(err).startswith("train.py: error: Trainer was configured with `enable_checkpointing=False`")


def write_pngs(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_unreadable_images_can_be_skipped_and_are_counted(tmp_path: Path) -> None:
    write_pngs(tmp_path, 4)
    (tmp_path / "img1.png").write_bytes(b"truncated")
    dm = ImageFolderDataModule(str(tmp_path), image_size=4, batch_size=2, val_fraction=0.25, skip_unreadable=True)
    dm.setup()
    data = dm.train_set if str(tmp_path / "img1.png") in dm.train_set.files else dm.test_set
    index = data.files.index(str(tmp_path / "img1.png"))
    with pytest.warns(UserWarning, match=r"img1.png.*skipped \(1 unreadable so far\)"):
        x = data[index]
    assert x.shape == (3, 4, 4) and data.skipped == {str(tmp_path / "img1.png")}
    data[index]  # known bad: replaced silently, still counted once
    assert len(data.skipped) == 1


def test_sampling_with_negative_temperature_is_refused(quickstart_checkpoint: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(quickstart_checkpoint), "--temperature", "-0.5"])
    assert "temperature must be a finite number >= 0, got -0.5" in capsys.readouterr().err


@pytest.mark.parametrize("devices, strategy, refused", [(2, "ddp", True), (1, "auto", False)])
def test_sync_batchnorm_under_cpu_ddp_is_refused_before_ddp(devices: int, strategy: str, refused: bool) -> None:
    """PyTorch's SyncBatchNorm does not run under CPU DDP: DDP's wrapper failed with "SyncBatchNorm
    layers only work with GPU modules", naming no field. One CPU process keeps local statistics and runs."""
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, sync_batchnorm=True, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    module = NVAEModule(arch=tiny_config(), image_spec=ImageSpec(channels=1, size=16, num_bits=1))
    if not refused:
        TrainerChecks().setup(trainer, module, "fit")
        return
    with pytest.raises(ValueError, match="trainer.sync_batchnorm needs GPUs: .* drop --trainer.sync_batchnorm on CPU") \
            as err:
        TrainerChecks().setup(trainer, module, "fit")
    one_line(err)


def test_sampling_on_a_missing_device_is_a_usage_error(quickstart_checkpoint: Path, capsys) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(quickstart_checkpoint), "--device", missing])
    err = capsys.readouterr().err
    assert f"argument --device: device '{missing}': no such CUDA device here" in err and "Traceback" not in err


class SigtermAt(L.Callback):
    """Sends this process SIGTERM (a cluster preemption) at the end of training step ``step``."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *_: object) -> None:
        if trainer.global_step - 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_preempted_cli_run_resumes_with_resume_auto(tmp_path: Path) -> None:
    common = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "debug.yaml"),
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.max_steps", "4", "--trainer.limit_train_batches", "4"]
    with pytest.raises(SystemExit):
        train_main([*common, "--trainer.callbacks+=test_errors.SigtermAt"])
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 2
    resumed = train_main([*common, "--resume", "auto"])
    assert resumed.trainer.global_step == 4  # continued from step 2, not a fresh run
    assert torch.load(resumed.trainer.checkpoint_callback.last_model_path, weights_only=True)["global_step"] == 4
    with pytest.raises(SystemExit) as err:
        train_main([*common, "--resume", str(tmp_path / "nope.ckpt")])
    assert "nope.ckpt' does not exist" in one_line(err)
