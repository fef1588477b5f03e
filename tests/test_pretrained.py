"""Model directories: config.json + model.safetensors + card, loaded without unpickling.

A real quickstart checkpoint is exported with the command; the directory must give bit-identical
outputs and seeded samples with torch.load made to raise, run under every command, and refuse
crafted directories in one line without running or allocating anything.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from nvae.checkpoint import load_checkpoint
from nvae.cli import evaluate as eval_cli
from nvae.cli import export as export_cli
from nvae.cli import sample as sample_cli
from nvae.model import NVAE
from nvae.pretrained import CONFIG, RAW_WEIGHTS, WEIGHTS, ModelDirError


@pytest.fixture(scope="module")
def model_dir(quickstart_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("exported") / "quickstart"
    export_cli.main([str(quickstart_checkpoint), str(folder)])
    return folder


def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load called: a model directory must not unpickle anything")

    monkeypatch.setattr(torch, "load", refuse)


def test_a_directory_gives_the_checkpoints_outputs_bit_for_bit(quickstart_checkpoint: Path, model_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = load_checkpoint(quickstart_checkpoint).model
    x = (torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with torch.no_grad():
        want = ckpt(x, use_mean=True)
        torch.manual_seed(5)
        want_samples = ckpt.sample(4, temperature=0.7)
    no_unpickling(monkeypatch)
    model = NVAE.from_pretrained(str(model_dir))
    with torch.no_grad():
        got = model(x, use_mean=True)
        torch.manual_seed(5)
        samples = model.sample(4, temperature=0.7)
    assert torch.equal(got.kl, want.kl) and torch.equal(samples, want_samples)
    assert torch.equal(model.log_likelihood(got.likelihood, x), ckpt.log_likelihood(want.likelihood, x))
    assert (model_dir / "README.md").read_text().startswith("---\nlibrary_name: nvae")


def test_commands_and_the_latent_api_run_on_a_directory(model_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    no_unpickling(monkeypatch)
    out = sample_cli.main(["--checkpoint", str(model_dir), "--num-samples", "4", "--device", "cpu", "--quiet",
                           "--output", str(tmp_path / "s.png")])
    assert Path(out["outputs"][0]["path"]).is_file()
    nll = eval_cli.main(["nll", "--checkpoint", str(model_dir), "-K", "2", "--num-images", "2", "--device", "cpu",
                         "--quiet"])
    assert math.isfinite(nll["nll_nats"])
    model = load_checkpoint(model_dir).model
    x = torch.zeros(1, 1, 32, 32)
    groups = model.encode(x)
    assert model.decode([g.z for g in groups]).shape == (1, 1, 32, 32)


def test_ema_weights_and_the_raw_ones(quickstart_checkpoint: Path, tmp_path: Path) -> None:
    ck = torch.load(quickstart_checkpoint, map_location="cpu", weights_only=True)
    raw = {k[len("model."):]: v for k, v in ck["state_dict"].items() if k.startswith("model.")}
    ck["nvae_ema"] = {k: (v + 0.25 if v.is_floating_point() else v) for k, v in raw.items()}
    with_ema = tmp_path / "ema.ckpt"
    torch.save(ck, with_ema)
    export_cli.main([str(with_ema), str(tmp_path / "dir")])
    assert (tmp_path / "dir" / RAW_WEIGHTS).is_file()
    for use_ema, expected in ((True, ck["nvae_ema"]), (False, raw)):
        loaded = load_checkpoint(tmp_path / "dir", use_ema=use_ema)
        assert loaded.weights == ("ema" if use_ema else "raw")
        for key, value in loaded.model.state_dict().items():
            assert torch.equal(value, expected[key]), key


def test_hub_names_go_through_the_hub_client(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(model_dir)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    model = NVAE.from_pretrained("someone/nvae-quickstart")
    assert calls == [("someone/nvae-quickstart", [CONFIG, WEIGHTS, RAW_WEIGHTS, "README.md"])]
    assert isinstance(model, NVAE)


def test_save_pretrained_round_trip(tiny_rgb: NVAE, tmp_path: Path) -> None:
    tiny_rgb.save_pretrained(str(tmp_path / "tiny"))
    back = NVAE.from_pretrained(str(tmp_path / "tiny"))
    for key, value in tiny_rgb.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


# ------------------------------------------------------------------------------------------ crafted directories
def _copy(model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "crafted"
    shutil.copytree(model_dir, folder)
    return folder


def _edit_config(folder: Path, edit: object) -> None:
    config = json.loads((folder / CONFIG).read_text())
    edit(config)  # type: ignore[operator]
    (folder / CONFIG).write_text(json.dumps(config))


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict, data: bytes, length: int | None = None) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


CONFIG_CASES = {
    "negative size": (lambda c: c["image_spec"].update(size=-32), "image_spec.size must be >= 1"),
    "huge size": (lambda c: c["image_spec"].update(size=65536), "image_spec.size 65536 exceeds 4096"),
    "huge channels": (lambda c: c["arch"].update(num_channels=100000), "at most 65536"),
    "unknown key": (lambda c: c.update(run="os.system"), "unknown key 'run'"),
    "class in arch": (lambda c: c["arch"].update(class_path="subprocess.Popen"), "do not describe an NVAE"),
    "other format": (lambda c: c.update(format="nvae-model-9"), "is not 'nvae-model-1'"),
    "weights": (lambda c: c.update(weights="pickle"), "weights must be 'raw' or 'ema'"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_crafted_config_json_is_one_line(model_dir: Path, tmp_path: Path, case: str) -> None:
    folder = _copy(model_dir, tmp_path)
    edit, expected = CONFIG_CASES[case]
    _edit_config(folder, edit)
    with pytest.raises(ModelDirError, match=expected) as err:
        load_checkpoint(folder)
    assert "\n" not in str(err.value)


def test_nan_in_config_and_a_data_module_naming_code(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(model_dir, tmp_path)
    text = (folder / CONFIG).read_text().replace('"num_channels": 16', '"num_channels": NaN')
    (folder / CONFIG).write_text(text)
    with pytest.raises(ModelDirError, match="plain, finite values"):
        load_checkpoint(folder)
    folder2 = _copy(model_dir, tmp_path / "b")
    marker = tmp_path / "MARKER"
    _edit_config(folder2, lambda c: c.update(data={"class_path": "subprocess.Popen",
                                                    "init_args": {"args": f"touch {marker}", "shell": True}}))
    with pytest.raises(SystemExit) as exit_:
        eval_cli.main(["nll", "--checkpoint", str(folder2), "-K", "1", "--num-images", "1", "--device", "cpu"])
    assert "'subprocess.Popen' is not an nvae data module" in str(exit_.value.code)
    assert not marker.exists()


def _lie(case: str, header: dict, data: bytes) -> tuple[dict, bytes, int | None]:
    name = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32")
    entry = header[name]
    if case == "extra tensor":
        header["evil.weight"] = dict(entry)
    elif case == "missing tensor":
        del header[name]
    elif case == "offsets past the end":
        entry["data_offsets"] = [entry["data_offsets"][0], len(data) + 4]
    elif case == "shape not its bytes":
        entry["shape"] = [int(d) * 2 for d in entry["shape"]]
    elif case == "100 GB tensor":
        entry["shape"], entry["data_offsets"] = [25 * 2**30], [0, 100 * 2**30]
    elif case == "overlap":
        other = next(k for k in header if k not in (name, "__metadata__") and header[k]["dtype"] == "F32")
        header[other]["data_offsets"] = list(entry["data_offsets"])
        header[other]["shape"] = list(entry["shape"])
    elif case == "header length":
        return header, data, 2**40
    elif case == "pickle dtype":
        entry["dtype"] = "OBJECT"
    return header, data, None


@pytest.mark.parametrize("case, expected", [
    ("extra tensor", "'evil.weight' unexpected"), ("missing tensor", "missing"),
    ("offsets past the end", "claims bytes"), ("shape not its bytes", "claims bytes"),
    ("100 GB tensor", "claims bytes"), ("overlap", "has shape|overlap"), ("header length", "does not fit the file"),
    ("pickle dtype", "no valid dtype"),
])
def test_crafted_safetensors_headers_are_one_line_and_allocate_nothing(model_dir: Path, tmp_path: Path, case: str,
                                                                       expected: str) -> None:
    import resource

    folder = _copy(model_dir, tmp_path)
    header, data = _header(folder / WEIGHTS)
    header, data, length = _lie(case, copy.deepcopy(header), data)
    _write(folder / WEIGHTS, header, data, length)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelDirError, match=expected) as err:
        load_checkpoint(folder)
    assert "\n" not in str(err.value)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 512  # MiB: nothing large


def test_non_finite_weights_in_a_directory_are_refused(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(model_dir, tmp_path)
    header, data = _header(folder / WEIGHTS)
    name = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32")
    begin, end = header[name]["data_offsets"]
    nan = struct.pack("<f", math.nan) * ((end - begin) // 4)
    _write(folder / WEIGHTS, header, data[:begin] + nan + data[end:])
    with pytest.raises(ModelDirError, match="non-finite"):
        load_checkpoint(folder)


# ------------------------------------------------------------------------------------------ BN readjustment
def _poison_every(model: NVAE, period: int) -> list[int]:
    """Make every ``period``-th sampling pass give NaN features to the postprocessing cells' BatchNorms
    (as an overflowing sample does)."""
    calls = [0]

    def hook(module: torch.nn.Module, inputs: tuple) -> tuple:
        calls[0] += 1
        return (inputs[0] * math.nan,) if calls[0] % period == 0 else inputs

    model.postprocess[0].register_forward_pre_hook(hook)
    return calls


def test_bn_readjustment_skips_batches_with_non_finite_statistics(tiny_rgb: NVAE,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """The official readjustment keeps a NaN batch and then samples NaN images; nvae undoes that pass."""
    from nvae.sampling import batchnorm_state, readjust_batchnorm

    tiny_rgb.eval()
    clean = copy.deepcopy(tiny_rgb)
    _poison_every(tiny_rgb, 2)  # every other pass: NaN statistics
    readjust_batchnorm(tiny_rgb, 0.7, steps=6, batch_size=2, progress=False)
    assert "3 of 6 batches gave non-finite BatchNorm statistics and were skipped" in capsys.readouterr().err
    state = batchnorm_state(tiny_rgb)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert tiny_rgb.training is False  # its mode restored
    counts = [v for k, v in state.items() if k.endswith("num_batches_tracked") and k.startswith("postprocess")]
    before = [v for k, v in batchnorm_state(clean).items() if k.endswith("num_batches_tracked")
              and k.startswith("postprocess")]
    assert all(int(a - b) == 3 for a, b in zip(counts, before))  # exactly the 3 finite passes counted


def test_bn_readjustment_with_every_batch_non_finite_is_one_line(tiny_rgb: NVAE) -> None:
    from nvae.sampling import batchnorm_state, readjust_batchnorm

    before = batchnorm_state(tiny_rgb)
    _poison_every(tiny_rgb, 1)
    with pytest.raises(ValueError, match="all 4 batches gave non-finite BatchNorm statistics") as err:
        readjust_batchnorm(tiny_rgb, 0.7, steps=4, batch_size=2, progress=False)
    assert "\n" not in str(err.value)
    for key, value in batchnorm_state(tiny_rgb).items():
        assert torch.equal(value, before[key]), key  # the trained statistics kept


def test_push_to_hub_uploads_a_model_directory(tiny_rgb: NVAE, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub client replaced: what push_to_hub uploads is a model directory that loads back."""
    uploaded: dict[str, bytes] = {}

    class FakeApi:
        def create_repo(self, repo_id: str, exist_ok: bool) -> None:
            assert repo_id == "me/tiny" and exist_ok

        def upload_folder(self, repo_id: str, folder_path: str) -> str:
            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
            return f"https://hub.example/{repo_id}"

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=FakeApi))
    assert tiny_rgb.push_to_hub("me/tiny", card="# tiny\n") == "https://hub.example/me/tiny"
    assert set(uploaded) == {CONFIG, WEIGHTS, "README.md"} and uploaded["README.md"] == b"# tiny\n"
    assert json.loads(uploaded[CONFIG])["format"] == "nvae-model-1"
