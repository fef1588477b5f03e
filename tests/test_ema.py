"""EMA weights with BatchNorm statistics of their own (nvae.ema): what validation and checkpoints use
equals an independent re-estimate, and the live model trains exactly as without them."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import lightning as L
import pytest
import torch
from torch import nn

from conftest import random_images, tiny_config
from nvae.checkpoint import EMA_KEY, STATE_KEY, load_checkpoint
from nvae.ema import WeightEMA, estimate_batchnorm, estimate_seed, estimation_batches, seeded
from nvae.lightning import NVAEModule
from nvae.model import NVAE
from nvae.sampling import batchnorm_state
from test_resilience import SPEC, RandomBinary, fit

BN_BATCHES = 3


def reference_statistics(model: NVAE, step: int, count: int = BN_BATCHES, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """BatchNorm statistics of ``model``'s weights computed without nvae.ema: ``count`` batches of the
    training images drawn as the estimate draws them (a permutation from the step's seed), run in
    train mode; each layer's inputs are read by a hook, and their per-batch means and unbiased
    variances averaged."""
    seed = estimate_seed(0, step)  # the tests seed their runs with 0
    train = RandomBinary().build_datasets()[0]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    sums: dict[str, list[torch.Tensor]] = {n: [torch.zeros(m.num_features, dtype=torch.float64)] * 2
                                           for n, m in layers.items()}

    def record(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            h = args[0].detach().double().transpose(0, 1).flatten(1)  # (C, B*H*W)
            sums[name] = [sums[name][0] + h.mean(dim=1), sums[name][1] + h.var(dim=1, unbiased=True)]
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    model = model.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        for b in range(count):
            model(torch.stack([train[int(i)] for i in order[b * batch_size:(b + 1) * batch_size]]))
    for h in handles:
        h.remove()
    out = {}
    for n in layers:
        out[f"{n}.running_mean"], out[f"{n}.running_var"] = (s.float() / count for s in sums[n])
        out[f"{n}.num_batches_tracked"] = torch.tensor(count)
    return out


def assert_statistics_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool) -> None:
    assert actual.keys() == expected.keys() and len(actual) > 30
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-6)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **tol, msg=key)


def model_with(state: dict[str, torch.Tensor]) -> NVAE:
    model = NVAE(SPEC, tiny_config())
    model.load_state_dict(state)
    return model


class StatisticsDuringValidation(L.Callback):
    """The model's weights and BatchNorm statistics at each validation's first batch, by global step."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_batch_start(self, trainer: L.Trainer, module: NVAEModule, *_: Any) -> None:
        if not trainer.sanity_checking:
            self.seen[trainer.global_step] = {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_validation_runs_the_averages_with_statistics_estimated_for_them(tmp_path: Path) -> None:
    seen = StatisticsDuringValidation()
    _, module = fit(tmp_path, 6, [seen], ema_decay=0.5, ema_bn_batches=BN_BATCHES)
    during = seen.seen[6]  # the validation after step 6 (the end of the first epoch)
    ema = module.run_callbacks.ema.ema
    for name, average in ema.params.items():
        torch.testing.assert_close(during[name], average, rtol=0, atol=0, msg=name)
    expected = reference_statistics(model_with(during), step=6)
    assert_statistics_equal({k: during[k] for k in expected}, expected, exact=False)
    live = batchnorm_state(module.model)  # put back after validation: the live model's own
    assert not torch.equal(live["preprocess.0.branch.0.running_mean"], during["preprocess.0.branch.0.running_mean"])


def test_the_live_model_trains_as_without_the_ema(tmp_path: Path) -> None:
    """Validations and checkpoints estimate statistics for the averages between training steps; the live
    weights, statistics and optimizer state end bit-identical to a run without any EMA."""
    def saving() -> list[L.Callback]:
        return [L.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=4, save_top_k=-1, filename="{step}")]

    with_ema, _ = fit(tmp_path / "ema", 10, saving(), ema_decay=0.5, ema_bn_batches=BN_BATCHES)
    without, _ = fit(tmp_path / "plain", 10, saving())
    a, b = (torch.load(Path(t.checkpoint_callback.dirpath) / "step=8.ckpt", weights_only=True) for t in (with_ema, without))
    assert EMA_KEY in a and EMA_KEY not in b
    for key in b[STATE_KEY]:
        torch.testing.assert_close(a[STATE_KEY][key], b[STATE_KEY][key], rtol=0, atol=0, msg=key)
    for i, state in b["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(a["optimizer_states"][0]["state"][i][name], value, rtol=0, atol=0)


def test_checkpoints_carry_the_averages_with_their_statistics(tmp_path: Path) -> None:
    """Written at a step without validation (estimated at saving) and after a validation (the statistics
    it used): ``nvae_ema`` is the averages with statistics of their own, and what load_checkpoint gives."""
    seen = StatisticsDuringValidation()
    saving = L.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer, module = fit(tmp_path, 6, [saving, seen], ema_decay=0.5, ema_bn_batches=BN_BATCHES)
    folder = Path(trainer.checkpoint_callback.dirpath)
    at3 = torch.load(folder / "step=3.ckpt", weights_only=True)
    entry = at3[EMA_KEY]
    expected = reference_statistics(model_with(entry), step=3)
    assert_statistics_equal({k: entry[k] for k in expected}, expected, exact=False)
    live = {k[len("model."):]: v for k, v in at3[STATE_KEY].items() if k.startswith("model.")}
    assert not torch.equal(live["preprocess.0.branch.0.running_var"], entry["preprocess.0.branch.0.running_var"])
    torch.save({**at3, EMA_KEY: entry}, tmp_path / "copy.ckpt")
    loaded = load_checkpoint(tmp_path / "copy.ckpt")
    assert loaded.weights == "ema"
    assert_statistics_equal(batchnorm_state(loaded.model), {k: entry[k] for k in expected}, exact=True)
    at6 = torch.load(folder / "step=6.ckpt", weights_only=True)[EMA_KEY]  # written after the validation at step 6
    assert_statistics_equal({k: at6[k] for k in expected}, {k: seen.seen[6][k] for k in expected}, exact=True)
    assert module.run_callbacks.ema.ema.stats is not None  # kept: the average did not move since


class WeightsWhenSampling(L.Callback):
    """The model's state dict at every ``model.sample`` call."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer: L.Trainer, module: NVAEModule) -> None:
        sample = module.model.sample

        def recorded(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.seen.append({k: v.detach().clone() for k, v in module.model.state_dict().items()})
            return sample(*args, **kwargs)

        module.model.sample = recorded  # type: ignore[method-assign]


def test_the_final_sample_grids_show_the_averages_with_their_statistics(tmp_path: Path) -> None:
    from nvae.callbacks import SampleGrid

    grid, seen = SampleGrid(num_samples=1, temperatures=[1.0], num_reconstructions=0), WeightsWhenSampling()
    _, module = fit(tmp_path, 4, [grid, seen], ema_decay=0.5, ema_bn_batches=BN_BATCHES)
    assert grid.last_path is not None and grid.last_path.name == "final_t1.png"
    final, ema = seen.seen[-1], module.run_callbacks.ema.ema
    expected = {**ema.params, **ema.stats}
    assert_statistics_equal({k: final[k] for k in ema.stats}, ema.stats, exact=True)
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(final["preprocess.0.branch.0.running_var"],
                           module.model.state_dict()["preprocess.0.branch.0.running_var"])  # swapped back


def test_the_average_warms_up_its_decay_so_the_initialization_fades() -> None:
    """After step n the average moves by 1 - min(decay, (1 + n) / (10 + n)) towards the live weights:
    the closed form over five steps; with a fixed 0.99 the initialization would keep 0.99^5 = 95%."""
    layer = nn.Linear(3, 2, bias=False)
    ema = WeightEMA(layer, decay=0.99)
    expected = layer.weight.detach().double().clone()
    for step in range(1, 6):
        with torch.no_grad():
            layer.weight.copy_(torch.full((2, 3), float(step)))
        ema.update(layer, step)
        d = min(0.99, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * step
    torch.testing.assert_close(ema.params["weight"].double(), expected, rtol=1e-6, atol=1e-6)
    assert ema.decay_at(10**6) == 0.99 and ema.decay_at(1) == pytest.approx(2 / 11)


def test_estimating_leaves_the_model_as_it_found_it(tiny_binary: NVAE) -> None:
    before = copy.deepcopy(tiny_binary.state_dict())
    momenta = [m.momentum for m in tiny_binary.modules() if isinstance(m, nn.BatchNorm2d)]
    tiny_binary.eval()
    images = list(random_images(SPEC, n=12, seed=5))
    batches = estimation_batches(images, 4, 5, torch.stack, torch.Generator().manual_seed(1))
    stats, counted = estimate_batchnorm(tiny_binary, batches, tiny_binary)
    assert counted == 5 and all(int(v) == 5 for k, v in stats.items() if k.endswith("num_batches_tracked"))
    assert not torch.equal(stats["preprocess.0.branch.0.running_var"], before["preprocess.0.branch.0.running_var"])
    for key, value in before.items():
        torch.testing.assert_close(tiny_binary.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert not tiny_binary.training
    assert [m.momentum for m in tiny_binary.modules() if isinstance(m, nn.BatchNorm2d)] == momenta


def test_the_estimate_draws_from_its_own_seed_and_puts_every_rng_back() -> None:
    import random

    import numpy as np

    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with seeded(7, torch.device("cpu")):
        inside = torch.rand(3), random.random(), np.random.rand()
    with seeded(7, torch.device("cpu")):
        again = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(inside[0], again[0]) and inside[1:] == again[1:]
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()


def test_synchronized_batchnorm_is_estimated_without_a_collective(tiny_binary: NVAE,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An emergency checkpoint is written by rank 0 alone: SyncBatchNorm may not wait for the other
    processes. With torch.distributed reporting a process group, SyncBatchNorm's own forward would
    synchronize (on CPU it refuses outright); the estimate normalizes locally and equals BatchNorm's."""
    images = list(random_images(SPEC, n=8, seed=5))
    batches = lambda: estimation_batches(images, 4, 2, torch.stack, torch.Generator().manual_seed(1))  # noqa: E731
    torch.manual_seed(3)
    plain, _ = estimate_batchnorm(tiny_binary, batches(), tiny_binary)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(tiny_binary))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    torch.manual_seed(3)
    stats, counted = estimate_batchnorm(synced, batches(), synced)
    assert counted == 2
    assert_statistics_equal(stats, plain, exact=True)
    assert all(type(m).forward is nn.SyncBatchNorm.forward and "forward" not in vars(m)
               for m in synced.modules() if isinstance(m, nn.SyncBatchNorm))  # its own forward again


@pytest.mark.parametrize("value", [0, -1, 10**9, True, "50", 2.5])
def test_a_bad_ema_bn_batches_is_one_line_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match=r"^model.ema_bn_batches must be an integer in 1..10000, got "):
        NVAEModule(arch=tiny_config(), image_spec=SPEC, ema_decay=0.9, ema_bn_batches=value)  # type: ignore[arg-type]


class WeightsWhenTesting(L.Callback):
    """The model's state dict at the first test batch."""

    def __init__(self) -> None:
        self.seen: Optional[dict[str, torch.Tensor]] = None

    def on_test_batch_start(self, trainer: L.Trainer, module: NVAEModule, *_: Any) -> None:
        if self.seen is None:
            self.seen = {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_testing_a_checkpoint_runs_that_checkpoints_averages(tmp_path: Path) -> None:
    """``trainer.test(ckpt_path=...)`` in a fresh process (no fit) and after a fit that went on past the
    checkpoint: the test runs the file's averages with their statistics, not the live weights and not
    the averages left in memory."""
    saving = L.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer, module = fit(tmp_path, 6, [saving], ema_decay=0.5, ema_bn_batches=BN_BATCHES)
    path = Path(trainer.checkpoint_callback.dirpath) / "step=3.ckpt"
    expected = torch.load(path, weights_only=True)[EMA_KEY]
    for fitted in (None, (trainer, module)):
        seen = WeightsWhenTesting()
        if fitted is None:
            module = NVAEModule(arch=tiny_config(), image_spec=SPEC, ema_decay=0.5, ema_bn_batches=BN_BATCHES)
            trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=str(tmp_path / "test"), limit_test_batches=1, callbacks=[seen])
        else:
            trainer.callbacks.append(seen)
        trainer.test(module, datamodule=RandomBinary(), ckpt_path=str(path), verbose=False)
        assert seen.seen is not None and seen.seen.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(seen.seen[key], value, rtol=0, atol=0, msg=key)
    broken = torch.load(path, weights_only=True)
    broken[EMA_KEY]["preprocess.0.branch.0.running_mean"] = torch.zeros(3)  # a file's statistic of the wrong shape
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="EMA entry: 'preprocess.0.branch.0.running_mean' is missing or not of shape"):
        trainer.test(module, datamodule=RandomBinary(), ckpt_path=str(tmp_path / "broken.ckpt"), verbose=False)


def test_under_gradient_accumulation_the_average_moves_once_per_optimizer_step(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two micro-batches per step: the average moves after each optimizer step (steps 1, 2, 3), not after
    each batch (which would decay it twice as fast, at repeated warm-up counts)."""
    steps: list[int] = []
    update = WeightEMA.update
    monkeypatch.setattr(WeightEMA, "update", lambda self, module, step, keep=None: steps.append(step) or
                        update(self, module, step, keep))
    L.seed_everything(0, verbose=False)
    module = NVAEModule(arch=tiny_config(), image_spec=SPEC, ema_decay=0.5, ema_bn_batches=BN_BATCHES)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, accumulate_grad_batches=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path), limit_val_batches=0)
    trainer.fit(module, datamodule=RandomBinary())
    assert steps == [1, 2, 3]
