"""The official NVAE checkpoints: converted, nvae computes what the official code computed.

The outside truth is ../shared/fixtures/official (made by the official code; never regenerated here):
three small trained checkpoints with the official model's outputs on a batch, every posterior sample
at its mean, and the state-dict manifests of the six paper presets.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import yaml
from torch.utils.data import Dataset

from nvae.checkpoint import OFFICIAL_KEY, load_checkpoint, read_checkpoint
from nvae.cli.convert import main as convert_main
from nvae.convert import convert
from nvae.data import ImageDataModule, register_datamodule
from nvae.model import NVAE
from nvae.official import (OfficialFormatError, head_permutation, key_map, layout_keys, parameter_names,
                           read_official, run_from_args, to_nvae)
from nvae.spec import ImageSpec

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official"
CASES = ["mnist_tiny", "cifar10_tiny", "celeba64_tiny_5bit"]
PRESETS = ["mnist", "cifar10", "celeba64", "imagenet32", "celebahq256", "ffhq256"]
# float32 on CPU: the fixtures' README expects agreement to ~1e-5 relative; 1e-4 leaves a factor 10.
RTOL = 1e-4
# A group's KL with flows is log q - log p at one point: a difference of two float32 sums of 10^2-10^4
# terms of order 1, whose rounding (~1e-5 nats, measured up to 4.9e-5) does not shrink with the difference.
KL_ATOL = 1e-4

# CI has ../shared beside the clone: there a missing fixture folder fails instead of skipping
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir() and not os.environ.get("CI"), reason="no official fixtures")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("converted")
    return {case: Path(convert(FIXTURES / case / "checkpoint.pt", folder / f"{case}.ckpt")["checkpoint"])
            for case in CASES}


def unrounded_mean(likelihood: Any) -> torch.Tensor:
    return likelihood.mean(quantize=False)


# The layouts the official code writes: flat (SYNC_BN = False), its default (SyncBatchNorm wrappers), and
# the default as the November 2020 releases hold it (args without later fields, no aliases, cuda:0 storages).
FILES = ["checkpoint.pt", "checkpoint_syncbn.pt", "checkpoint_released.pt"]


@pytest.fixture(scope="module")
def converted_files(tmp_path_factory: pytest.TempPathFactory, converted: dict[str, Path]) -> dict[tuple, Path]:
    """Every case in every layout, as a .ckpt and (released) as a model directory."""
    folder = tmp_path_factory.mktemp("layouts")
    out = {(case, "checkpoint.pt", "ckpt"): converted[case] for case in CASES}
    for case in CASES:
        for name in FILES[1:]:
            out[(case, name, "ckpt")] = Path(convert(FIXTURES / case / name, folder / f"{case}-{name}.ckpt")["checkpoint"])
        out[(case, "checkpoint_released.pt", "dir")] = Path(
            convert(FIXTURES / case / "checkpoint_released.pt", folder / f"{case}-released")["checkpoint"])
    return out


@pytest.mark.parametrize("name, form", [(name, "ckpt") for name in FILES] + [("checkpoint_released.pt", "dir")])
@pytest.mark.parametrize("case", CASES)
def test_converted_model_computes_the_official_function(case: str, name: str, form: str,
                                                        converted_files: dict[tuple, Path]) -> None:
    ref = torch.load(FIXTURES / case / "reference.pt", weights_only=True)
    model = load_checkpoint(converted_files[(case, name, form)]).model
    x = ref["x"]
    with torch.no_grad():
        out = model(x, use_mean=True)
        recon_nll = -model.log_likelihood(out.likelihood, x)
    nelbo = recon_nll + out.kl.sum(dim=1)
    assert out.kl.shape == ref["kl"].shape  # (B, G), top group first
    deviation = {}
    for name, ours, atol in (("kl", out.kl, KL_ATOL), ("recon_nll", recon_nll, 0.0), ("nelbo", nelbo, 0.0),
                             ("log_q", out.log_q, 0.0), ("log_p", out.log_p, 0.0)):
        torch.testing.assert_close(ours, ref[name], rtol=RTOL, atol=atol, msg=lambda m: f"{case} {name}: {m}")
        deviation[name] = ((ours - ref[name]).abs() / ref[name].abs()).max().item()
    # the likelihood's mean as the official code gives it (not rounded to the bit grid): 1e-4 absolute
    mean = unrounded_mean(out.likelihood)
    torch.testing.assert_close(mean, ref["recon_mean"], rtol=0, atol=1e-4)
    with torch.no_grad():
        prior = model.traverse(x.shape[0], None, temperature=0.0)  # the likelihood of sample(B, temperature=0)
        images = model.sample(x.shape[0], temperature=0.0)
    torch.testing.assert_close(unrounded_mean(prior.likelihood), ref["sample_mean_t0"], rtol=0, atol=1e-4)
    # sample() returns nvae's mean: on the bit grid for multi-bit data, so within half a grid step
    half_step = 0.5 / (2 ** model.spec.num_bits - 1) if model.spec.num_bits > 1 else 0.0
    assert (images - ref["sample_mean_t0"]).abs().max() <= half_step + 1e-4
    deviation["recon_mean_abs"] = (mean - ref["recon_mean"]).abs().max().item()
    print(f"{case}: largest deviations {json.dumps({k: float(f'{v:.2e}') for k, v in deviation.items()})}")


def test_mnist_fixture_is_binary_and_the_likelihood_skips_the_padding(converted: dict[str, Path]) -> None:
    model = load_checkpoint(converted["mnist_tiny"]).model
    assert model.spec == ImageSpec(channels=1, size=32, num_bits=1, pad=2)
    ref = torch.load(FIXTURES / "mnist_tiny" / "reference.pt", weights_only=True)
    assert set(ref["x"].unique().tolist()) <= {0.0, 1.0}


def test_exact_bins_are_another_likelihood_of_the_same_network(converted: dict[str, Path]) -> None:
    """The official bins count 8-bit level 254 as a top edge bin: exact bins give a different, nearby NLL."""
    ref = torch.load(FIXTURES / "cifar10_tiny" / "reference.pt", weights_only=True)
    model = load_checkpoint(converted["cifar10_tiny"]).model
    assert model.cfg.dmol_bins == "official"
    with torch.no_grad():
        likelihood = model(ref["x"], use_mean=True).likelihood
        official = -model.log_likelihood(likelihood, ref["x"])
        likelihood.bins = "exact"
        exact = -model.log_likelihood(likelihood, ref["x"])
    torch.testing.assert_close(official, ref["recon_nll"], rtol=RTOL, atol=0)
    assert not torch.allclose(exact, official, rtol=1e-6, atol=0)
    assert ((exact - official).abs() / official).max() < 0.05


# ------------------------------------------------------------------------------------------ manifests
def manifest(preset: str) -> dict[str, Any]:
    return json.loads((FIXTURES / "manifest" / f"{preset}.json").read_text())


@pytest.mark.parametrize("preset", PRESETS)
def test_every_official_tensor_has_exactly_one_place(preset: str) -> None:
    m = manifest(preset)
    run = run_from_args(m["args"])
    with torch.device("meta"):  # the shapes, not 100s of MB
        model = NVAE(run.spec, run.arch)
        state: dict[str, torch.Tensor] = {k: torch.empty(shape) for k, shape in m["state_dict"].items()}
    for key in state:  # the official alias: the same tensor as its weight
        if key.endswith(".weight_normalized"):
            state[key] = state[key[:-len("_normalized")]]
    assert sum(p.numel() for p in model.parameters()) == m["params"]  # the official count, exactly
    keys = key_map(model)
    official = [k for k in m["state_dict"] if not k.endswith(".weight_normalized")]
    assert sorted(keys.values()) == sorted(official)  # every official tensor used, none twice
    assert set(keys) == set(model.state_dict())  # every nvae tensor filled
    converted = to_nvae(state, model, keys)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in
                                                                  model.state_dict().items()}
    assert len(parameter_names(state)) == sum(1 for _ in model.parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_the_default_layout_of_every_preset_maps_both_ways(preset: str) -> None:
    """manifest-released: the official default build's names (SyncBatchNorm wrappers); the layout is
    recognized from the names alone and every tensor has exactly one place, both ways."""
    m = json.loads((FIXTURES / "manifest-released" / f"{preset}.json").read_text())
    run = run_from_args(m["args"])
    with torch.device("meta"):
        model = NVAE(run.spec, run.arch)
        state = {k: torch.empty(shape) for k, shape in m["state_dict"].items() if not k.endswith("_normalized")}
    assert sum(p.numel() for p in model.parameters()) == m["params"]
    keys = layout_keys(state, model)
    assert keys == key_map(model, wrapped=True) != key_map(model, wrapped=False)
    assert sorted(keys.values()) == sorted(state) and set(keys) == set(model.state_dict())
    inverse = {theirs: ours for ours, theirs in keys.items()}
    assert len(inverse) == len(keys)  # one official name per nvae tensor and back


@pytest.mark.parametrize("case", CASES)
def test_the_wrapped_names_are_where_the_official_files_differ(case: str) -> None:
    """Outside truth for the structural rule: the nvae tensors whose official name the rule changes are
    exactly those whose names differ between the official flat and default files of the same model."""
    flat, wrapped = (read_official(FIXTURES / case / name)["state_dict"] for name in FILES[:2])
    run = run_from_args(read_official(FIXTURES / case / "checkpoint.pt")["args"])
    with torch.device("meta"):
        model = NVAE(run.spec, run.arch)
    plain, deep = key_map(model, wrapped=False), key_map(model, wrapped=True)
    moved = {plain[k] for k in plain if plain[k] != deep[k]}
    assert moved == set(flat) - set(wrapped) and {deep[k] for k in deep if plain[k] != deep[k]} == set(wrapped) - set(flat)
    for ours, theirs in deep.items():
        assert torch.equal(wrapped[theirs], flat[plain[ours]]), ours  # the same trained model in both files


@pytest.mark.parametrize("wrapped", [True, False])
def test_a_model_not_among_the_fixtures_converts_in_both_layouts(wrapped: bool, tmp_path: Path) -> None:
    """Other scales, groups, mixtures and flows than any fixture (3 scales, halving groups with a floor,
    4 mixtures, 2 flow pairs, 2 cells per group): its state dict written under official names in either
    layout, as an official file, converts back to the same tensors (the head reordered both ways)."""
    args = argparse.Namespace(**{**vars(read_official(FIXTURES / "cifar10_tiny" / "checkpoint.pt")["args"]),
                                 "num_latent_scales": 3, "num_groups_per_scale": 4, "ada_groups": True,
                                 "min_groups_per_scale": 2, "num_mixture_dec": 4, "num_nf": 2,
                                 "num_cell_per_cond_dec": 1})
    run = run_from_args(args)
    torch.manual_seed(0)
    model = NVAE(run.spec, run.arch)
    keys = key_map(model, wrapped)
    perm = head_permutation(model)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    official = {theirs: (model.state_dict()[ours][inverse] if ours.startswith("head.1.") else model.state_dict()[ours])
                for ours, theirs in keys.items() if not ours.endswith((".u", ".v"))}
    src = tmp_path / "official.pt"
    torch.save({"args": args, "state_dict": official, "epoch": 0, "global_step": 0}, src)
    back = load_checkpoint(Path(convert(src, tmp_path / "back.ckpt")["checkpoint"])).model
    for key, value in model.state_dict().items():
        if not key.endswith((".u", ".v")):  # power-iteration vectors are not in official files
            assert torch.equal(back.state_dict()[key], value), key


def test_args_without_later_fields_are_filled_and_a_network_field_is_required(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    ckpt = read_official(FIXTURES / "mnist_tiny" / "checkpoint.pt")
    args = vars(ckpt["args"])
    for name in ("learning_rate", "kl_anneal_portion", "weight_decay_norm_init", "batch_size", "min_groups_per_scale"):
        args.pop(name)  # (mnist_tiny was trained with these values; its ada_groups True must stay: False is another net)
    src = tmp_path / "old.pt"
    torch.save(ckpt, src)
    convert_main([str(src), str(tmp_path / "old.ckpt")])
    out = capsys.readouterr().out
    assert ("official args lacked 5 field(s), filled with the official defaults: min_groups_per_scale=1, "
            "learning_rate=0.01, weight_decay_norm_init=10.0, kl_anneal_portion=0.3, batch_size=200") in out
    assert read_checkpoint(tmp_path / "old.ckpt")["hyper_parameters"]["optim"]["learning_rate"] == 0.01
    args.pop("num_latent_scales")
    torch.save(ckpt, src)
    with pytest.raises(SystemExit):
        convert_main([str(src), str(tmp_path / "bad.ckpt")])
    err = capsys.readouterr().err.strip()
    assert err.count("official args:") == 1 and "no field 'num_latent_scales'" in err and "\n" not in err


def test_a_leftover_or_missing_tensor_is_named() -> None:
    m = manifest("mnist")
    run = run_from_args(m["args"])
    with torch.device("meta"):
        model = NVAE(run.spec, run.arch)
        state = {k: torch.empty(shape) for k, shape in m["state_dict"].items() if not k.endswith("_normalized")}
        with pytest.raises(OfficialFormatError, match="official tensor 'extra.weight' .* no place"):
            to_nvae({**state, "extra.weight": torch.empty(3)}, model)
        del state["stem.bias"]
        with pytest.raises(OfficialFormatError, match="no 'stem.bias'"):
            to_nvae(state, model)


@pytest.mark.parametrize("field, value, message", [
    ("arch_instance", "res_wnelu", "arch_instance 'res_wnelu'"),
    ("num_mixture_dec", 1, "num_mixture_dec 1"),
    ("dataset", "omniglot", "dataset 'omniglot'"),
    ("num_channels_dec", 64, "num_channels_enc 32 differs from num_channels_dec 64"),
    ("num_groups_per_scale", 1, "vanilla-VAE"),
])
def test_what_nvae_does_not_build_stops_with_the_field(field: str, value: Any, message: str) -> None:
    args = manifest("cifar10")["args"] if field != "num_channels_dec" else manifest("mnist")["args"]
    args = {**args, field: value}
    if field == "num_groups_per_scale":
        args["num_latent_scales"] = 1
    with pytest.raises(OfficialFormatError, match=message):
        run_from_args(args)


class _Marker:
    """Unpickling this would create a file: it must never run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (Path.touch, (Path(self.path),))


def test_reading_runs_nothing_but_namespace(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(dataset="cifar10"), "x": _Marker(str(marker))}, bad)
    with pytest.raises(OfficialFormatError, match="not a readable official NVAE checkpoint"):
        read_official(bad)
    assert not marker.exists()
    plain = tmp_path / "plain.pt"
    with open(plain, "wb") as f:
        pickle.dump({"a": 1}, f, protocol=2)
    with pytest.raises(OfficialFormatError):
        read_official(plain)


# ------------------------------------------------------------------------------------------ the file written
def test_converted_checkpoint_records_run_data_and_optimizer(converted: dict[str, Path]) -> None:
    official = read_official(FIXTURES / "cifar10_tiny" / "checkpoint.pt")
    ckpt = read_checkpoint(converted["cifar10_tiny"])  # the safe reader every nvae command uses
    assert ckpt["global_step"] == official["global_step"] == ckpt[OFFICIAL_KEY]["global_step"]
    assert ckpt["nvae_data"]["class_path"] == "nvae.data.CIFAR10DataModule"
    assert ckpt["hyper_parameters"]["arch"]["dmol_bins"] == "official"
    # Adamax moments follow their parameter, the head's reordered as its weights are
    model = load_checkpoint(converted["cifar10_tiny"]).model
    keys = key_map(model)
    names = [n for n, _ in model.named_parameters()]
    off_names = parameter_names(official["state_dict"])
    off_state = official["optimizer"]["state"]
    ours = ckpt["optimizer_states"][0]["state"]
    for name in ("stem.weight", "dec_groups.1.prior.1.log_weight_norm", "head.1.weight", "head.1.bias"):
        i, j = names.index(name), off_names.index(keys[name])
        expected = to_nvae({**official["state_dict"], keys[name]: off_state[j]["exp_avg"]}, model, keys)[name]
        torch.testing.assert_close(ours[i]["exp_avg"], expected, rtol=0, atol=0)
        assert float(ours[i]["step"]) == off_state[j]["step"]
    assert len(ours) == len(off_state)


def test_convert_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = FIXTURES / "mnist_tiny" / "checkpoint.pt", tmp_path / "m.ckpt"
    summary = convert_main([str(src), str(dst), "--data-root", "data/mnist"])
    assert "official mnist, epoch 1, step 24" in capsys.readouterr().out
    assert summary["parameters"] == sum(p.numel() for p in load_checkpoint(dst).model.parameters())
    assert read_checkpoint(dst)["nvae_data"]["init_args"]["root"] == "data/mnist"
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(src), str(dst)])
    assert exit_info.value.code == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ round trip
@register_datamodule
class RandomRGB(ImageDataModule):
    """8 random 8-bit RGB 32x32 images for training, 4 held out."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__(root="", batch_size=batch_size)

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(channels=3, size=32, num_bits=8)

    def build_datasets(self) -> tuple[Dataset, Optional[Dataset], Dataset]:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (12, 3, 32, 32), generator=g).float() / 255
        return list(x[:8]), None, list(x[8:])


def test_resume_trains_on_from_the_official_step_and_samples(converted: dict[str, Path], tmp_path: Path) -> None:
    from nvae.cli.sample import main as sample_main
    from nvae.cli.train import main

    ckpt = read_checkpoint(converted["cifar10_tiny"])
    h = ckpt["hyper_parameters"]
    config = {"model": {k: v for k, v in h.items() if k != "image_spec"},
              "data": {"class_path": f"{__name__}.RandomRGB", "init_args": {"batch_size": 4}},
              "trainer": {"max_steps": ckpt["global_step"] + 1, "accelerator": "cpu", "logger": False,
                          "enable_progress_bar": False, "num_sanity_val_steps": 0,
                          "default_root_dir": str(tmp_path),
                          "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                         "init_args": {"save_last": True}}]}}
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path), "--resume", str(converted["cifar10_tiny"])])
    assert cli is not None and cli.trainer.global_step == ckpt["global_step"] + 1
    opt_state = cli.trainer.optimizers[0].state_dict()["state"]
    assert {float(s["step"]) for s in opt_state.values()} == {ckpt["global_step"] + 1.0}
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    out = tmp_path / "s.png"
    sample_main(["--checkpoint", str(last), "--num-samples", "4", "--output", str(out), "--quiet"])
    assert out.is_file()
