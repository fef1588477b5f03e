"""Every preset parses and builds through the CLI; parameter counts are pinned; the quickstart
runs fit -> checkpoint -> load with the debug overlay."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nvae.cli.train import NVAECLI, main
from nvae.compat import sync_batchnorm_requested
from nvae.data import ImageDataModule
from nvae.lightning import NVAEModule

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# The official code's parameter counts for the paper's commands (../shared/fixtures/official/manifest):
# nvae builds the official architecture, so they are equal exactly.
PRESETS = {
    "mnist": 33_363_134,
    "cifar10": 130_852_480,
    "celeba64": 153_281_364,
    "imagenet32": 268_509_444,
    "celebahq256": 330_798_664,
    "ffhq256": 330_798_664,
}


def build(*configs: str, extra: tuple[str, ...] = ()) -> NVAECLI:
    args = [a for c in configs for a in ("--config", str(CONFIGS / f"{c}.yaml"))]
    return NVAECLI(NVAEModule, ImageDataModule, subclass_mode_data=True, run=False,
                   args=[*args, "--trainer.logger=false", *extra])


def test_every_yaml_is_covered() -> None:
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert names == set(PRESETS) | {"quickstart", "debug"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_builds_with_pinned_parameter_count(preset: str) -> None:
    with torch.device("meta"):  # counts parameters without allocating 100s of MB
        cli = build(preset, "debug")
    params = sum(p.numel() for p in cli.model.parameters())
    print(f"{preset}: {params:,} parameters (official {PRESETS[preset]:,})")
    assert params == PRESETS[preset]
    assert cli.model.spec == cli.datamodule.image_spec  # linked, not given twice
    assert cli.trainer.max_steps == 2


def test_quickstart_fit_checkpoint_load_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "debug.yaml"),
                "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 2
    assert "held-out negative ELBO" in capsys.readouterr().out
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "config.yaml").exists()
    assert (log_dir / "samples" / "final_t1.png").exists() and (log_dir / "samples" / "final_reconstructions.png").exists()
    ckpt = next(log_dir.glob("checkpoints/last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # no pickled objects inside
    assert state["hyper_parameters"]["image_spec"]["num_bits"] == 1
    loaded = NVAEModule.load_from_checkpoint(ckpt, map_location="cpu")
    trained = cli.model.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0, msg=name)
    assert any(k.startswith("spectral.u") for k in trained)  # power-iteration state is saved
    loaded.eval()
    assert loaded.model.sample(2).shape == (2, 1, 32, 32)


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_gpu_recipe_sets_mixed_precision_and_sync_batchnorm_on_gpus(monkeypatch: pytest.MonkeyPatch, bf16: bool,
                                                                    expected: str) -> None:
    from jsonargparse import Namespace

    from nvae.training import apply_gpu_recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    config = Namespace(gpu_recipe="official", trainer=Namespace(accelerator="auto", precision=32, sync_batchnorm=False))
    assert apply_gpu_recipe(config) == f"trainer.precision {expected}, trainer.sync_batchnorm true"
    assert config.trainer.precision == expected and config.trainer.sync_batchnorm is True
    config.trainer.precision = "16-mixed"  # a mixed precision asked for is kept
    config.trainer.sync_batchnorm = False
    apply_gpu_recipe(config)
    assert config.trainer.precision == "16-mixed" and config.trainer.sync_batchnorm is True
    for off in (Namespace(gpu_recipe="none", trainer=Namespace(accelerator="auto", precision=32)),
                Namespace(gpu_recipe="official", trainer=Namespace(accelerator="cpu", precision=32))):
        assert apply_gpu_recipe(off) == "" and off.trainer.precision == 32


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_paper_presets_ask_for_the_gpu_recipe_and_stay_float32_on_cpu(preset: str) -> None:
    with torch.device("meta"):
        cli = build(preset, "debug")
    assert cli.config.gpu_recipe == "official"
    assert cli.trainer.precision == "32-true" and not sync_batchnorm_requested(cli.trainer.strategy)


def _architecture_rows() -> dict[str, list[str]]:
    """docs/architecture.md's presets table: preset name -> its cells."""
    text = (CONFIGS.parent / "docs" / "architecture.md").read_text()
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| `") and ".yaml`" in line]
    return {cells[0].strip(" `").removesuffix(".yaml"): [c.strip() for c in cells] for cells in rows}


@pytest.mark.parametrize("preset", sorted(PRESETS) + ["quickstart"])
def test_the_architecture_page_describes_each_preset_as_it_builds(preset: str) -> None:
    """Bits, scales x groups (finest first), channels, flows and parameters of docs/architecture.md's table."""
    row = _architecture_rows()[preset]
    with torch.device("meta"):
        cli = build(preset, "debug")
    cfg, spec = cli.model.model.cfg, cli.model.spec
    groups = cfg.groups_per_scale()
    shown = f"{len(groups)} x {groups[0]}" if len(set(groups)) == 1 else f"{len(groups)} x ({', '.join(map(str, groups))})"
    assert row[2:6] == [str(spec.num_bits), shown, str(cfg.num_channels), str(cfg.num_flows)]
    assert row[-1] == f"{sum(p.numel() for p in cli.model.parameters()):,}"
