"""Hostile arguments and outputs for sample.py and evaluate.py: each case stops with one line and
no traceback, checked before the work where it can be; outputs are complete or absent; memory does not
grow with --num-samples (the images are streamed batch by batch)."""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
import weakref
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from nvae.checkpoint import load_checkpoint
from nvae.cli.evaluate import main as evaluate_main
from nvae.cli.sample import main as sample_main
from nvae.sampling import image_seed
from hostile_helpers import special_file

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def refusal(run: Callable[[list[str]], Any], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``run(argv)`` stops with (its SystemExit message, else its last stderr line)."""
    with pytest.raises(SystemExit) as exit_:
        run(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = exit_.value.code if isinstance(exit_.value.code, str) else err.strip().splitlines()[-1]
    assert "\n" not in message, message
    return message


def strict_last_json(out: str) -> dict:
    """The last stdout line, parsed as strict JSON (NaN and Infinity refused)."""
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(out.strip().splitlines()[-1], parse_constant=refuse)


def leftovers(folder: Path) -> list[str]:
    """Temporary files left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


class TinyFeatures(torch.nn.Module):
    """A fixed random conv net standing in for Inception (no weights can be downloaded here)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float().expand(-1, 3, -1, -1) / 255.0).flatten(1)


@pytest.fixture
def tiny_inception(monkeypatch: pytest.MonkeyPatch) -> None:
    import nvae.metrics.fid as fid

    monkeypatch.setattr(fid, "inception_extractor", lambda *a, **k: TinyFeatures())


def image_npz(path: Path, n: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    np.savez(path, images=torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8).numpy())
    return path


# ------------------------------------------------------------------------------------------ 1. numbers
SAMPLE_NUMBERS = [(["--num-samples", "-5"], "--num-samples"), (["--num-samples", "0"], "--num-samples"),
                  (["--batch-size", "0"], "--batch-size"), (["--bn-batch-size", "0"], "--bn-batch-size"),
                  (["--readjust-bn", "-5"], "--readjust-bn"), (["--readjust-bn", "0"], "--readjust-bn"),
                  (["--temperature", "nan"], "--temperature"), (["--temperature", "1", "inf"], "--temperature"),
                  (["--seed", str(10 ** 20)], "--seed"), (["--steps", "1"], "--steps"),
                  (["--keep-groups", "-1"], "--keep-groups"),
                  (["--num-samples", "5000"], "--num-samples")]  # over the png grid's 4096
EVAL_NUMBERS = [(["nll", "-K", "0"], "--num-importance-samples/-K"), (["nll", "--batch-size", "0"], "--batch-size"),
                (["nll", "--num-images", "-5"], "--num-images"), (["nll", "--devices", "0"], "--devices"),
                (["nll", "--num-nodes", "0"], "--num-nodes"), (["fid", "--num-samples", "0"], "--num-samples"),
                (["fid", "--num-reference", "-3"], "--num-reference"), (["fid", "--batch-size", "0"], "--batch-size"),
                (["fid", "--readjust-bn", "0"], "--readjust-bn"), (["fid", "--temperature", "inf"], "--temperature"),
                (["recon", "--num-images", "0"], "--num-images")]


@pytest.mark.parametrize("args, option", SAMPLE_NUMBERS)
def test_sample_numbers_are_usage_errors_naming_the_option(args: list[str], option: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    line = refusal(sample_main, ["--checkpoint", str(tmp_path / "never-read.ckpt"), *args], capsys)
    assert line.startswith(f"sample.py: error: argument {option}"), line


@pytest.mark.parametrize("args, option", EVAL_NUMBERS)
def test_evaluate_numbers_are_usage_errors_naming_the_option(args: list[str], option: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    line = refusal(evaluate_main, [*args, "--checkpoint", str(tmp_path / "never-read.ckpt")], capsys)
    assert line.startswith("evaluate.py") and f"error: argument {option}" in line, line


# ------------------------------------------------------------------------------------------ 2. JSON
def test_non_finite_nll_is_null_in_strict_json_and_named_on_stderr(
        quickstart_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import nvae.cli.evaluate as evaluate

    def nan_rows(model: Any, dataset: Any, indices: Any, *rest: Any, **kw: Any) -> torch.Tensor:
        return torch.tensor([[float(i), float("nan"), -90.0] for i in indices], dtype=torch.float64)

    monkeypatch.setattr(evaluate, "per_image_nll", nan_rows)
    evaluate_main(["nll", "--checkpoint", str(quickstart_checkpoint), "--num-images", "2", "-K", "2", "--quiet"])
    out, err = capsys.readouterr()
    result = strict_last_json(out)
    assert result["nll_nats"] is None and result["bpd"] is None and result["nelbo_nats"] == 90.0
    assert "evaluate.py: not finite, written as null in the JSON line: nll_nats (nan), bpd (nan)" in err


def test_non_finite_fid_is_null_in_strict_json(tmp_path: Path, tiny_inception: None, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import nvae.metrics.fid as fid

    monkeypatch.setattr(fid, "fid_from_stats", lambda a, b: float("inf"))
    gen, ref = image_npz(tmp_path / "gen.npz", 8, 0), image_npz(tmp_path / "ref.npz", 8, 1)
    evaluate_main(["fid", "--images", str(gen), "--reference", str(ref), "--quiet"])
    out, err = capsys.readouterr()
    assert strict_last_json(out)["fid"] is None and "fid (inf)" in err


# ------------------------------------------------------------------------------------------ 3. mu/sigma
def test_reference_statistics_in_the_mu_sigma_form_load(tmp_path: Path, tiny_inception: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from nvae.metrics.fid import compute_stats

    gen, ref = image_npz(tmp_path / "gen.npz", 8, 0), image_npz(tmp_path / "ref.npz", 10, 1)
    stats = compute_stats([torch.from_numpy(np.load(ref)["images"])], TinyFeatures(), progress=False)
    np.savez(tmp_path / "stats.npz", mu=stats.mean.numpy(), sigma=stats.cov.numpy())  # pytorch-fid's form
    by_images = evaluate_main(["fid", "--images", str(gen), "--reference", str(ref), "--quiet"])
    by_stats = evaluate_main(["fid", "--images", str(gen), "--reference", str(tmp_path / "stats.npz"), "--quiet"])
    assert by_stats["fid"] == pytest.approx(by_images["fid"], rel=1e-9) and by_stats["num_reference"] is None
    np.savez(tmp_path / "mu_only.npz", mu=stats.mean.numpy())
    line = refusal(evaluate_main, ["fid", "--images", str(gen), "--reference", str(tmp_path / "mu_only.npz")], capsys)
    assert "mu_only.npz': FID statistics need arrays mu and sigma; sigma missing (the file has: mu)" in line


def test_fid_inputs_are_read_before_inception_loads_or_images_are_drawn(
        quickstart_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import nvae.cli.fid as fid_cli

    monkeypatch.setattr(fid_cli, "iter_samples", lambda *a, **k: pytest.fail("images drawn before the check"))
    gen, mu_only, junk = image_npz(tmp_path / "gen.npz", 8, 0), tmp_path / "mu_only.npz", tmp_path / "junk.npz"
    np.savez(mu_only, mu=np.zeros(4))
    junk.write_text("not a zip")
    no_inception = ["--inception-weights", str(tmp_path / "none.pth"), "--quiet"]  # would stop with its own line
    cases = [(["--checkpoint", str(quickstart_checkpoint), "--reference", str(mu_only)],
              f"evaluate.py: --reference: '{mu_only}': FID statistics need arrays mu and sigma; sigma missing"),
             (["--images", str(junk), "--reference", str(gen)],
              f"evaluate.py: --images: cannot read '{junk}' as .npz: it is not a zip archive"),
             (["--images", str(gen), "--reference", str(tmp_path / "none.npz")],
              f"evaluate.py: --reference: no .npz file or image folder at '{tmp_path / 'none.npz'}'")]
    for argv, expected in cases:
        assert refusal(evaluate_main, ["fid", *argv, *no_inception], capsys).startswith(expected), argv


# ------------------------------------------------------------------------------------------ 4. paths
def test_output_paths_are_checked_before_the_checkpoint_is_read(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir()
    file.write_text("keep me")
    never = ["--checkpoint", str(tmp_path / "never-read.ckpt")]
    cases = [(sample_main, [*never, "--output", str(folder)], f"--output '{folder}' is a folder; give a file name"),
             (sample_main, [*never, "--format", "npz", "--output", str(file / "s.npz")], f"'{file}' is a file, not"),
             (sample_main, [*never, "--format", "pngs", "--output", str(file)],
              f"--output '{file}' is a file; a folder is to be written there"),
             (sample_main, [*never, "--encode", "x.png", "--output", str(folder)], "is a folder"),
             (evaluate_main, ["recon", *never, "--output", str(folder)], "is a folder"),
             (evaluate_main, ["nll", *never, "--per-image", str(file / "n.csv")], "--per-image"),
             (evaluate_main, ["fid", *never, "--stats-cache", str(file)], "--stats-cache")]
    for run, argv, expected in cases:
        assert expected in refusal(run, argv, capsys), argv
    assert file.read_text() == "keep me" and not any(folder.iterdir())


# ------------------------------------------------------------------------------------------ 5. complete or absent
def test_a_png_folder_of_an_earlier_run_needs_overwrite_which_never_deletes_other_files(
        quickstart_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "samples"
    out.mkdir()
    for i in range(5):
        (out / f"{i:06d}.png").write_bytes(b"old")
    (out / ".000002.png.4242.tmp").write_bytes(b"left by a killed run")
    argv = ["--checkpoint", str(quickstart_checkpoint), "--num-samples", "2", "--format", "pngs", "--output", str(out),
            "--quiet"]
    assert "already holds 6 file(s)" in refusal(sample_main, argv, capsys)
    (out / "notes.txt").write_text("mine")
    line = refusal(sample_main, [*argv, "--overwrite"], capsys)
    assert "holds 1 file(s) nvae did not write (notes.txt)" in line
    assert len(list(out.iterdir())) == 7 and (out / "notes.txt").read_text() == "mine"  # nothing deleted
    (out / "notes.txt").unlink()
    sample_main([*argv, "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]
    assert Image.open(out / "000001.png").size == (28, 28)  # a real PNG


def partial_then(error: BaseException, after: int) -> Callable[..., None]:
    """A ``save_image`` that writes ``after`` files, then half a file and raises ``error``."""
    from torchvision.utils import save_image

    calls = []

    def fake(tensor: torch.Tensor, fp: Any, format: Any = None) -> None:
        calls.append(fp)
        if len(calls) > after:
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")
            raise error
        save_image(tensor, fp, format=format)

    return fake


@pytest.mark.parametrize("error, expected", [(ENOSPC, "No space left on device; nothing was written there; "
                                                      "2 of 4 images (complete) are in"),
                                             (KeyboardInterrupt(), "sample.py: interrupted")])
def test_a_failed_or_interrupted_png_write_leaves_no_partial_file(
        quickstart_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], error: BaseException, expected: str) -> None:
    import nvae.cli.outputs as outputs

    real = outputs.write_png
    calls: list = []

    def fails_on_the_third(image: torch.Tensor, fp: Path) -> None:  # a partial file, then the error
        calls.append(fp)
        if len(calls) > 2:
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")
            raise error
        real(image, fp)

    monkeypatch.setattr(outputs, "write_png", fails_on_the_third)
    out = tmp_path / "pngs"
    line = refusal(sample_main, ["--checkpoint", str(quickstart_checkpoint), "--num-samples", "4", "--format", "pngs",
                                 "--output", str(out), "--quiet"], capsys)
    assert expected in line
    if error is ENOSPC:
        assert f"cannot write '{out / '000002.png'}'" in line
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]  # no 000002.png, no .tmp
    for name in ("000000.png", "000001.png"):
        Image.open(out / name).load()  # complete


def test_a_failed_grid_or_recon_write_leaves_nothing_at_the_output_name(
        quickstart_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import nvae.cli.outputs as outputs

    monkeypatch.setattr(outputs, "save_image", partial_then(ENOSPC, after=0))
    grid, recon = tmp_path / "grid.png", tmp_path / "recon.png"
    ck = str(quickstart_checkpoint)
    line = refusal(sample_main, ["--checkpoint", ck, "--num-samples", "3", "--output", str(grid), "--quiet"], capsys)
    assert line == f"sample.py: error: cannot write '{grid}': No space left on device; nothing was written there"
    line = refusal(evaluate_main, ["recon", "--checkpoint", ck, "--num-images", "2", "--output", str(recon)], capsys)
    assert line.startswith(f"evaluate.py: error: cannot write '{recon}'")
    assert not grid.exists() and not recon.exists() and leftovers(tmp_path) == []


class DiskFull:
    """A binary file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, path: Any, mode: str, room: int) -> None:
        self.file, self.room = open(path, mode), room

    def write(self, data: bytes) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise ENOSPC
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> "DiskFull":
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def test_a_disk_filling_up_mid_npz_leaves_no_file(quickstart_checkpoint: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import nvae.cli.outputs as outputs

    monkeypatch.setattr(outputs, "open", lambda path, mode: DiskFull(path, mode, room=3000), raising=False)
    out = tmp_path / "s.npz"
    line = refusal(sample_main, ["--checkpoint", str(quickstart_checkpoint), "--num-samples", "40", "--batch-size",
                                 "10", "--format", "npz", "--output", str(out), "--quiet"], capsys)
    assert line == f"sample.py: error: cannot write '{out}': No space left on device; nothing was written there"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_fid_refuses_a_damaged_png_naming_it(tmp_path: Path, tiny_inception: None, damage: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(images / f"{i:06d}.png")
    bad = images / "000002.png"
    bad.write_bytes(bad.read_bytes()[:-20] if damage == "truncated" else b"text, not a PNG")
    ref = image_npz(tmp_path / "ref.npz", 8, 1)
    line = refusal(evaluate_main, ["fid", "--images", str(images), "--reference", str(ref), "--quiet"], capsys)
    assert line.startswith(f"evaluate.py: --images: cannot read image '{bad}'"), line


# ------------------------------------------------------------------------------------------ 6. streaming
def one_batch_alive(real: Callable[..., Iterator[torch.Tensor]], seen: list[int]) -> Callable[..., Iterator]:
    """``real`` (an image generator) checking that batches before the last one given out are freed."""
    def spy(*args: Any, **kwargs: Any) -> Iterator[torch.Tensor]:
        refs: list[weakref.ref] = []
        for batch in real(*args, **kwargs):
            assert all(r() is None for r in refs[:-1]), "earlier batches are still held"
            refs.append(weakref.ref(batch))
            seen.append(batch.shape[0])
            yield batch
            del batch

    return spy


@pytest.mark.parametrize("fmt", ["npz", "pngs"])
def test_sample_streams_batches_and_keeps_the_images_of_each_seed(
        quickstart_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    import nvae.cli.sample as sample
    from nvae.sampling import iter_samples

    seen: list[int] = []
    monkeypatch.setattr(sample, "iter_samples", one_batch_alive(iter_samples, seen))
    out = tmp_path / f"out.{fmt}"
    sample_main(["--checkpoint", str(quickstart_checkpoint), "--num-samples", "11", "--batch-size", "4", "--seed",
                 "7", "--temperature", "0.8", "--format", fmt, "--output", str(out), "--quiet"])
    assert seen == [4, 4, 3]
    if fmt == "npz":
        images = np.load(out, allow_pickle=False)["images"]
    else:
        images = np.stack([np.asarray(Image.open(out / f"{i:06d}.png"))[None] for i in range(11)])  # gray PNGs
    model = load_checkpoint(quickstart_checkpoint).model
    expected = []
    for b, n in enumerate([4, 4, 3]):  # the per-batch seeds, as sampling has always drawn them
        torch.manual_seed(image_seed(7, b))
        x = model.sample(n, 0.8, mean=True)[..., 2:-2, 2:-2]
        expected.append((x.float() * 255).round().clamp(0, 255).to(torch.uint8).numpy())
    assert images.dtype == np.uint8 and np.array_equal(images, np.concatenate(expected))


def test_fid_takes_features_of_each_generated_batch_as_it_comes(
        quickstart_checkpoint: Path, tmp_path: Path, tiny_inception: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import nvae.cli.fid as fid_cli
    from nvae.sampling import iter_samples

    seen: list[int] = []
    monkeypatch.setattr(fid_cli, "iter_samples", one_batch_alive(iter_samples, seen))
    ref = tmp_path / "ref.npz"
    np.savez(ref, images=np.random.default_rng(0).integers(0, 256, (12, 1, 28, 28), dtype=np.uint8))
    res = evaluate_main(["fid", "--checkpoint", str(quickstart_checkpoint), "--num-samples", "12", "--batch-size", "5",
                         "--reference", str(ref), "--quiet"])
    assert seen == [5, 5, 2] and res["num_generated"] == 12


# ------------------------------------------------------------------------------------------ 7. devices
def is_kind(path: Path, kind: str) -> bool:
    return (stat.S_ISFIFO if kind == "named pipe" else stat.S_ISCHR)(os.lstat(path).st_mode)


@pytest.mark.parametrize("kind", ["character device", "named pipe"])
def test_an_output_that_is_a_device_or_pipe_is_refused_never_replaced(
        kind: str, quickstart_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import nvae.cli.outputs as outputs

    node = special_file(tmp_path / "fakenull", kind)
    never = ["--checkpoint", str(tmp_path / "never-read.ckpt")]
    cases = [(sample_main, [*never, "--format", "npz", "--output", str(node)], f"sample.py: error: --output '{node}'"),
             (sample_main, [*never, "--output", str(node)], "sample.py: error: --output"),
             (sample_main, [*never, "--format", "pngs", "--output", str(node)], "sample.py: error: --output"),
             (evaluate_main, ["recon", *never, "--output", str(node)], "evaluate.py: error: --output"),
             (evaluate_main, ["nll", *never, "--per-image", str(node)], "evaluate.py: error: --per-image"),
             (evaluate_main, ["fid", *never, "--stats-cache", str(node)], "evaluate.py: error: --stats-cache")]
    for run, argv, expected in cases:
        line = refusal(run, argv, capsys)
        assert line.startswith(expected) and f"'{node}' is a {kind}, not a " in line, (argv, line)
    assert line.endswith(f"'{node}' is a {kind}, not a folder; nvae never replaces it")
    with pytest.raises(outputs.OutputError, match=f"is a {kind}, not a file; nvae never replaces it"):
        outputs.save_text("late", node)  # became one after the checks: the rename is refused too
    assert is_kind(node, kind) and sorted(p.name for p in tmp_path.iterdir()) == ["fakenull"]
    link = tmp_path / "link.npz"  # a symlink to it is fine: the rename replaces the link, not the node
    link.symlink_to(node)
    sample_main(["--checkpoint", str(quickstart_checkpoint), "--num-samples", "2", "--format", "npz", "--output",
                 str(link), "--quiet"])
    assert link.is_file() and not link.is_symlink() and is_kind(node, kind)
    assert np.load(link)["images"].shape == (2, 1, 28, 28)


# ------------------------------------------------------------------------------------------ 8. BN cache
@pytest.fixture
def own_checkpoint(quickstart_checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the quickstart checkpoint (size and mtime kept) whose bn_cache folder is this test's."""
    (tmp_path / "run").mkdir()
    return Path(shutil.copy2(quickstart_checkpoint, tmp_path / "run" / "last.ckpt"))


def test_the_bn_cache_is_written_through_a_fresh_name_not_a_link_placed_there(own_checkpoint: Path,
                                                                               tmp_path: Path) -> None:
    from nvae.sampling import bn_cache_path

    cache = bn_cache_path(own_checkpoint, 1.0, 2, 2)
    cache.parent.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    trap = cache.with_suffix(".tmp")  # the name the cache was once written under
    trap.symlink_to(victim)
    sample_main(["--checkpoint", str(own_checkpoint), "--num-samples", "2", "--readjust-bn", "2", "--bn-batch-size",
                 "2", "--output", str(tmp_path / "s.png"), "--quiet"])
    assert victim.read_bytes() == b"precious" and trap.is_symlink()
    assert sorted(p.name for p in cache.parent.iterdir()) == sorted([cache.name, trap.name])
    assert torch.load(cache, weights_only=True)  # the statistics, complete


def poisoned(state: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` with one statistic made hostile, and the words its refusal must hold."""
    state = {k: v.clone() for k, v in state.items()}
    mean, var, count = (next(k for k in state if k.endswith(end))
                        for end in ("running_mean", "running_var", "num_batches_tracked"))
    if kind == "nan":
        state[mean].fill_(float("nan"))
        return state, f"{mean!r} holds non-finite values (NaN or inf)"
    if kind == "negative variance":
        state[var][0] = -1.0
        return state, f"{var!r} holds negative variances"
    if kind == "float count":
        state[count] = torch.tensor(2.5)
        return state, f"{count!r} must be an integer tensor, got torch.float32"
    if kind == "negative count":
        state[count] = torch.tensor(-3)
        return state, f"{count!r} must be >= 0"
    del state[mean]
    return state, "BatchNorm statistic(s) of this model missing"


@pytest.mark.parametrize("kind", ["nan", "negative variance", "float count", "negative count", "missing"])
def test_bn_statistics_that_would_poison_the_model_are_refused(kind: str, quickstart_checkpoint: Path) -> None:
    from nvae.sampling import batchnorm_state, load_batchnorm_state

    model = load_checkpoint(quickstart_checkpoint).model
    before = batchnorm_state(model)
    bad, words = poisoned(before, kind)
    with pytest.raises(ValueError) as err:
        load_batchnorm_state(model, bad, "BN cache 'x.pt'")
    assert str(err.value).startswith("BN cache 'x.pt': ") and words in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in batchnorm_state(model).items())  # nothing copied


@pytest.mark.parametrize("content", ["garbage", "zip of junk", "nan"])
def test_a_garbage_or_poisoned_bn_cache_is_one_line_naming_the_file(
        content: str, own_checkpoint: Path, tmp_path: Path, tiny_inception: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    from nvae.sampling import batchnorm_state, bn_cache_path

    cache = bn_cache_path(own_checkpoint, 1.0, 2, 2)
    cache.parent.mkdir()
    if content == "garbage":  # echo garbage > bn_cache/KEY.pt
        cache.write_text("garbage\n")
        words = f"BN cache '{cache}' is not in torch.save's zip format"
    elif content == "zip of junk":
        with zipfile.ZipFile(cache, "w") as zf:
            zf.writestr("archive/data.pkl", b"garbage")
        words = f"BN cache '{cache}' is not a statistics file that nvae wrote (RuntimeError); delete it to recompute"
    else:
        state, key = poisoned(batchnorm_state(load_checkpoint(own_checkpoint).model), "nan")
        torch.save(state, cache)
        words = f"BN cache '{cache}': {key}"
    kept = cache.read_bytes()
    out = tmp_path / "s.png"
    bn = ["--checkpoint", str(own_checkpoint), "--readjust-bn", "2", "--bn-batch-size", "2", "--quiet"]
    line = refusal(sample_main, [*bn, "--num-samples", "2", "--output", str(out)], capsys)
    assert line.startswith(f"sample.py: {words}"), line
    ref = image_npz(tmp_path / "ref.npz", 4, 1)
    line = refusal(evaluate_main, ["fid", *bn, "--num-samples", "4", "--batch-size", "2", "--reference", str(ref)],
                   capsys)
    assert line.startswith(f"evaluate.py: {words}"), line
    assert cache.read_bytes() == kept and not out.exists()


# ------------------------------------------------------------------------------------------ 9. FID files
def crafted_npz(path: Path, arrays: dict[str, Any]) -> Path:
    """An .npz (deflated) of real arrays, and of ``(shape, dtype)`` members that hold only the .npy header
    declaring that shape: what a small file can claim without holding the data."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w") as member:
                if isinstance(value, tuple):
                    shape, dtype = value
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                              "shape": shape}
                    np.lib.format.write_array_header_1_0(member, header)
                else:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
    return path


@pytest.fixture
def no_array_read(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The shapes of the arrays nvae reads (np.lib.format.read_array's results)."""
    real, read = np.lib.format.read_array, []

    def spy(*args: Any, **kwargs: Any) -> np.ndarray:
        array = real(*args, **kwargs)
        read.append(array.shape)
        return array

    monkeypatch.setattr(np.lib.format, "read_array", spy)
    return read


HUGE = ((16000, 16000), np.float32)  # 1 GB declared by a header of 128 bytes
REFERENCES = [
    ({"mu": np.zeros(4), "sigma": np.eye(4), "count": np.array([1, 2])},
     "count must be one integer (the number of images), got (2,) int64 (not read)"),
    ({"mu": np.zeros(4), "sigma": HUGE}, "FID statistics are mu (D,) and sigma (D, D); the file declares mu (4,) "
                                         "and sigma (16000, 16000) (not read)"),
    ({"mu": ((20000,), np.float32), "sigma": ((20000, 20000), np.float32)},
     "statistics of 20000 features; at most 16384 are read (8x Inception-v3's 2048) (not read)"),
    ({"mu": np.zeros(4), "sigma": np.eye(4) * 1j}, "sigma must hold floats or integers, got complex128 (not read)"),
    ({"mu": np.zeros(4), "sigma": np.eye(4), "count": np.int64(1)},
     "count must be the number of images (at least 2), got 1"),
    ({"mu": np.full(4, np.nan), "sigma": np.eye(4)}, "mu or sigma holds non-finite values (NaN or inf)"),
    ({"mu": np.zeros(4), "sigma": np.eye(4), "key": np.arange(3)}, "key must be one string, got (3,) int64 (not read)"),
    ({"mu": ((2048,), np.float64), "sigma": ((2048, 2048), np.float64)},
     "mu (2048,) float64 and sigma (2048, 2048) float64 need at least 96.0 MiB, more than the 1.0 MiB this machine "
     "has available; nothing was read"),
]


@pytest.mark.parametrize("arrays, words", REFERENCES)
def test_reference_statistics_are_checked_by_their_headers_before_they_are_read(
        arrays: dict[str, Any], words: str, tmp_path: Path, tiny_inception: None, no_array_read: list[tuple],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import nvae.limits

    monkeypatch.setattr(nvae.limits, "available_memory", lambda: 2 ** 20)
    gen, ref = image_npz(tmp_path / "gen.npz", 4, 0), crafted_npz(tmp_path / "r.npz", arrays)
    line = refusal(evaluate_main, ["fid", "--images", str(gen), "--reference", str(ref), "--quiet"], capsys)
    assert line == f"evaluate.py: --reference: '{ref}': {words}", line
    assert all(math.prod(shape) <= 16 for shape in no_array_read), no_array_read  # only the small arrays


@pytest.mark.parametrize("declared, words", [
    (((1000, 3, 64, 64), np.uint8), "images 'images' (1000, 3, 64, 64) uint8 need at least 11.7 MiB, more than "
                                    "the 1.0 MiB this machine has available; nothing was read"),
    (((1000, 64, 64, 3), np.uint8), "need at least 23.4 MiB"),  # and its (N, C, H, W) copy
    (((10, 5, 12, 12), np.uint8), "cannot find a channel axis of size 1 or 3 in shape (10, 5, 12, 12)"),
    (((10, 12, 12), np.int32), "expected uint8 images (or float in [0, 1]), got int32"),
    (((10, 12), np.uint8), "expected images (N, H, W, C) or (N, C, H, W), got shape (10, 12)")])
def test_an_images_npz_is_checked_by_its_header_before_it_is_read(
        declared: tuple, words: str, tmp_path: Path, tiny_inception: None, no_array_read: list[tuple],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import nvae.limits

    monkeypatch.setattr(nvae.limits, "available_memory", lambda: 2 ** 20)
    images, ref = crafted_npz(tmp_path / "x.npz", {"images": declared}), image_npz(tmp_path / "ref.npz", 4, 1)
    line = refusal(evaluate_main, ["fid", "--images", str(images), "--reference", str(ref), "--quiet"], capsys)
    assert line.startswith("evaluate.py: --images: ") and str(images) in line and words in line, line
    assert no_array_read == []
