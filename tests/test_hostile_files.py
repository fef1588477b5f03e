"""Files from others: configs, checkpoints and weights files that try to run code, remove
files, reach the network or exhaust memory are refused in one line, and what they aimed at survives.

Each crafted file is a real quickstart checkpoint (the session fixture) or a real config with one
entry changed; each payload would leave a marker file or remove a folder if it acted.
"""
from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path
from typing import Callable

import pytest
import torch

from nvae import config_check
from nvae.cli import evaluate as eval_cli
from nvae.cli import sample as sample_cli
from nvae.cli import train as train_cli
from nvae.data.registry import UntrustedName
from nvae.lightning import NVAEModule
from nvae.model import NVAE
from hostile_helpers import one_line

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


def test_a_config_may_name_the_csv_logger(tmp_path: Path) -> None:
    """One of the two loggers a config may name runs through both locks (and logs its hyper-parameters)."""
    config = tmp_path / "csv.yaml"
    config.write_text(f"trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
                      f"    init_args: {{save_dir: {tmp_path}}}\n")
    train_cli.main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "debug.yaml"),
                    "--config", str(config), "--trainer.default_root_dir", str(tmp_path)])
    assert list(tmp_path.glob("*/version_0/hparams.yaml")) and list(tmp_path.glob("*/version_0/metrics.csv"))


def test_a_config_larger_than_any_config_is_not_read(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (config_check.MAX_CONFIG_BYTES + 1))
    with pytest.raises(UntrustedName, match="is not a config file"):
        config_check.check_command_line(["fit", "--config", str(big)])


# ------------------------------------------------------------------------------------------ paths in callback state
def test_resuming_never_removes_what_a_checkpoint_names(clean: dict, tmp_path: Path) -> None:
    """ModelCheckpoint state naming a folder by another fsspec scheme and one through '..' segments of
    the run's own checkpoint folder: Lightning would remove both at the next save (recursively)."""
    out = tmp_path / "run"
    dirpath = out / "quickstart" / "version_0" / "checkpoints"  # where the resumed run keeps checkpoints
    victims = [tmp_path / "victim_scheme", tmp_path / "victim_dotdot", tmp_path / "victim_best_k"]
    for victim in victims:
        victim.mkdir()
        (victim / "precious.txt").write_text("keep me")
    ck = copy.deepcopy(clean)
    key = next(k for k in ck["callbacks"] if k.startswith("ModelCheckpoint"))
    ck["callbacks"][key].update(
        dirpath=str(dirpath), best_model_path=f"local://{victims[0]}",
        last_model_path=f"{dirpath}/../../../../{victims[1].name}",
        kth_best_model_path=f"{dirpath}/../../../../{victims[2].name}",
        best_k_models={f"{dirpath}/../../../../{victims[2].name}": torch.tensor(1.0)})
    crafted = save(ck, tmp_path / "shared.ckpt")
    train_cli.main(train_args(out, "--resume", str(crafted), "--trainer.max_steps", "4", "--trainer.max_epochs", "3"))
    assert (dirpath / "last.ckpt").is_file()  # the run went on and saved
    for victim in victims:
        assert (victim / "precious.txt").read_text() == "keep me", victim


def test_sanitize_keeps_the_runs_own_files_only(tmp_path: Path) -> None:
    from nvae.checkpoint_state import sanitize_paths

    run = tmp_path / "ckpts"
    run.mkdir()
    state = {"best_model_path": str(run / "epoch=0.ckpt"), "last_model_path": str(run / ".." / "x.ckpt"),
             "kth_best_model_path": "s3://bucket/x.ckpt", "best_k_models": {str(run / "a.ckpt"): 1.0, "/etc": 2.0}}
    dropped = sanitize_paths({"callbacks": {"ModelCheckpoint{...}": state}}, [run])
    assert state["best_model_path"] == str(run / "epoch=0.ckpt")  # a plain file inside the folder stays
    assert state["last_model_path"] == "" and state["kth_best_model_path"] == ""
    assert list(state["best_k_models"]) == [str(run / "a.ckpt")]
    assert len(dropped) == 3 and all(d.startswith("ModelCheckpoint.") for d in dropped)


# ------------------------------------------------------------------------------------------ network and folders
def test_a_checkpoint_cannot_turn_downloading_on(clean: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("download attempted")

    monkeypatch.setattr(tvd.MNIST, "download", no_network)
    root = tmp_path / "new" / "tree"
    ck = copy.deepcopy(clean)
    ck["nvae_data"] = {"class_path": "nvae.data.MNISTDataModule", "init_args": {"root": str(root), "download": True}}
    crafted = save(ck, tmp_path / "dl.ckpt")
    message = one_line(lambda: eval_cli.main(["nll", "--checkpoint", str(crafted), "-K", "1", "--num-images", "1",
                                              "--device", "cpu", "--quiet"]))
    assert str(root) in message
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------ unpickling
class Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["option", "cache"])
def test_inception_weights_are_never_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    from nvae.metrics.inception import INCEPTION_WEIGHT_FILES, inception_extractor

    marker = tmp_path / "MARKER"
    path = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHT_FILES[1]
    path.parent.mkdir(parents=True)
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload(marker)}, path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="not a plain weights file") as err:
        inception_extractor(str(path) if where == "option" else None)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    assert pickle.loads(pickle.dumps(1)) == 1  # (pickle itself untouched)


# ------------------------------------------------------------------------------------------ sizes before allocation
@pytest.mark.parametrize("group, field, value, expected", [
    ("arch", "num_channels", 100000, "convolutions"),
    ("arch", "num_groups_per_scale", 200000, "latent groups"),
    ("image_spec", "size", 65536, "image_spec.size 65536"),
    ("arch", "num_cell_per_cond_dec", 5000, "cells"),
    ("arch", "num_channels", 2000, "GiB"),  # within the structural bounds: refused by its size on meta
    ("image_spec", "size", "32", "must be an integer"),
    ("arch", "num_flows", -1, "num_flows"),
])
def test_model_sizes_from_a_file_are_checked_before_allocating(clean: dict, tmp_path: Path, group: str, field: str,
                                                              value: object, expected: str) -> None:
    import resource

    ck = copy.deepcopy(clean)
    ck["hyper_parameters"][group][field] = value
    crafted = save(ck, tmp_path / "big.ckpt")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for run in (lambda: sample_cli.main(["--checkpoint", str(crafted), "--num-samples", "1", "--device", "cpu",
                                         "--output", str(tmp_path / "s.png")]),
                lambda: NVAEModule.load_from_checkpoint(crafted)):
        message = one_line(run)
        assert expected in message and str(crafted) in message, message
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 1024, grown_mib  # the refused models need 30 GiB to 360 GB; nothing close was allocated
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("value", [0, -3, "10", 2.5, True])
def test_guard_check_every_from_a_file_is_refused_in_one_line(clean: dict, tmp_path: Path, value: object) -> None:
    """model.guard.check_every says how often the guard's counters are read: anything but an integer
    >= 1 is refused in one line naming the field and the file."""
    ck = copy.deepcopy(clean)
    ck["hyper_parameters"]["guard"]["check_every"] = value
    crafted = save(ck, tmp_path / "every.ckpt")
    message = one_line(lambda: NVAEModule.load_from_checkpoint(crafted))
    assert "model.guard.check_every must be an integer >= 1" in message and str(crafted) in message, message


@pytest.mark.parametrize("field, value, expected", [
    ("likelihood", "os.system", "model.arch.likelihood must be auto or one of bernoulli, dmol, got 'os.system'"),
    ("likelihood", ["dmol"], "model.arch.likelihood must be auto or one of bernoulli, dmol, got ['dmol']"),
    ("backend", "nvae.accel.cpu.install", "model.arch.backend must be one of auto, plain, cpu"),
    ("fused_ops", "yes", "model.arch.fused_ops must be true or false, got 'yes'"),
])
def test_likelihood_and_backend_names_from_a_file_are_registry_names(clean: dict, tmp_path: Path, field: str,
                                                                     value: object, expected: str) -> None:
    """model.arch names a likelihood family and a backend: a file may give only the registered names
    (nothing is imported or looked up by the name), else one line before a model is built."""
    ck = copy.deepcopy(clean)
    ck["hyper_parameters"]["arch"][field] = value
    crafted = save(ck, tmp_path / "names.ckpt")
    for run in (lambda: sample_cli.main(["--checkpoint", str(crafted), "--num-samples", "1", "--device", "cpu",
                                         "--output", str(tmp_path / "s.png")]),
                lambda: NVAEModule.load_from_checkpoint(crafted)):
        message = one_line(run)
        assert expected in message and str(crafted) in message, message
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("value", [0, -3, 10**12, True, "20", None, 2.5])
def test_ema_bn_batches_from_a_file_is_bounded(clean: dict, tmp_path: Path, value: object) -> None:
    """model.ema_bn_batches decides how many batches every validation runs first: a file gives an
    integer in 1..10000, else one line naming the file and the field (no run that never validates)."""
    ck = copy.deepcopy(clean)
    ck["hyper_parameters"]["ema_bn_batches"] = value
    crafted = save(ck, tmp_path / "ema.ckpt")
    message = one_line(lambda: NVAEModule.load_from_checkpoint(crafted))
    assert f"'{crafted}': model.ema_bn_batches must be an integer in 1..10000, got {value!r}" in message, message


def test_check_fits_counts_the_real_model_on_meta(tiny_rgb: torch.nn.Module) -> None:
    from nvae.limits import check_fits

    real = sum(t.numel() * t.element_size() for t in [*tiny_rgb.parameters(), *tiny_rgb.buffers()])
    assert check_fits(tiny_rgb.spec, tiny_rgb.cfg, NVAE, available=10 * real) == real
    with pytest.raises(ValueError, match="more than the"):
        check_fits(tiny_rgb.spec, tiny_rgb.cfg, NVAE, available=real)  # needs 2x while loading


# ------------------------------------------------------------------------------------------ weights
def _first_weight(ck: dict) -> str:
    return next(k for k, v in ck["state_dict"].items() if k.startswith("model.") and v.is_floating_point()
                and v.dim() == 4)


@pytest.mark.parametrize("case, expected", [
    ("shape", "has shape"), ("missing", "1 missing"), ("extra", "1 unexpected"), ("string", "dict of tensors"),
    ("nan", "non-finite"), ("inf", "non-finite"), ("complex", "complex"), ("integer", "torch.int64"),
])
def test_broken_weights_are_one_line(clean: dict, tmp_path: Path, case: str, expected: str) -> None:
    ck = copy.deepcopy(clean)
    ck.pop("nvae_ema", None)
    key = _first_weight(ck)
    w = ck["state_dict"][key]
    edits: dict[str, Callable[[], None]] = {
        "shape": lambda: ck["state_dict"].__setitem__(key, w[:1]),
        "missing": lambda: ck["state_dict"].pop(key),
        "extra": lambda: ck["state_dict"].__setitem__("model.extra.weight", torch.zeros(1)),
        "string": lambda: ck["state_dict"].__setitem__(key, "os.system"),
        "nan": lambda: ck["state_dict"].__setitem__(key, torch.full_like(w, math.nan)),
        "inf": lambda: ck["state_dict"].__setitem__(key, torch.full_like(w, math.inf)),
        "complex": lambda: ck["state_dict"].__setitem__(key, w.to(torch.complex64)),
        "integer": lambda: ck["state_dict"].__setitem__(key, w.long()),
    }
    edits[case]()
    crafted = save(ck, tmp_path / f"{case}.ckpt")
    message = one_line(lambda: sample_cli.main(["--checkpoint", str(crafted), "--num-samples", "1", "--device", "cpu",
                                                "--output", str(tmp_path / "s.png")]))
    assert expected in message, message
    assert expected in one_line(lambda: NVAEModule.load_from_checkpoint(crafted))
    assert not (tmp_path / "s.png").exists()


# ------------------------------------------------------------------------------------------ training state
def _rng_bad(ck: dict) -> None:
    ck["nvae_rng"][0]["torch"] = torch.zeros(3, dtype=torch.uint8)


def _guard_bad(ck: dict) -> None:
    ck["callbacks"]["GuardedSteps"]["norms"] = torch.zeros(7, dtype=torch.float64)


def _guard_nan(ck: dict) -> None:
    ck["callbacks"]["GuardedSteps"]["lr_scale"] = torch.tensor(math.nan, dtype=torch.float64)


def _lr_nan(ck: dict) -> None:
    ck["optimizer_states"][0]["param_groups"][0]["lr"] = math.nan


def _step_negative(ck: dict) -> None:
    ck["global_step"] = -5


@pytest.mark.parametrize("edit, expected", [
    (_rng_bad, "nvae_rng[0] is not an RNG state"), (_guard_bad, "GuardedSteps.norms"),
    (_guard_nan, "GuardedSteps.lr_scale"), (_lr_nan, "param_groups[0].lr"), (_step_negative, "global_step"),
])
def test_resuming_refuses_a_broken_training_state(clean: dict, tmp_path: Path, edit: Callable[[dict], None],
                                                  expected: str) -> None:
    ck = copy.deepcopy(clean)
    edit(ck)
    crafted = save(ck, tmp_path / "state.ckpt")
    message = one_line(lambda: train_cli.main(train_args(tmp_path / "run", "--resume", str(crafted),
                                                         "--trainer.max_steps", "4", "--trainer.max_epochs", "3")))
    assert expected in message, message


def test_rng_states_are_tried_then_put_back(clean: dict) -> None:
    import random

    from nvae.checkpoint_state import check_rng_states

    before = (torch.get_rng_state(), random.getstate())
    check_rng_states(clean["nvae_rng"], "nvae_rng")  # a real state: accepted
    bad = copy.deepcopy(clean["nvae_rng"])
    bad[0]["python"] = (3, (1, 2), None)
    with pytest.raises(ValueError, match=r"nvae_rng\[0\] is not an RNG state"):
        check_rng_states(bad, "nvae_rng")
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


def test_ckpt_path_that_is_a_folder_is_one_line(tmp_path: Path) -> None:
    message = one_line(lambda: train_cli.main(train_args(tmp_path, "--ckpt_path", str(tmp_path))))
    assert "is a folder, not a checkpoint file" in message


# ------------------------------------------------------------------------------------------ images given to commands
def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A real 1x1 PNG whose IHDR (and its CRC) claims ``width`` x ``height`` pixels."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


def test_images_given_to_the_latent_api_are_read_like_training_data(quickstart_checkpoint: Path,
                                                                    tmp_path: Path) -> None:
    """sample.py --reconstruct reads with the data pipeline's reader: a header claiming 30000 x 30000
    pixels is one line naming the file (no decompression-bomb traceback, nothing decoded)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    bomb = _png_claiming(folder / "bomb.png", 30000, 30000)
    message = one_line(lambda: sample_cli.main(["--checkpoint", str(quickstart_checkpoint), "--reconstruct",
                                                str(folder), "--device", "cpu", "--output", str(tmp_path / "r.png")]))
    assert str(bomb) in message and "900000000 pixels" in message  # 30000 x 30000
    assert not (tmp_path / "r.png").exists()


def test_evaluate_turns_an_unreadable_image_met_while_loading_into_one_line() -> None:
    from nvae.cli.outputs import one_line_errors
    from nvae.data.base import DataError

    with pytest.raises(SystemExit) as exit_:
        with one_line_errors("evaluate.py"):
            raise DataError("cannot read image 'a/b.png': truncated")
    assert exit_.value.code == "evaluate.py: error: cannot read image 'a/b.png': truncated"


@pytest.mark.parametrize("command", ["sample", "recon", "nll"])
def test_a_batch_no_machine_could_hold_is_refused_before_any_work(quickstart_checkpoint: Path, tmp_path: Path,
                                                                  command: str) -> None:
    """A pass over 10^9 images of the quickstart model holds at least 16 x 32 x 32 float32 per image
    (61 TiB): one line naming the option, before a single image is drawn or read."""
    from nvae.limits import check_batch

    huge = str(10**9)
    runs = {
        "sample": (["--num-samples", huge, "--batch-size", huge, "--format", "npz", "--output", str(tmp_path / "s.npz")],
                   "--batch-size"),
        "recon": (["recon", "--num-images", huge, "--output", str(tmp_path / "r.png")], "--num-images"),
        "nll": (["nll", "--batch-size", huge, "-K", huge], "--batch-size"),  # K samples of one image per pass
    }
    args, option = runs[command]
    main = sample_cli.main if command == "sample" else eval_cli.main
    message = one_line(lambda: main([*args, "--checkpoint", str(quickstart_checkpoint), "--device", "cpu"]))
    assert f"{option} {huge}: one pass over that many images needs at least" in message, message
    assert not list(tmp_path.iterdir())
    from nvae.spec import ImageSpec
    from nvae.arch import NVAEConfig

    check_batch(ImageSpec(1, 32, 1, 2), NVAEConfig(num_channels=16), 100, "--batch-size", available=2**30)  # 6 MiB
    with pytest.raises(ValueError, match="--batch-size 100000"):
        check_batch(ImageSpec(1, 32, 1, 2), NVAEConfig(num_channels=16), 100000, "--batch-size", available=2**30)


# ------------------------------------------------------------------------------------------ found by a hostile probe
def test_yaml_inside_a_string_value_is_checked_too(tmp_path: Path) -> None:
    """jsonargparse parses a string given to a non-str argument as YAML: the names in it are checked."""
    marker = tmp_path / "MARKER"
    config = tmp_path / "e4.yaml"
    config.write_text(f'data: "{{class_path: subprocess.Popen, init_args: {{args: [touch, {marker}]}}}}"\n')
    message = one_line(lambda: train_cli.main(train_args(tmp_path, "--config", str(config))))
    assert "data.class_path: 'subprocess.Popen'" in message
    assert not marker.exists()


def test_a_config_cannot_name_a_checkpoint_to_resume_and_remove(tmp_path: Path) -> None:
    """OnExceptionCheckpoint makes Lightning resume from the file it names (unchecked) and removes it at
    teardown: a config may not name it."""
    victim = tmp_path / "victimrun" / "checkpoints" / "last.ckpt"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"someone's checkpoint")
    config = tmp_path / "c2.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.OnExceptionCheckpoint\n"
                      f"      init_args: {{dirpath: {victim.parent}, filename: last}}\n")
    message = one_line(lambda: train_cli.main(train_args(tmp_path / "run", "--config", str(config))))
    assert "OnExceptionCheckpoint" in message
    assert victim.read_bytes() == b"someone's checkpoint"


@pytest.mark.parametrize("location", ["http://127.0.0.1:9/x", "local:///tmp/x", "simplecache::file:///tmp/x"])
def test_a_config_cannot_choose_a_network_or_fsspec_location(tmp_path: Path, location: str) -> None:
    config = tmp_path / "url.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                      f"      init_args: {{dirpath: '{location}'}}\n")
    message = one_line(lambda: train_cli.main(train_args(tmp_path, "--config", str(config))))
    assert "trainer.callbacks[0].init_args.dirpath" in message and "network or fsspec location" in message


def test_ckpt_path_resumes_a_real_checkpoint(quickstart_checkpoint: Path, tmp_path: Path) -> None:
    """The import lock lets LightningCLI parse a checkpoint's own hyper-parameters (nvae's types)."""
    cli = train_cli.main(train_args(tmp_path, "--ckpt_path", str(quickstart_checkpoint), "--trainer.max_steps", "3",
                                    "--trainer.max_epochs", "3"))
    assert cli.trainer.global_step == 3


def _rezip(src: Path, dst: Path, compression: int) -> Path:
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return dst


def test_compressed_or_legacy_files_are_not_inflated(clean: dict, tmp_path: Path) -> None:
    """A compressed record could inflate far beyond the file (64 MiB of zeros here fit in ~70 kB); the
    legacy format allocates what its header declares: both refused before torch.load reads them."""
    import zipfile

    from nvae.metrics.inception import read_inception_weights

    ck = dict(clean, junk=torch.zeros(2**24))
    plain = save(ck, tmp_path / "plain.ckpt")
    bomb = _rezip(plain, tmp_path / "bomb.ckpt", zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < plain.stat().st_size / 10
    legacy = tmp_path / "legacy.ckpt"
    torch.save(clean, legacy, _use_new_zipfile_serialization=False)
    for path, expected in ((bomb, "is compressed"), (legacy, "not in torch.save's zip format")):
        message = one_line(lambda: sample_cli.main(["--checkpoint", str(path), "--num-samples", "1", "--device", "cpu",
                                                    "--output", str(tmp_path / "s.png")]))
        assert expected in message and str(path) in message, message
        with pytest.raises(ValueError, match=expected):
            read_inception_weights(path)
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("case, expected", [("sparse", "torch.sparse_coo tensor"), ("expanded", "storage holds"),
                                            ("running_var", "negative variances")])
def test_odd_tensors_in_a_checkpoint_are_one_line(clean: dict, tmp_path: Path, case: str, expected: str) -> None:
    ck = copy.deepcopy(clean)
    ck.pop("nvae_ema", None)
    key = _first_weight(ck)
    var = next(k for k in ck["state_dict"] if k.endswith("running_var"))
    if case == "sparse":
        ck["state_dict"][key] = ck["state_dict"][key].to_sparse()
    elif case == "expanded":  # one float claiming the whole weight
        ck["state_dict"][key] = torch.ones(1).expand(ck["state_dict"][key].numel()).reshape(ck["state_dict"][key].shape)
    else:
        ck["state_dict"][var] = -torch.ones_like(ck["state_dict"][var])
    crafted = save(ck, tmp_path / "odd.ckpt")
    message = one_line(lambda: sample_cli.main(["--checkpoint", str(crafted), "--num-samples", "1", "--device", "cpu",
                                                "--output", str(tmp_path / "s.png")]))
    assert expected in message, message


def test_a_config_describing_a_model_too_large_is_one_line(tmp_path: Path) -> None:
    message = one_line(lambda: train_cli.main(train_args(tmp_path, "--model.arch.num_channels", "3000")))
    assert "model.arch and image_spec: the model it describes has" in message and "nothing was allocated" in message


def test_nvae_convert_refuses_a_compressed_official_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import zipfile

    from nvae.cli import convert as convert_cli

    src = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official" / "cifar10_tiny" / "checkpoint.pt"
    if not src.is_file():
        pytest.skip("../shared/fixtures/official is not here (a clone without shared/)")
    bomb = _rezip(src, tmp_path / "official.pt", zipfile.ZIP_DEFLATED)
    with pytest.raises(SystemExit):
        convert_cli.main([str(bomb), str(tmp_path / "out.ckpt")])
    err = capsys.readouterr().err.strip()
    assert "is compressed" in err and "\n" not in err, err
    assert not (tmp_path / "out.ckpt").exists()
