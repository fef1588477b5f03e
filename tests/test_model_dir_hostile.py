"""Model directories against a hostile tester: where one may be written, and odd contents.

Each case is what a probe did to the first version: the one line expected, and what must survive.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_helpers import one_line

from nvae.checkpoint import load_checkpoint
from nvae.cli import convert as convert_cli
from nvae.cli import evaluate as eval_cli
from nvae.cli import export as export_cli
from nvae.cli import sample as sample_cli
from nvae.model import NVAE
from nvae.pretrained import CONFIG, WEIGHTS, ModelDirError

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official" / "cifar10_tiny" / "checkpoint.pt"
needs_fixture = pytest.mark.skipif(not OFFICIAL.is_file(), reason="../shared/fixtures/official is not here")


@pytest.fixture(scope="module")
def model_dir(quickstart_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("probe") / "model"
    export_cli.main([str(quickstart_checkpoint), str(folder)])
    return folder


def _export(ckpt: Path, folder: Path, *extra: str) -> str:
    """The one-line refusal of ``nvae-export CKPT FOLDER`` (the function the command runs)."""
    return one_line(lambda: export_cli.export(ckpt, folder, overwrite="--overwrite" in extra))


# ------------------------------------------------------------------------------------------ where it is written
def test_a_folder_of_other_files_is_never_written_into(quickstart_checkpoint: Path, tmp_path: Path) -> None:
    """`nvae-export CKPT .` in a repository must not replace its README.md, with or without --overwrite."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("NOTES")
    for extra in ((), ("--overwrite",)):
        assert "holds 1 other file(s) ('README.md', ...)" in _export(quickstart_checkpoint, repo, *extra)
    assert (repo / "README.md").read_text() == "NOTES" and sorted(os.listdir(repo)) == ["README.md"]


@needs_fixture
@pytest.mark.parametrize("member", ["README.md", "config.json"])
def test_the_source_inside_the_destination_is_refused(tmp_path: Path, member: str) -> None:
    folder = tmp_path / "dA"
    folder.mkdir()
    src = folder / member
    shutil.copy(OFFICIAL, src)
    if member == "config.json":  # a model directory already, to be overwritten
        (folder / WEIGHTS).write_bytes(b"")
    before = src.read_bytes()
    args = [str(src), str(folder)] + (["--overwrite"] if member == "config.json" else [])
    with pytest.raises(SystemExit):
        convert_cli.main(args)
    assert src.read_bytes() == before


@pytest.mark.parametrize("kind", ["named pipe", "folder"])
def test_a_member_that_is_not_a_file_is_refused(model_dir: Path, quickstart_checkpoint: Path, tmp_path: Path,
                                                kind: str) -> None:
    folder = tmp_path / "x"
    shutil.copytree(model_dir, folder)
    target = folder / ("README.md" if kind == "named pipe" else CONFIG)
    target.unlink()
    os.mkfifo(target) if kind == "named pipe" else target.mkdir()
    message = _export(quickstart_checkpoint, folder, "--overwrite")
    assert f"'{target}' is a {kind}" in message and "never replaces it" in message
    assert (stat.S_ISFIFO if kind == "named pipe" else stat.S_ISDIR)(os.lstat(target).st_mode)


def test_files_are_readable_by_others_and_a_directory_exports_again(model_dir: Path, tmp_path: Path) -> None:
    assert {oct(os.stat(model_dir / n).st_mode & 0o777) for n in (CONFIG, WEIGHTS, "README.md")} == {"0o644"}
    export_cli.main([str(model_dir), str(tmp_path / "again")])  # a model directory as the source
    for key, value in load_checkpoint(model_dir).model.state_dict().items():
        assert torch.equal(value, load_checkpoint(tmp_path / "again").model.state_dict()[key]), key


def test_save_pretrained_keeps_the_memory_format(model_dir: Path, tmp_path: Path) -> None:
    """A copy made by save_pretrained samples the same images as the directory it was loaded from."""
    NVAE.from_pretrained(str(model_dir)).save_pretrained(str(tmp_path / "copy"))
    outs = []
    for folder in (model_dir, tmp_path / "copy"):
        out = tmp_path / f"{folder.name}.npz"
        sample_cli.main(["--checkpoint", str(folder), "--num-samples", "8", "--seed", "3", "--format", "npz",
                         "--output", str(out), "--device", "cpu", "--quiet"])
        outs.append(np.load(out)["images"])
    assert json.loads((tmp_path / "copy" / CONFIG).read_text())["channels_last"] is True
    assert np.array_equal(*outs)


# ------------------------------------------------------------------------------------------ odd contents
def _copy(model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "crafted"
    shutil.copytree(model_dir, folder)
    return folder


def test_deep_json_duplicate_keys_and_odd_names_are_one_line(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(model_dir, tmp_path)
    config = (folder / CONFIG).read_text()
    cases = {
        '{"format": "nvae-model-1", "provenance": ' + "[" * 200000 + "]" * 200000 + "}": "RecursionError",
        '{"format": "evil", ' + config.strip()[1:]: "a key appears twice",
        config.strip()[:-1] + ', "evil\\nline2 \\u001b[31mRED": 1}': "unknown key 'evil\\nline2 \\x1b[31mRED'",
        config.replace('"likelihood": "bernoulli"', '"likelihood": "gaussian"'): "likelihood 'gaussian' is not",
    }
    for text, expected in cases.items():
        (folder / CONFIG).write_text(text)
        with pytest.raises(ModelDirError) as err:
            load_checkpoint(folder)
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)[:300]


def test_a_deep_safetensors_header_is_one_line(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(model_dir, tmp_path)
    text = b'{"__metadata__": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(ModelDirError, match="not JSON nvae reads"):
        load_checkpoint(folder)


def test_a_float64_weight_that_overflows_float32_is_refused(model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(model_dir, tmp_path)
    state = load_file(str(folder / WEIGHTS))
    state["stem.weight"] = torch.full_like(state["stem.weight"], 1e300, dtype=torch.float64)
    save_file(state, str(folder / WEIGHTS))
    with pytest.raises(ModelDirError, match="'stem.weight' holds non-finite values"):
        load_checkpoint(folder)


def test_data_arguments_that_do_not_fit_the_data_module_are_one_line(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(model_dir, tmp_path)
    config = json.loads((folder / CONFIG).read_text())
    config["data"]["init_args"]["batch_size"] = "abc"
    (folder / CONFIG).write_text(json.dumps(config))
    message = one_line(lambda: eval_cli.main(["nll", "--checkpoint", str(folder), "-K", "1", "--num-images", "1",
                                              "--device", "cpu", "--quiet"]))
    assert "the recorded arguments do not fit it" in message


def test_a_local_path_with_a_typo_never_reaches_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def snapshot_download(**kwargs: object) -> str:
        raise AssertionError("the Hub was asked for a local path")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelDirError, match="'runs/typo_model' is not a model directory"):
        NVAE.from_pretrained("runs/typo_model")

    def offline(**kwargs: object) -> str:
        raise OSError("no network")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(ModelDirError, match="the Hugging Face Hub gave no model"):
        NVAE.from_pretrained("someone/model")
