"""Model invariants: ops against references, shapes, gradients, state round trip, flows."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from conftest import fit_on_batch, random_images, tiny_config
from nvae import spectral
from nvae.cells import AutoregressiveShift
from nvae.model import NVAE
from nvae.ops import Conv2d, DepthwiseConv2d, autoregressive_mask
from nvae.objectives import batchnorm_gammas, batchnorm_penalty
from nvae.spectral import SpectralRegularizer
from nvae.spec import ImageSpec


def test_weight_norm_conv_matches_functional() -> None:
    torch.manual_seed(0)
    conv = Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.log_weight_norm.normal_()
    v = conv.weight
    w = torch.exp(conv.log_weight_norm) * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(conv(x), F.conv2d(x, w, conv.bias, padding=1), atol=1e-4, rtol=1e-4)
    # at init the gain equals the norm of v (up to the 1e-2 offset), so the kernel barely changes
    fresh = Conv2d(3, 5, 3)
    torch.testing.assert_close(fresh.normalized_weight(), fresh.weight, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_conv_matches_functional_and_keeps_layout(channels_last: bool) -> None:
    """The NHWC detour on CPU changes neither values, gradients nor the caller's memory layout."""
    torch.manual_seed(0)
    conv = DepthwiseConv2d(6, 5, padding=2)
    x = torch.randn(2, 6, 9, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = conv(x)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ref_x = x.detach().clone().requires_grad_()
    ref = F.conv2d(ref_x, conv.weight.detach().clone().requires_grad_(), padding=2, groups=6)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, conv.weight), g)
    ref_gx, = torch.autograd.grad(ref, ref_x, g)
    torch.testing.assert_close(gx, ref_gx, atol=1e-5, rtol=1e-5)
    xs = F.pad(x.detach(), (2, 2, 2, 2))
    ref_gw = torch.stack([(g * xs[:, :, i:i + 9, j:j + 9]).sum((0, 2, 3)) for i in range(5) for j in range(5)], 1)
    torch.testing.assert_close(gw, ref_gw.view(6, 1, 5, 5), atol=1e-4, rtol=1e-4)
    assert conv.log_weight_norm is None and isinstance(conv, Conv2d)  # spectrally regularized, no WN


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_spectral_estimate_matches_linalg(layout: torch.memory_format) -> None:
    """Batched small kernels, a large one iterated alone, in either layout of the weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv2d(4, 6, 3), Conv2d(4, 6, 3), Conv2d(6, 2, 1), Conv2d(128, 256, 3))
    model.to(memory_format=layout)
    assert model[3].weight.numel() >= spectral.LARGE_MATRIX
    reg = SpectralRegularizer(model, power_iters=4, initial_iters=200)
    total = reg()
    expected = sum(torch.linalg.matrix_norm(m.normalized_weight().flatten(1), ord=2) for m in model)
    torch.testing.assert_close(total, expected, atol=1e-3, rtol=1e-3)
    total.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in model)
    assert len(reg.state_dict()) == 7  # u, v for the three shapes + initialized flag
    with pytest.raises(ValueError, match="model.objective.power_iters must be >= 1"):
        SpectralRegularizer(model, power_iters=0)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_spectral_gradient_through_tokens_matches_autograd(layout: torch.memory_format) -> None:
    """Kernels of a training forward carry spectral tokens (u v^T added inside the weight norm's
    backward); kernels made fresh (eval mode here) take plain autograd through sigma = u^T W v."""
    import copy

    from nvae.accel import cpu

    torch.manual_seed(0)
    # with convolutions without weight normalization (_SpectralToken), one of a weight-normed one's shape
    a = torch.nn.Sequential(Conv2d(4, 6, 3, padding=1), Conv2d(6, 6, 3, padding=1), Conv2d(6, 128, 1),
                            Conv2d(128, 256, 3, padding=1), Conv2d(256, 4, 1), Conv2d(4, 6, 1, weight_norm=False),
                            Conv2d(6, 6, 3, padding=1, weight_norm=False)).to(memory_format=layout)
    cpu.install(a)  # the CPU backend: its forward keeps kernels with tokens
    b = copy.deepcopy(a).eval()
    reg_a, reg_b = SpectralRegularizer(a, 3, 3), SpectralRegularizer(b, 3, 3)
    reg_b.load_state_dict(reg_a.state_dict())
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=layout)
    losses = []
    for model, reg in ((a, reg_a), (b, reg_b)):
        y = model(x)
        loss = (y ** 2).mean() + 0.7 * reg()
        loss.backward()
        losses.append(loss.detach())
    assert all(m.accel.uv is not None for m in a) and not any(m.accel.uv is not None for m in b)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)
        assert pa.grad.stride() == pa.stride(), name  # one gradient, laid out as the weight (DDP's buckets)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("mode", ["none", "group"])
def test_training_step_gradients_are_laid_out_as_their_parameters(mode: str, batched: bool) -> None:
    """DDP copies each gradient into a bucket laid out as the parameter and warns ("Grad strides do
    not match bucket view strides") on any stride difference, size-1 dimensions included: before
    the decoder's plain convolutions carried spectral tokens, their two summed gradients came back
    as (C, 1, 1, 1) for channels_last (C, 1, C, C) 1x1 kernels."""
    from nvae.lightning import NVAEModule

    torch.manual_seed(0)
    module = NVAEModule(arch=tiny_config(num_flows=1), image_spec=ImageSpec(channels=3, size=16, num_bits=8),
                        channels_last=True, gradient_checkpointing=mode)
    module.model.kernel_bank.batched = batched  # the kernel bank's stacks, or each layer's own kernel
    x = module._prepare(random_images(module.spec))
    module.training_loss(x)[0].backward()
    plain = [m.weight for m in module.modules() if isinstance(m, Conv2d) and m.log_weight_norm is None]
    assert plain and all(p.grad is not None for p in plain)
    assert not [(n, p.stride(), p.grad.stride()) for n, p in module.named_parameters()
                if p.grad is not None and p.grad.stride() != p.stride()]


def test_batchnorm_penalty_is_sum_of_max_abs_gamma() -> None:
    bns = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(2))
    with torch.no_grad():
        bns[0].weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        bns[1].weight.copy_(torch.tensor([0.1, 0.3]))
    assert batchnorm_penalty(bns).item() == pytest.approx(2.3)
    gammas = batchnorm_gammas(bns)
    with torch.no_grad():
        bns[1].weight.copy_(torch.tensor([-0.3, 0.3]))  # a tie: the gradient is shared as abs().max() shares it
    grads = torch.autograd.grad(batchnorm_penalty(gammas), gammas)
    reference = torch.autograd.grad(sum(g.abs().max() for g in gammas), gammas)
    for a, b in zip(grads, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(grads[1], torch.tensor([-0.5, 0.5]))


@pytest.mark.parametrize("mirror", [False, True])
def test_flow_cell_is_autoregressive(mirror: bool) -> None:
    """d z'_(c, p) / d z_(c', p') is zero unless (p', c') precedes (p, c); unit diagonal."""
    torch.manual_seed(0)
    cell = AutoregressiveShift(latent_channels=3, mirror=mirror).double()
    with torch.no_grad():  # make the shift large enough that a leak would show
        cell.mu.log_weight_norm.add_(3.0)
    z = torch.randn(1, 3, 4, 4, dtype=torch.double)
    jac = torch.autograd.functional.jacobian(lambda t: cell(t), z).reshape(48, 48)  # (out, in)
    # order index: pixels in raster order (reversed when mirrored), channels within a pixel
    c, y, x = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(4), indexing="ij")
    pixel = (y * 4 + x).flatten()
    pixel = 15 - pixel if mirror else pixel
    order = pixel * 3 + c.flatten()
    later_or_same = order[None, :] >= order[:, None]  # input not strictly before output
    off_diag = later_or_same & ~torch.eye(48, dtype=torch.bool)
    assert jac[off_diag].abs().max() == 0
    torch.testing.assert_close(torch.diagonal(jac), torch.ones(48, dtype=torch.double))
    assert jac[~later_or_same].abs().max() > 0  # and it does depend on earlier values


def test_depthwise_mask_centre() -> None:
    mask = autoregressive_mask(4, 4, 5, 4, zero_diagonal=False, mirror=False)
    assert mask.shape == (4, 1, 5, 5) and mask[:, 0, 2, 2].eq(1).all() and mask[:, 0, 3:].eq(0).all()


@pytest.mark.parametrize("fixture", ["tiny_rgb", "tiny_binary"])
def test_shapes_kl_per_group_and_gradients(fixture: str, request: pytest.FixtureRequest) -> None:
    model: NVAE = request.getfixturevalue(fixture)
    x = random_images(model.spec)
    out = model(x)
    assert out.kl.shape == (4, model.num_groups) == (4, 4)
    assert out.log_q.shape == out.log_p.shape == (4,)
    log_px = model.log_likelihood(out.likelihood, x)
    assert log_px.shape == (4,) and torch.isfinite(log_px).all() and (log_px < 0).all()
    (-log_px + out.kl.sum(dim=1)).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_kl_equals_log_q_minus_log_p_without_flows(tiny_binary: NVAE) -> None:
    """Analytic KL and the one-sample estimate agree in expectation (many samples)."""
    torch.manual_seed(0)
    x = random_images(tiny_binary.spec, n=1).expand(512, -1, -1, -1)
    tiny_binary.eval()
    with torch.no_grad():
        out = tiny_binary(x)
    mc = (out.log_q - out.log_p).mean()
    assert abs(mc - out.kl.sum(dim=1).mean()) < 0.05 * out.kl.sum(dim=1).mean() + 0.5


def test_padding_is_not_modelled(tiny_binary: NVAE) -> None:
    x = random_images(tiny_binary.spec, n=2)
    out = tiny_binary(x)
    y = x.clone()
    y[..., :2, :] = 1 - y[..., :2, :]
    torch.testing.assert_close(tiny_binary.log_likelihood(out.likelihood, x),
                               tiny_binary.log_likelihood(out.likelihood, y))


def test_state_dict_round_trip_gives_identical_outputs(tiny_rgb: NVAE) -> None:
    reg = SpectralRegularizer(tiny_rgb)
    x = random_images(tiny_rgb.spec)
    tiny_rgb(x)
    reg()  # advance the power iteration so u, v differ from a fresh init
    buf = io.BytesIO()
    torch.save({"model": tiny_rgb.state_dict(), "reg": reg.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    clone = NVAE(tiny_rgb.spec, tiny_rgb.cfg)
    clone_reg = SpectralRegularizer(clone)
    clone.load_state_dict(state["model"])
    clone_reg.load_state_dict(state["reg"])
    tiny_rgb.eval(), clone.eval()
    torch.manual_seed(1)
    a = tiny_rgb(x)
    torch.manual_seed(1)
    b = clone(x)
    torch.testing.assert_close(a.kl, b.kl, rtol=0, atol=0)
    torch.testing.assert_close(a.likelihood.log_prob(x), b.likelihood.log_prob(x), rtol=0, atol=0)
    torch.testing.assert_close(reg(), clone_reg(), rtol=0, atol=0)


def test_sampling_shapes_and_temperature_zero_is_deterministic(tiny_rgb: NVAE) -> None:
    tiny_rgb.eval()
    s = tiny_rgb.sample(5, temperature=0.0)
    assert s.shape == (5, 3, 16, 16)
    torch.testing.assert_close(s, tiny_rgb.sample(5, temperature=0.0))


def test_groups_halving_and_latent_shapes() -> None:
    cfg = tiny_config(num_latent_scales=3, num_groups_per_scale=8, groups_halving=True, min_groups_per_scale=2)
    assert cfg.groups_per_scale() == [8, 4, 2]
    model = NVAE(ImageSpec(3, 32, 5), cfg)
    assert model.num_groups == 14
    topology = model.topology
    shapes = [topology.latent_shape(g, 1) for g in topology.groups]
    assert shapes[0] == (1, 4, 4, 4) and shapes[-1] == (1, 4, 16, 16)
    assert topology.groups_per_scale == [2, 4, 8]  # coarsest scale holds the fewest groups
    assert [s.channels for s in topology.scales] == [64, 32, 16]  # 8 channels, x2 per downsampling
    assert [g.index for g in topology.groups if g.up_before] == [2, 6]  # the up cells run before groups 2 and 6
    with torch.no_grad():  # the model runs the table: every group's latent has the listed shape
        seen = []
        model.traverse(1, hook=lambda view: seen.append(view.shape))
    assert seen == shapes


def test_loss_falls_on_fixed_batch(tiny_binary: NVAE) -> None:
    torch.manual_seed(0)
    x = random_images(tiny_binary.spec, n=8)
    losses = fit_on_batch(tiny_binary, x, steps=30, lr=1e-2)
    # against the untrained model's loss: most of the fall happens within the first five steps
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]


@pytest.mark.parametrize("mode", ["cell", "group", True])
def test_gradient_checkpointing_is_exact_and_updates_bn_once(tiny_rgb: NVAE, mode: object) -> None:
    """Same loss (spectral term included), gradients and BN statistics; per group the posterior noise
    is drawn again identically."""
    x = random_images(tiny_rgb.spec)
    reference = NVAE(tiny_rgb.spec, tiny_rgb.cfg)
    reference.load_state_dict(tiny_rgb.state_dict())
    tiny_rgb.set_checkpointing(mode)
    results = []
    for model in (reference, tiny_rgb):
        torch.manual_seed(0)
        spectral = SpectralRegularizer(model)  # same u, v start for both (seeded)
        out = model(x)
        loss = (-model.log_likelihood(out.likelihood, x) + out.kl.sum(dim=1)).mean() + 0.5 * spectral()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model.state_dict()))
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
    for name in state_a:  # running statistics moved exactly once, as without checkpointing
        torch.testing.assert_close(state_a[name], state_b[name], msg=name)


def _saved_bytes(model: NVAE, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps from a forward pass (outside recomputation)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values())


def test_checkpointing_per_group_keeps_less_than_per_cell(tiny_rgb: NVAE) -> None:
    x = random_images(tiny_rgb.spec, n=8)
    saved = {}
    for mode in ("none", "cell", "group"):
        tiny_rgb.set_checkpointing(mode)
        saved[mode] = _saved_bytes(tiny_rgb, x)
        cells = [m for m in tiny_rgb.modules() if type(m).__name__ == "DecoderCell"]
        assert cells and {c.recompute_expanded for c in cells} == {mode != "none"}  # expanded maps: stored or not
    assert saved["group"] < 0.6 * saved["cell"] < 0.6 * saved["none"], saved
    with pytest.raises(ValueError, match="gradient_checkpointing must be one of none, cell, group"):
        tiny_rgb.set_checkpointing("layer")


@pytest.mark.parametrize("mode", ["cell", "group"])
def test_checkpoint_recomputation_keeps_no_kernels_for_the_next_step(tiny_rgb: NVAE, mode: str) -> None:
    """The spectral regularizer takes each forward kernel; kernels recomputed in backward are not stashed."""
    tiny_rgb.set_checkpointing(mode)
    spectral = SpectralRegularizer(tiny_rgb)
    out = tiny_rgb(random_images(tiny_rgb.spec))
    loss = out.kl.sum() + spectral()
    assert not [n for n, m in tiny_rgb.named_modules() if isinstance(m, Conv2d) and m.accel.kernel is not None]
    loss.backward()
    assert not [n for n, m in tiny_rgb.named_modules() if isinstance(m, Conv2d) and m.accel.kernel is not None]


def test_sync_batchnorm_conversion_keeps_the_model() -> None:
    """``trainer.sync_batchnorm``: Lightning converts every BatchNorm module to SyncBatchNorm before
    fit and back to a plain BatchNorm after. Swish used to be a BatchNorm subclass, so both
    conversions dropped it from every cell, silently. Converted, reverted or not, the model computes
    the same loss and gradients (one process: SyncBatchNorm then normalizes with local statistics)."""
    import copy

    from lightning.pytorch.plugins import TorchSyncBatchNorm

    torch.manual_seed(0)
    model = NVAE(ImageSpec(channels=3, size=16, num_bits=8), tiny_config(num_flows=1))
    synced = TorchSyncBatchNorm().apply(copy.deepcopy(model))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    reverted = TorchSyncBatchNorm().revert(copy.deepcopy(synced))
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in reverted.modules())
    x = random_images(model.spec)

    def loss_and_grads(m: NVAE, train: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m = copy.deepcopy(m).train(train)
        torch.manual_seed(1)  # the same posterior noise
        out = m(x)
        loss = out.kl.sum() - m.log_likelihood(out.likelihood, x).sum()
        return loss, list(torch.autograd.grad(loss, list(m.parameters())))

    for train in (True, False):
        loss, grads = loss_and_grads(model, train)
        for other in (synced, reverted):
            other_loss, other_grads = loss_and_grads(other, train)
            torch.testing.assert_close(other_loss, loss)
            for (name, _), a, b in zip(model.named_parameters(), other_grads, grads):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["decoder", "encoder down"])
def test_cells_with_fused_steps_are_exact(kind: str) -> None:
    """Encoder and decoder cells (two fused BN-Swish-conv steps each): same output, gradients and
    BatchNorm statistics (updated once) as their layers run one by one by nn.Sequential."""
    import copy

    from nvae.cells import RESIDUAL_SCALE, DecoderCell, EncoderCell

    torch.manual_seed(0)
    cell = (DecoderCell(4, 4, expand=3) if kind == "decoder" else EncoderCell(4, 8, down=True)).train()
    plain = copy.deepcopy(cell)
    x = torch.randn(3, 4, 8, 8)
    out = cell(x)
    b, silu = plain.branch, F.silu  # fig. 3, layer by layer
    if kind == "decoder":  # BN - conv1x1 - BN - Swish - dwconv5x5 - BN - Swish - conv1x1 - BN - SE
        h = b[6](silu(b[5](b[4](silu(b[3](b[2](b[1](b[0](x)))))))))
        h = b[8](b[7](h))
    else:  # BN - Swish - conv3x3 - BN - Swish - conv3x3 - SE
        h = b[4](b[3](silu(b[2](b[1](silu(b[0](x)))))))
    ref = plain.skip(x) + RESIDUAL_SCALE * h
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(cell.parameters()), g)
    ref_grads = torch.autograd.grad(ref, list(plain.parameters()), g)
    for (name, _), a, b in zip(cell.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, msg=name)
    for (name, a), b in zip(cell.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # num_batches_tracked == 1 in both


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_temperature_scales_every_prior_sigma(tiny_binary: NVAE, temperature: float) -> None:
    """sample(t): the top z has std 1.01 t (sigma 1.01, see Normal.top_prior); every lower group's z is
    its prior mean plus t times its prior sigma times unit noise (sec. 5.2)."""
    from nvae.distributions import Normal

    model = tiny_binary.eval()
    latents, priors = [], {}
    handles = [g.dec_combiner.register_forward_hook(lambda m, args, out: latents.append(args[1]))
               for g in model.dec_groups]
    handles += [g.prior.register_forward_hook(lambda m, args, out, i=i: priors.__setitem__(i, out))
                for i, g in enumerate(model.dec_groups) if g.prior is not None]
    torch.manual_seed(0)
    model.sample(256, temperature=temperature)
    for h in handles:
        h.remove()
    # each std below is over >= 256 * 4 * 4 = 4096 values: its sampling error is ~1/sqrt(2 * 4096) = 1.1%,
    # so 5% is > 4 standard errors
    assert latents[0].mean().abs() < 0.05 * temperature
    assert latents[0].std().item() == pytest.approx(1.01 * temperature, rel=0.05)
    for i, params in priors.items():
        prior = Normal.from_params(params.float())
        unit = (latents[i] - prior.mu) / prior.sigma
        assert unit.std().item() == pytest.approx(temperature, rel=0.05)
        assert unit.mean().abs() < 0.05 * temperature


def test_sample_means_are_on_the_bit_grid_unless_asked_otherwise(tiny_rgb: NVAE) -> None:
    """nvae's choice: sample() rounds the likelihood mean to the data's grid; quantize=False gives the
    official, unrounded mean, which the rounded one is within half a grid step of."""
    model = tiny_rgb.eval()
    top = 2 ** model.spec.num_bits - 1
    torch.manual_seed(0)
    rounded = model.sample(3, temperature=0.5)
    torch.manual_seed(0)
    raw = model.sample(3, temperature=0.5, quantize=False)
    torch.testing.assert_close(rounded * top, torch.round(rounded * top))
    assert not torch.equal(raw * top, torch.round(raw * top))
    assert (rounded - raw).abs().max() <= 0.5 / top + 1e-6


def test_a_convolution_the_regularizer_cannot_see_fails_at_construction() -> None:
    """Sec. 3.2 regularizes every convolution: a torch.nn.Conv2d (no spectral slot) is refused, named."""
    model = torch.nn.Sequential(Conv2d(3, 4, 3), torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3)))
    with pytest.raises(ValueError, match=r"^1\.0: a Conv2d escapes the spectral regularizer"):
        SpectralRegularizer(model)
    assert SpectralRegularizer(model[:1]).num_layers == 1


def test_spectral_regularizer_reads_no_device_value_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call runs initial_iters, later calls power_iters, without reading a device value in a
    step (a host synchronization on a GPU, a graph break under torch.compile); a loaded state dict
    (a resumed run) is read once, when it is loaded."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv2d(4, 6, 3), Conv2d(6, 2, 1))
    reg = SpectralRegularizer(model, power_iters=2, initial_iters=20)
    iters, reads = [], []
    iterate = spectral.power_iteration
    monkeypatch.setattr(spectral, "power_iteration", lambda u, w, n, s=None: iters.append(n) or iterate(u, w, n, s))
    bool_of = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t.shape) or bool_of(t))
    for _ in range(3):
        reg()
    assert iters == [20, 20, 2, 2, 2, 2] and reads == []  # two shapes per call
    fresh = SpectralRegularizer(model, power_iters=2, initial_iters=20)
    fresh.load_state_dict(reg.state_dict())  # resuming: the buffer says the iteration is warm
    assert len(reads) == 1
    iters.clear()
    fresh()
    assert iters == [2, 2] and len(reads) == 1
