"""Files from others (issue 26): configs, checkpoints and weights files that try to run code, remove
files, reach the network or exhaust memory are refused in one line, and what they aimed at survives.

Each crafted file is a real quickstart checkpoint (the session fixture) or a real config with one
entry changed; each payload would leave a marker file or remove a folder if it acted.
"""
from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from nvae import config_check
from nvae.cli import evaluate as eval_cli
from nvae.cli import sample as sample_cli
from nvae.cli import train as train_cli
from nvae.data.registry import UntrustedName
from nvae.lightning import NVAEModule

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
ANY_TYPED_ATTACK = """trainer:
  profiler:
    class_path: lightning.pytorch.profilers.PyTorchProfiler
    init_args:
      table_kwargs:
        time_unit:
          class_path: lightning.pytorch.accelerators.cuda.subprocess.Popen
          init_args: {{args: "touch {marker}", shell: true}}
"""


def one_line(run: Callable[[], Any]) -> str:
    """The one-line message a refusal ends with (a command's SystemExit, or the exception)."""
    try:
        run()
    except SystemExit as exit_:
        message = str(exit_.code)
    except ValueError as err:
        message = str(err)
    else:
        raise AssertionError("the crafted input was accepted")
    assert "\n" not in message.strip(), message
    return message


def train_args(out: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "debug.yaml"),
            "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out), *extra]


@pytest.fixture(scope="module")
def clean(quickstart_checkpoint: Path) -> dict:
    return torch.load(quickstart_checkpoint, map_location="cpu", weights_only=True)


def save(ck: dict, path: Path) -> Path:
    torch.save(ck, path)
    return path


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["evil.YAML", "evil", "config.yaml.txt"])
def test_a_config_reaching_popen_through_a_module_attribute_is_refused_whatever_its_name(tmp_path: Path,
                                                                                         name: str) -> None:
    marker = tmp_path / "MARKER"
    config = tmp_path / name
    config.write_text(ANY_TYPED_ATTACK.format(marker=marker))
    message = one_line(lambda: train_cli.main(train_args(tmp_path, "--config", str(config))))
    assert f"config '{config}'" in message and "'lightning.pytorch.accelerators.cuda.subprocess.Popen'" in message
    assert "table_kwargs.time_unit.class_path" in message
    assert not marker.exists()


def test_jsonargparse_lock_holds_when_nvae_check_is_bypassed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second lock alone: with nvae's own check told to allow everything, jsonargparse neither
    instantiates a class spec inside an Any-typed value (the run trains, no marker) nor imports a
    class whose defining path (subprocess.Popen) is not on the allowlist."""
    monkeypatch.setattr(config_check, "allowed", lambda name, trusted=frozenset(): True)
    marker = tmp_path / "MARKER"
    config = tmp_path / "any.yaml"
    config.write_text(ANY_TYPED_ATTACK.format(marker=marker))
    train_cli.main(train_args(tmp_path, "--config", str(config), "--trainer.max_steps", "1"))
    assert not marker.exists()
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  class_path: lightning.pytorch.accelerators.cuda.subprocess.Popen\n"
                    f"  init_args: {{args: 'touch {marker}', shell: true}}\n")
    with pytest.raises((SystemExit, ValueError)):
        train_cli.main(train_args(tmp_path, "--config", str(data)))
    assert not marker.exists()


def test_allowed_compares_the_object_a_name_reaches(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    allowed = config_check.allowed
    assert allowed("lightning.pytorch.callbacks.ModelCheckpoint")  # the alias configs use
    assert allowed("lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")  # its own path
    assert allowed("nvae.data.BundledMNISTDataModule") and allowed("nvae.callbacks.SampleGrid")
    assert not allowed("lightning.pytorch.accelerators.cuda.subprocess.Popen")  # reaches subprocess.Popen
    assert not allowed("lightning.pytorch.callbacks.LambdaCallback")  # calls what it is given
    assert not allowed("lightning.pytorch.loggers.WandbLogger")  # sends data over the network
    assert not allowed("lightning.pytorch.callbacks.lambda_function.os.system")
    monkeypatch.delitem(sys.modules, "antigravity", raising=False)  # importing it would open a web browser
    assert not allowed("antigravity.geohash")
    assert "antigravity" not in sys.modules


def test_a_config_larger_than_any_config_is_not_read(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (config_check.MAX_CONFIG_BYTES + 1))
    with pytest.raises(UntrustedName, match="is not a config file"):
        config_check.check_command_line(["fit", "--config", str(big)])
