"""Presets by name: `--config cifar10` is configs/cifar10.yaml; `train.py presets` lists them."""
from __future__ import annotations

from pathlib import Path

import pytest

from nvae.cli import train as cli
from nvae.presets import describe, preset_folder, preset_names, resolve_config_args

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_every_config_file_is_a_preset_found_by_name() -> None:
    assert preset_folder().resolve() == CONFIGS.resolve()  # a checkout reads configs/ itself: one copy
    assert preset_names() == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    args = resolve_config_args(["fit", "--config", "cifar10", "-c", "debug", "--config=mnist"])
    assert args == ["fit", "--config", str(preset_folder() / "cifar10.yaml"), "-c",
                    str(preset_folder() / "debug.yaml"), f"--config={preset_folder() / 'mnist.yaml'}"]


def test_paths_and_inline_configs_pass_through_and_unknown_names_are_one_line_errors(tmp_path: Path) -> None:
    own = tmp_path / "cifar10"  # an existing file wins over the preset of that name
    own.write_text("seed_everything: 1\n")
    passthrough = ["--config", str(own), "--config", "configs/x.yaml", "--config", "{seed_everything: 2}"]
    assert resolve_config_args(passthrough) == passthrough
    with pytest.raises(ValueError, match=r"--config 'cifar': no such file and no preset of that name \(presets: "):
        resolve_config_args(["--config", "cifar"])


def test_presets_command_lists_names_results_and_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["presets"]) is None
    out = capsys.readouterr().out
    assert out.strip() == describe().strip()
    for name, result in [("cifar10", "2.91 bits/dim"), ("mnist", "78.01 nats"), ("ffhq256", "0.69 bits/dim")]:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert result in line, line
        assert str(preset_folder() / f"{name}.yaml") in out
