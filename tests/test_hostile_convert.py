"""``nvae-convert`` given a hostile or damaged official checkpoint: one line naming the field.

Each test crafts its input from the official cifar10_tiny fixture (one entry edited, saved to
tmp_path), runs the command line and checks the one error line (exit 2, no traceback), that the
source file's bytes survive and that no DST (nor a temporary file) is left behind.
"""
from __future__ import annotations

import argparse
import copy
import errno
import io
import os
import stat
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from nvae.cli.convert import main as convert_main
from nvae.convert import save_atomically
from nvae.model import NVAE
from nvae.official import parameter_names
from hostile_helpers import special_file

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official"
SOURCE = FIXTURES / "cifar10_tiny" / "checkpoint.pt"
pytestmark = pytest.mark.skipif(not SOURCE.is_file() and not os.environ.get("CI"), reason="no official fixtures")
Edit = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def pristine() -> dict[str, Any]:
    """The official fixture as the official code wrote it (never edited: tests edit copies)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(SOURCE, map_location="cpu", weights_only=True)


def craft(pristine: dict[str, Any], folder: Path, edit: Edit) -> Path:
    """A copy of the fixture with ``edit`` applied, saved as ``folder/hostile.pt``."""
    ckpt = copy.deepcopy(pristine)
    edit(ckpt)
    path = folder / "hostile.pt"
    torch.save(ckpt, path)
    return path


def refused(src: Path, dst: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """Runs ``nvae-convert src dst``: exit 2 with exactly one error line and nothing on stdout; ``src``
    unchanged, no ``dst`` (unless it existed: then as it was) and no temporary file. Returns the line."""
    before = src.read_bytes() if src.is_file() else None
    existed = dst.read_bytes() if dst.is_file() else dst.is_dir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(src), str(dst), *extra])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvae-convert: error: "), captured.err
    assert captured.out == ""
    assert (src.read_bytes() if src.is_file() else None) == before
    assert (dst.read_bytes() if dst.is_file() else dst.is_dir()) == existed
    assert not [p for p in dst.parent.iterdir() if p.name.endswith(".tmp")]
    return lines[0]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building any NVAE (meta device included) fails the test: the refusal must come first."""
    def built(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was built from refused args")

    monkeypatch.setattr(NVAE, "__init__", built)


def set_arg(name: str, value: Any) -> Edit:
    return lambda ckpt: setattr(ckpt["args"], name, value)


# ------------------------------------------------------------------------------------------ 1. args
@pytest.mark.parametrize("field, value", [
    ("num_channels_enc", None), ("num_channels_enc", [8]), ("num_channels_enc", "8"),
    ("num_channels_enc", float("inf")), ("num_channels_enc", -8), ("num_channels_enc", 8.0),
    ("num_latent_per_group", True), ("num_nf", float("nan")), ("num_mixture_dec", 2.5),
    ("num_channels_enc", 100000), ("num_latent_scales", 200000), ("num_groups_per_scale", 10 ** 6),
    ("num_latent_per_group", 10 ** 9), ("batch_size", 10 ** 12), ("num_x_bits", 9),
    ("learning_rate", float("nan")), ("learning_rate", 0.0), ("learning_rate_min", -1.0),
    ("warmup_epochs", float("inf")), ("kl_anneal_portion", 1.5), ("kl_const_coeff", "0.1"),
    ("weight_decay_norm", None), ("use_se", "yes"), ("res_dist", 1), ("ada_groups", None),
    ("dataset", ["cifar10"]), ("dataset", None), ("arch_instance", {"normal_enc": []}), ("data", 3),
])
def test_a_bad_official_arg_is_named_before_any_model_is_built(
        field: str, value: Any, pristine: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        no_model: None) -> None:
    src = craft(pristine, tmp_path, set_arg(field, value))
    line = refused(src, tmp_path / "out.ckpt", capsys)
    assert f"official args: {field}: " in line


@pytest.mark.parametrize("edits, field", [
    ({"num_latent_scales": 6}, "num_latent_scales"),  # 2^(1 + 6 - 1) = 64 > 32 pixels
    ({"num_groups_per_scale": 200}, "num_groups_per_scale"),  # 200 groups x 6 cells: 1,204 cells
])
def test_a_network_larger_than_the_limits_is_refused_before_any_model_is_built(
        edits: dict[str, int], field: str, pristine: dict[str, Any], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], no_model: None) -> None:
    src = craft(pristine, tmp_path, lambda ckpt: vars(ckpt["args"]).update(edits))
    assert f"official args: {field}: " in refused(src, tmp_path / "out.ckpt", capsys)


def test_args_that_fit_the_limits_but_not_the_file_are_refused_on_the_meta_device(
        pristine: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """64 channels pass the field limits and fit in memory; the model they describe is not the file's:
    refused by shape on the meta device, before a real model is allocated."""
    real_init = NVAE.__init__

    def only_on_meta(self: NVAE, *args: Any, **kwargs: Any) -> None:
        assert torch.empty(0).device.type == "meta", "a real model was built"
        real_init(self, *args, **kwargs)

    src = craft(pristine, tmp_path, lambda ckpt: vars(ckpt["args"]).update(num_channels_enc=64,
                                                                           num_channels_dec=64))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NVAE, "__init__", only_on_meta)
        line = refused(src, tmp_path / "out.ckpt", capsys)
    assert "official 'prior_ftr0' has shape (16, 16, 16), nvae's 'h0' (128, 16, 16)" in line


def test_args_describing_more_than_the_memory_available_are_refused_before_any_allocation(
        pristine: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """2048 channels pass the field limits; the model (~130 GB) does not fit the 1 GiB this machine is
    made to have: nvae.limits.check_fits refuses it, measured on the meta device."""
    import nvae.limits

    monkeypatch.setattr(nvae.limits, "available_memory", lambda: 2 ** 30)
    src = craft(pristine, tmp_path, lambda ckpt: vars(ckpt["args"]).update(num_channels_enc=2048,
                                                                           num_channels_dec=2048))
    line = refused(src, tmp_path / "out.ckpt", capsys)
    assert "official args: the model it describes " in line and "1.0 GiB this machine has available" in line


# ------------------------------------------------------------------------------------------ 2. state dict
def set_tensor(key: Any, value: Callable[[torch.Tensor], Any]) -> Edit:
    def edit(ckpt: dict[str, Any]) -> None:
        ckpt["state_dict"][key] = value(ckpt["state_dict"].get(key, torch.zeros(3)))
    return edit


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


@pytest.mark.parametrize("key, value, message", [
    ("stem.weight", lambda t: t.tolist(), "official 'stem.weight' is a list, not a tensor"),
    ("stem.weight", lambda t: None, "official 'stem.weight' is None, not a tensor"),
    ("stem.weight", lambda t: t.to(torch.complex64), "'stem.weight' has dtype torch.complex64, not floating point"),
    ("stem.weight", lambda t: t.to(torch.int64), "'stem.weight' has dtype torch.int64, not floating point"),
    ("stem.weight", lambda t: t.bool(), "'stem.weight' has dtype torch.bool"),
    ("stem.weight", with_nan, "official 'stem.weight' holds NaN or infinite values"),
    ("pre_process.0._ops.0.bn_act.running_var", lambda t: t * float("inf"), "bn_act.running_var' holds NaN"),
    ("pre_process.0._ops.0.bn_act.num_batches_tracked", lambda t: t.float(), "num_batches_tracked' has dtype"),
    ("pre_process.0._ops.0.bn_act.num_batches_tracked", lambda t: -t - 1, "num_batches_tracked' holds negative"),
    ("stem.weight", lambda t: torch.zeros(1).expand(20000, 20000), "claims 400,000,000 values"),
    ("stem.weight", lambda t: torch.empty(t.shape, device="meta"), "'stem.weight' is a torch.strided tensor on meta"),
    ("stem.weight", lambda t: t[:4], "official 'stem.weight' has shape (4, 3, 3, 3), nvae's 'stem.weight' (8, 3,"),
    ("image_conditional.1.weight", lambda t: t[:5], "official 'image_conditional.1.weight' has shape (5, 8, 3, 3)"),
    ("image_conditional.1.bias", lambda t: t.sum(), "official 'image_conditional.1.bias' has shape ()"),
    ("extra.weight", lambda t: t, "official tensor 'extra.weight' (1 in all) has no place"),
    (3, lambda t: t, "official state dict: key 3 is not a tensor name"),
])
def test_a_bad_state_dict_entry_is_named(key: Any, value: Callable[[torch.Tensor], Any], message: str,
                                        pristine: dict[str, Any], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    src = craft(pristine, tmp_path, set_tensor(key, value))
    assert message in refused(src, tmp_path / "out.ckpt", capsys)


def test_a_missing_tensor_is_named(pristine: dict[str, Any], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = craft(pristine, tmp_path, lambda ckpt: ckpt["state_dict"].pop("stem.bias"))
    assert "official state dict has no 'stem.bias'" in refused(src, tmp_path / "out.ckpt", capsys)


# ------------------------------------------------------------------------------------------ 3. optimizer
def set_moment(kind: str, value: Callable[[Any], Any], position: int = 1) -> Edit:
    """Replace entry ``kind`` of the Adamax state of the ``position``-th official parameter (stem.weight)."""
    def edit(ckpt: dict[str, Any]) -> None:
        idx = ckpt["optimizer"]["param_groups"][0]["params"][position]
        ckpt["optimizer"]["state"][idx][kind] = value(ckpt["optimizer"]["state"][idx].get(kind))
    return edit


def set_group(name: str, value: Any) -> Edit:
    return lambda ckpt: ckpt["optimizer"]["param_groups"][0].__setitem__(name, value)


STEM = "official optimizer state of 'stem.weight': "


@pytest.mark.parametrize("edit, message", [
    (set_moment("exp_avg", with_nan), STEM + "'exp_avg' holds NaN or infinite values"),
    (set_moment("exp_inf", lambda t: t * float("inf")), STEM + "'exp_inf' holds NaN or infinite values"),
    (set_moment("exp_avg", lambda t: t.to(torch.int32)), STEM + "'exp_avg' has dtype torch.int32"),
    (set_moment("exp_avg", lambda t: t[:2]), STEM + "'exp_avg' has shape (2, 3, 3, 3), nvae's 'stem.weight'"),
    (set_moment("exp_inf", lambda t: "zeros"), STEM + "'exp_inf' is 'zeros', not a tensor"),
    (set_moment("step", lambda s: float("nan")), STEM + "'step': must be an integer, got nan"),
    (set_moment("step", lambda s: -1), STEM + "'step': -1 is outside 0..16777216"),
    (set_moment("step", lambda s: [24]), STEM + "'step': must be an integer, got a list"),
    (set_moment("step", lambda s: 2 ** 40), STEM + "'step': 1099511627776 is outside"),
    (set_moment("step", lambda s: torch.tensor([24.0, 1.0])), STEM + "'step': must be an integer, got a torch.float32"),
    (lambda ckpt: ckpt["optimizer"].pop("param_groups"), "official optimizer: 'param_groups' must be a list of one"),
    (lambda ckpt: ckpt["optimizer"]["param_groups"].append({}), "'param_groups' must be a list of one group"),
    (set_group("lr", float("nan")), "official optimizer: param_groups[0] 'lr': must be finite, got nan"),
    (set_group("lr", float("inf")), "official optimizer: param_groups[0] 'lr': must be finite"),
    (set_group("lr", -0.01), "official optimizer: param_groups[0] 'lr': must be >= 0, got -0.01"),
    (set_group("lr", "0.01"), "official optimizer: param_groups[0] 'lr': must be a number, got '0.01'"),
    (set_group("eps", 0), "official optimizer: param_groups[0] 'eps': must be > 0"),
    (set_group("betas", (0.9, 1.5)), "official optimizer: param_groups[0] 'betas': must be >= 0 and <= 1"),
    (set_group("betas", (0.9, 1.0)), "official optimizer: param_groups[0] 'betas': must be below 1"),
    (set_group("params", ["0", "1"]), "official optimizer: param_groups[0] 'params' must be a list of indices"),
    (set_group("params", [0] * 3), "official optimizer: its group holds 3 parameters"),
    (lambda ckpt: ckpt["optimizer"].__setitem__("state", []), "official optimizer: 'state' must be a dict"),
    (lambda ckpt: ckpt.__setitem__("optimizer", [1, 2]), "official optimizer: is a list, not an optimizer state"),
])
def test_a_bad_optimizer_entry_is_named(edit: Edit, message: str, pristine: dict[str, Any], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert parameter_names(pristine["state_dict"])[1] == "stem.weight"
    src = craft(pristine, tmp_path, edit)
    assert message in refused(src, tmp_path / "out.ckpt", capsys)


def test_a_missing_moment_is_named(pristine: dict[str, Any], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = craft(pristine, tmp_path, lambda ckpt: ckpt["optimizer"]["state"][1].pop("exp_inf"))
    assert STEM + "'exp_inf' missing" in refused(src, tmp_path / "out.ckpt", capsys)


# ------------------------------------------------------------------------------------------ 4. counters
@pytest.mark.parametrize("key, value, message", [
    ("epoch", None, "must be an integer, got None"), ("global_step", -1, "-1 is outside 0..16777216"),
    ("epoch", float("nan"), "must be an integer, got nan"), ("global_step", 10 ** 30, "is outside 0..16777216"),
    ("epoch", True, "must be an integer, got True"), ("global_step", 24.0, "must be an integer, got 24.0"),
    ("epoch", 2 ** 200, "an integer of 201 bits is outside"),
    ("global_step", torch.tensor([24, 25]), "must be an integer, got a torch.int64 tensor of shape (2,)"),
])
def test_a_bad_counter_is_named(key: str, value: Any, message: str, pristine: dict[str, Any], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    src = craft(pristine, tmp_path, lambda ckpt: ckpt.__setitem__(key, value))
    line = refused(src, tmp_path / "out.ckpt", capsys)
    assert f"official checkpoint: '{key}': " in line and message in line


# ------------------------------------------------------------------------------------------ 5. destination
@pytest.mark.parametrize("link", ["itself", "symlink", "hardlink"])
def test_dst_that_is_src_is_refused_even_with_overwrite(link: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "a.pt"
    src.write_bytes(SOURCE.read_bytes())
    dst = {"itself": src, "symlink": tmp_path / "link.pt", "hardlink": tmp_path / "hard.pt"}[link]
    if link == "symlink":
        dst.symlink_to(src)
    elif link == "hardlink":
        os.link(src, dst)
    line = refused(src, dst, capsys, "--overwrite")
    assert f"'{dst}' is the official checkpoint being converted; write to another file" in line
    assert src.read_bytes() == SOURCE.read_bytes() and dst.read_bytes() == SOURCE.read_bytes()


def test_dst_that_is_a_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A .ckpt name is a training checkpoint (a folder there is refused); any other name a model directory,
    for which a file there is refused."""
    folder = tmp_path / "out.ckpt"
    folder.mkdir()
    assert "is a folder" in refused(SOURCE, folder, capsys, "--overwrite")
    assert list(folder.iterdir()) == []
    file = tmp_path / "model_dir"
    file.write_bytes(b"mine")
    assert "is a file; a model directory is written to a folder" in refused(SOURCE, file, capsys, "--overwrite")
    assert file.read_bytes() == b"mine"


@pytest.mark.parametrize("kind", ["character device", "named pipe"])
def test_dst_that_is_a_device_or_pipe_is_refused_even_with_overwrite(kind: str, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``nvae-convert SRC /dev/null --overwrite`` once replaced the system's /dev/null with a checkpoint."""
    node = special_file(tmp_path / "fakenull", kind)
    test = stat.S_ISFIFO if kind == "named pipe" else stat.S_ISCHR
    for extra in ([], ["--overwrite"]):
        line = refused(SOURCE, node, capsys, *extra)
        assert line == f"nvae-convert: error: '{node}' is a {kind}, not a file; nvae never replaces it"
        assert test(os.lstat(node).st_mode)
    with pytest.raises(ValueError, match=f"is a {kind}, not a file; nvae never replaces it"):
        save_atomically({"state_dict": {}}, node)  # became one after the check: the rename is refused too
    assert test(os.lstat(node).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["fakenull"]
    link = tmp_path / "link.ckpt"  # a symlink to it is fine: the rename replaces the link, not the node
    link.symlink_to(node)
    save_atomically({"state_dict": {}}, link)
    assert link.is_file() and not link.is_symlink() and test(os.lstat(node).st_mode)


class FullDisk(io.RawIOBase):
    """A file that takes 4 kB, then fails as a full disk does."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self.f, self.written = f, 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.written += len(data)
        if self.written > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("fails", ["in python", "in torch's zip writer"])
def test_a_full_disk_leaves_no_partial_dst_nor_temporary_file(existing: bool, fails: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills midway (the error raised as is, or as torch's writer raises it: a RuntimeError
    from the OSError): one line, no DST (an existing one as it was), no temporary file."""
    dst = tmp_path / "out.ckpt"
    if existing:
        dst.write_bytes(b"the previous checkpoint")
    real_save = torch.save

    def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if fails == "in python":
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, FullDisk(f), *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    before = SOURCE.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(SOURCE), str(dst), "--overwrite"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"nvae-convert: error: cannot write '{dst}' (No space left on device); nothing written"]
    assert SOURCE.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out.ckpt"] if existing else [])
    assert not existing or dst.read_bytes() == b"the previous checkpoint"


# ------------------------------------------------------------------------------------------ 6. the file
@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "is not an official NVAE checkpoint (no 'state_dict' and 'args')"),
    ({"args": argparse.Namespace(dataset="cifar10")}, "is not an official NVAE checkpoint (no 'state_dict'"),
    ({"state_dict": {}}, "is not an official NVAE checkpoint (no 'state_dict' and 'args')"),
    ({"state_dict": {}, "args": {"dataset": "cifar10"}}, "'args' is a dict, not the official Namespace"),
    ({"state_dict": [], "args": argparse.Namespace(dataset="cifar10")}, "'state_dict' is a list, not a dict"),
])
def test_a_file_of_another_shape_is_refused(content: Any, message: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "other.pt"
    torch.save(content, src)
    assert message in refused(src, tmp_path / "out.ckpt", capsys)


def test_a_missing_or_unreadable_source_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "nowhere.pt' does not exist" in refused(tmp_path / "nowhere.pt", tmp_path / "out.ckpt", capsys)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02not a pickle at all")
    assert "garbage.pt' is not in torch.save's zip format" in refused(garbage, tmp_path / "out.ckpt", capsys)
    assert "is not a file" in refused(tmp_path, tmp_path / "out.ckpt", capsys)
