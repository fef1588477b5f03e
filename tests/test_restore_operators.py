"""Degradation operators (nvae/restore/operators.py): exact adjoints, the data step
against a dense solve, masks, the parser's one-line errors."""
from __future__ import annotations

import pytest
import torch

from nvae.restore.operators import (AvgPool, Blur, Downsample, GaussianBlur, Identity, Mask, Operator,
                                    conjugate_gradient, gaussian_kernel, parse_operator)

SHAPE = (3, 8, 8)


def operators(shape: tuple[int, ...] = SHAPE) -> dict[str, Operator]:
    """One of each, the parser's spellings and direct constructions, on (C, 8, 8) images."""
    ops = {text: parse_operator(text, shape, torch.Generator().manual_seed(1))
           for text in ("denoise", "inpaint-box", "inpaint-box:0.25", "inpaint-random:0.5", "inpaint-half",
                        "inpaint-half:top", "sr:2", "sr:4", "sr-avg:2", "sr-avg:4", "blur:3,0.8", "blur:9,2.0")}
    ops["blur-asymmetric"] = Blur(torch.rand(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    ops["blur-asymmetric-strided"] = Blur(torch.rand(3, 5, generator=torch.Generator().manual_seed(4)), stride=2)
    ops["downsample-wide"] = Downsample(2, size=11, width=3.0)  # kernel wider than the image
    ops["mask-per-channel"] = Mask(torch.rand(shape, generator=torch.Generator().manual_seed(3)) > 0.3)
    return ops


def dense(op: Operator, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of A (rows: outputs, columns: inputs), by applying it to every basis image."""
    n = torch.Size(shape).numel()
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    return op.forward(basis).reshape(n, -1).T


@pytest.mark.parametrize("name", list(operators()))
def test_adjoint_is_exact(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    op = operators()[name]
    x = torch.randn(4, *SHAPE, generator=g, dtype=torch.float64)
    y = torch.randn(op.out_shape(x.shape), generator=g, dtype=torch.float64)
    assert op.forward(x).shape == y.shape and op.adjoint(y).shape == x.shape
    lhs, rhs = (op.forward(x) * y).sum(), (x * op.adjoint(y)).sum()
    # float64 sums of ~200 products of O(1) numbers: rounding is ~1e-15 relative; 1e-10 leaves room.
    assert abs(lhs - rhs) <= 1e-10 * max(abs(lhs), 1.0)
    # and as matrices: Aᵀ built from `adjoint` is the transpose of A built from `forward`.
    at = dense(_Adjoint(op), tuple(y.shape[1:]))
    torch.testing.assert_close(at, dense(op, SHAPE).T, rtol=0, atol=1e-12)


class _Adjoint(Operator):
    def __init__(self, op: Operator) -> None:
        self.op = op

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.op.adjoint(y)


def test_adjoint_with_a_mask_per_image() -> None:
    g = torch.Generator().manual_seed(0)
    op = Mask(torch.rand(4, 1, 8, 8, generator=g) > 0.5)
    x, y = torch.randn(2, 4, 3, 8, 8, generator=g, dtype=torch.float64)
    assert torch.equal((op.forward(x) * y).sum(), (x * op.adjoint(y)).sum())  # the same products, same order


@pytest.mark.parametrize("name", list(operators()))
@pytest.mark.parametrize("weight", [0.05, 1.0])
def test_solve_matches_a_dense_solve(name: str, weight: float) -> None:
    g = torch.Generator().manual_seed(0)
    op = operators()[name]
    mu = torch.randn(1, *SHAPE, generator=g, dtype=torch.float64)
    y = torch.randn(op.out_shape(mu.shape), generator=g, dtype=torch.float64)
    a = dense(op, SHAPE)
    matrix = a.T @ a + weight * torch.eye(a.shape[1], dtype=torch.float64)
    expected = torch.linalg.solve(matrix, a.T @ y.flatten() + weight * mu.flatten())
    # CG to relative residual 1e-12; the condition number is at most (1 + w) / w <= 21, so the error
    # is <= 21e-12 relative: 1e-6 is a wide margin (closed-form solves are exact to rounding).
    got = op.solve(y, mu, weight, tol=1e-12, max_iter=500)
    err = (got.flatten() - expected).norm() / expected.norm()
    assert err <= 1e-6, f"{name}: relative error {err:.2e}"


def test_solve_per_sample_weights_and_cg_reports_convergence() -> None:
    g = torch.Generator().manual_seed(0)
    op = Downsample(2)
    mu = torch.randn(2, *SHAPE, generator=g, dtype=torch.float64)
    y = torch.randn(op.out_shape(mu.shape), generator=g, dtype=torch.float64)
    both = op.solve(y, mu, torch.tensor([0.1, 2.0]), tol=1e-12, max_iter=500)
    for i, w in enumerate((0.1, 2.0)):
        torch.testing.assert_close(both[i:i + 1], op.solve(y[i:i + 1], mu[i:i + 1], w, tol=1e-12, max_iter=500))
    _, iterations, residual = conjugate_gradient(lambda v: op.normal(v) + v, op.adjoint(y) + mu, mu, 1e-10, 500)
    assert 0 < iterations < 500 and bool((residual <= 1e-10).all())
    with pytest.raises(ValueError, match="weight"):
        op.solve(y, mu, 0.0)


def test_solve_follows_dtype() -> None:
    op = GaussianBlur(3, 1.0)
    x = torch.rand(2, *SHAPE)
    assert op.solve(op(x), x, 0.5).dtype == torch.float32
    assert Mask.half(SHAPE).solve(x, x, 0.5).dtype == torch.float32


@pytest.mark.parametrize("text", ["inpaint-box", "inpaint-random:0.3", "inpaint-half", "inpaint-half:top"])
def test_masks_keep_exactly_the_observed_pixels(text: str) -> None:
    op = parse_operator(text, SHAPE, torch.Generator().manual_seed(0))
    x = torch.rand(2, *SHAPE)
    y = op(x)
    observed = op.mask.expand_as(x) == 1
    assert torch.equal(y[observed], x[observed]) and bool((y[~observed] == 0).all())
    # the data step puts back the observed pixels' values of y when the weight is tiny
    torch.testing.assert_close(op.solve(y, torch.zeros_like(x), 1e-9)[observed], x[observed])


def test_mask_shapes() -> None:
    assert Mask.half((4, 6)).mask[0, :, 0].tolist() == [1, 1, 0, 0]
    assert Mask.half((5, 6), "top").mask[0, :, 0].tolist() == [0, 0, 1, 1, 1]
    box = Mask.box((1, 8, 8), 0.5).mask[0]
    assert box.sum() == 64 - 16 and bool((box[2:6, 2:6] == 0).all())
    with pytest.raises(ValueError, match="0 .missing. and 1"):
        Mask(torch.full((1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="does not fit"):
        Mask(torch.ones(2, 4, 4)).forward(torch.ones(1, 3, 4, 4))


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.77])
def test_random_mask_hides_the_fraction_and_follows_the_seed(fraction: float) -> None:
    shape = (3, 28, 28)
    mask = Mask.random(shape, fraction, torch.Generator().manual_seed(5)).mask
    assert mask.shape == (1, 28, 28)  # one mask for all channels of a pixel
    assert abs((mask == 0).sum().item() - fraction * 28 * 28) <= 1
    assert torch.equal(mask, Mask.random(shape, fraction, torch.Generator().manual_seed(5)).mask)
    assert not torch.equal(mask, Mask.random(shape, fraction, torch.Generator().manual_seed(6)).mask)


def test_avgpool_of_a_constant_is_the_constant() -> None:
    x = torch.full((2, 3, 8, 8), 0.37, dtype=torch.float64)
    for s in (2, 4, 8):
        torch.testing.assert_close(AvgPool(s)(x), torch.full((2, 3, 8 // s, 8 // s), 0.37, dtype=torch.float64))


@pytest.mark.parametrize("size,width", [(1, 1.0), (3, 0.5), (9, 2.0), (13, 2.0), (21, 7.0)])
def test_blur_kernel_sums_to_one(size: int, width: float) -> None:
    k = gaussian_kernel(size, width)
    assert k.shape == (size, size) and abs(k.sum().item() - 1) < 1e-12
    assert torch.equal(k, k.flip(0)) and torch.equal(k, k.T)
    # away from the border a normalized blur keeps a constant image
    x = torch.full((1, 1, 32, 32), 2.0, dtype=torch.float64)
    c = GaussianBlur(size, width)(x)[..., 10:22, 10:22]
    torch.testing.assert_close(c, torch.full_like(c, 2.0))


def test_parser_builds_the_operators() -> None:
    assert isinstance(parse_operator("denoise", SHAPE), Identity)
    assert isinstance(parse_operator("sr:4", SHAPE), Downsample) and parse_operator("sr:4", SHAPE).scale == 4
    assert isinstance(parse_operator("sr-avg:2", SHAPE), AvgPool)
    blur = parse_operator("blur:9,2.0", SHAPE)
    assert isinstance(blur, GaussianBlur) and (blur.size, blur.width) == (9, 2.0)
    assert parse_operator("inpaint-half", SHAPE).mask[0, -1, 0] == 0  # bottom half missing
    assert parse_operator("inpaint-half:top", SHAPE).mask[0, 0, 0] == 0
    # without a generator the random mask is seeded 0: the same every time
    first, again = parse_operator("inpaint-random:0.5", SHAPE), parse_operator("inpaint-random:0.5", SHAPE)
    assert torch.equal(first.mask, again.mask)
    assert parse_operator("sr:4", (1, 28, 28)).out_shape((5, 1, 28, 28)) == (5, 1, 7, 7)


@pytest.mark.parametrize("text,part", [
    ("sr:3", "scale 3 does not divide the image size 8x8"),
    ("sr-avg:5", "scale 5 does not divide"),
    ("sr:1", "scale 1 is not >= 2"),
    ("sr:x", "scale 'x' is not an integer"),
    ("sr", "SCALE"),
    ("inpaint-random:1.5", "fraction 1.5 is not in (0, 1)"),
    ("inpaint-random:0", "fraction 0 is not in (0, 1)"),
    ("inpaint-box:-0.2", "fraction -0.2 is not in (0, 1)"),
    ("inpaint-random:half", "fraction 'half' is not a number"),
    ("inpaint-half:left", "half 'left' is not top or bottom"),
    ("blur:8,2.0", "blur size 8 is not a positive odd integer"),
    ("blur:-3,2.0", "blur size -3 is not a positive odd integer"),
    ("blur:9,0", "blur width 0 is not a positive number"),
    ("blur:9", "blur:SIZE,WIDTH"),
    ("denoise:0.1", "denoise"),
    ("deblur:9", "unknown operator 'deblur'"),
])
def test_parse_errors_are_one_line_naming_the_part(text: str, part: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_operator(text, SHAPE)
    message = str(info.value)
    assert "\n" not in message and part in message, message
