"""Linear degradation operators with exact adjoints, for restoration with an NVAE prior.

The observation model of PnP-HVAE (Prost, Houdard, Almansa, Papadakis, "Inverse problem regularization
with hierarchical variational autoencoders", ICCV 2023, arXiv 2303.11217) is y = A x + n with A linear
and its adjoint Aᵀ known. Each :class:`Operator` gives ``forward`` (A x), ``adjoint`` (Aᵀ y), ``normal``
(AᵀA x) and ``solve``, the method's data step::

    solve(y, mu, w) = argmin_x ||A x - y||² / 2 + w ||x - mu||² / 2 = (AᵀA + w I)⁻¹ (Aᵀ y + w mu),

in closed form where AᵀA is diagonal (:class:`Identity`, :class:`Mask`) and by batched conjugate
gradient otherwise (:class:`Blur`, :class:`Downsample`, :class:`AvgPool`). Images are (B, C, H, W)
float tensors; the operators hold their masks / kernels on the CPU in float64 and cast them to the
input's device and dtype when applied. Boundaries: blurs use zero padding (the image is 0 outside), so
the adjoint is the transposed convolution, exactly.

:func:`parse_operator` reads the command-line spelling (``inpaint-box``, ``inpaint-random:0.5``,
``inpaint-half[:top|:bottom]``, ``sr:4``, ``sr-avg:4``, ``blur:9,2.0``, ``denoise``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from nvae.names import OPERATOR_NAMES

Shape = tuple[int, ...]


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product over all but the batch dimension, shaped (B, 1, ..., 1)."""
    return (u * v).sum(dim=tuple(range(1, u.ndim)), keepdim=True)


def _weight(weight: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The data step's weight as a tensor broadcastable to ``like``: a scalar or one per sample (B,)."""
    w = torch.as_tensor(weight, dtype=like.dtype, device=like.device)
    if w.ndim == 1:
        w = w.view(-1, *([1] * (like.ndim - 1)))
    if not bool((w > 0).all()):
        raise ValueError("the data step's weight must be > 0")
    return w


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor,
                       tol: float = 1e-6, max_iter: int = 100) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Solve M x = b for a symmetric positive definite ``apply`` = M, each sample of the batch on its own.

    Stops when every sample's residual satisfies ||b - M x|| <= tol ||b|| or after ``max_iter``
    iterations; converged samples are frozen (their step is 0) while the others go on. Returns
    (x, iterations, relative residual per sample (B,)).
    """
    x = x0.clone()
    r = b - apply(x)
    p = r.clone()
    rr = _dot(r, r)
    threshold = tol ** 2 * _dot(b, b)
    one = torch.ones_like(rr)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        active = rr > threshold
        if not bool(active.any()):
            iterations -= 1
            break
        mp = apply(p)
        alpha = torch.where(active, rr / torch.where(active, _dot(p, mp), one), 0.0)
        x = x + alpha * p
        r = r - alpha * mp
        rr_new = _dot(r, r)
        beta = torch.where(active, rr_new / torch.where(active, rr, one), 0.0)
        p = r + beta * p
        rr = torch.where(active, rr_new, rr)
    residual = (b - apply(x)).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
    return x, iterations, residual


class Operator:
    """A linear operator A on (B, C, H, W) images, with its exact adjoint.

    Subclasses implement ``forward``, ``adjoint`` and ``out_shape``; those whose AᵀA is diagonal also
    implement ``normal_diagonal``, which makes ``solve`` closed-form.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A x."""
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Aᵀ y, the exact adjoint: ⟨A x, y⟩ = ⟨x, Aᵀ y⟩."""
        raise NotImplementedError

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """AᵀA x."""
        return self.adjoint(self.forward(x))

    def out_shape(self, in_shape: Sequence[int]) -> Shape:
        """The shape of A x for an input of shape ``in_shape`` (B, C, H, W)."""
        return tuple(in_shape)

    def normal_diagonal(self, like: torch.Tensor) -> torch.Tensor | None:
        """AᵀA as a tensor broadcastable to ``like`` where it is diagonal, else None."""
        return None

    def solve(self, y: torch.Tensor, mu: torch.Tensor, weight: float | torch.Tensor,
              tol: float = 1e-6, max_iter: int = 100) -> torch.Tensor:
        """PnP-HVAE's data step: argmin_x ||A x - y||²/2 + weight ||x - mu||²/2.

        x = (AᵀA + weight I)⁻¹ (Aᵀ y + weight mu), closed form when AᵀA is diagonal, otherwise
        conjugate gradient started at ``mu``, stopping at relative residual ``tol`` or after
        ``max_iter`` iterations. ``weight`` (> 0) is a number or one per sample (B,); in the paper
        it is β σ² / σ_dec².
        """
        w = _weight(weight, mu)
        b = self.adjoint(y) + w * mu
        diagonal = self.normal_diagonal(mu)
        if diagonal is not None:
            return b / (diagonal + w)
        x, _, _ = conjugate_gradient(lambda v: self.normal(v) + w * v, b, mu, tol, max_iter)
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Identity(Operator):
    """A = I: denoising."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def normal_diagonal(self, like: torch.Tensor) -> torch.Tensor:
        return torch.ones((), dtype=like.dtype, device=like.device)


class Mask(Operator):
    """A = diag(m), m = 1 on observed pixels and 0 on missing ones: inpainting (A = Aᵀ = AᵀA).

    ``mask``: a 0/1 (or bool) tensor (H, W), (1 or C, H, W) shared by the batch, or (B, 1 or C, H, W)
    one per image. A x keeps the observed pixels and sets the missing ones to 0.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        mask = torch.as_tensor(mask)
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim not in (3, 4):
            raise ValueError(f"a mask is (H, W), (C, H, W) or (B, C, H, W), not {tuple(mask.shape)}")
        mask = mask.to(torch.float64)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("a mask holds only 0 (missing) and 1 (observed)")
        self.mask = mask

    @classmethod
    def box(cls, image_shape: Sequence[int], fraction: float = 0.5) -> "Mask":
        """A centred box missing, its sides ``fraction`` of the image's (rounded, at least one pixel)."""
        h, w = image_shape[-2:]
        if not 0 < fraction < 1:
            raise ValueError(f"box fraction {fraction} is not in (0, 1)")
        bh, bw = max(1, round(fraction * h)), max(1, round(fraction * w))
        if bh == h and bw == w:
            raise ValueError(f"a box of fraction {fraction} hides every pixel of a {h}x{w} image")
        mask = torch.ones(1, h, w, dtype=torch.float64)
        top, left = (h - bh) // 2, (w - bw) // 2
        mask[:, top:top + bh, left:left + bw] = 0
        return cls(mask)

    @classmethod
    def random(cls, image_shape: Sequence[int], fraction: float,
               generator: torch.Generator | None = None) -> "Mask":
        """round(fraction · H · W) pixels missing, drawn uniformly without replacement with ``generator``
        (the same pixels for all channels; the same mask for the same generator state)."""
        h, w = image_shape[-2:]
        if not 0 < fraction < 1:
            raise ValueError(f"random-mask fraction {fraction} is not in (0, 1)")
        count = round(fraction * h * w)
        if not 0 < count < h * w:
            raise ValueError(f"a fraction {fraction} of a {h}x{w} image's pixels is {count} pixel(s): "
                             f"it must hide some and keep some")
        hidden = torch.randperm(h * w, generator=generator)[:count]
        mask = torch.ones(h * w, dtype=torch.float64)
        mask[hidden] = 0
        return cls(mask.view(1, h, w))

    @classmethod
    def half(cls, image_shape: Sequence[int], missing: str = "bottom") -> "Mask":
        """The bottom (or top) floor(H / 2) rows missing."""
        h, w = image_shape[-2:]
        if missing not in ("top", "bottom"):
            raise ValueError(f"missing half '{missing}' is not top or bottom")
        mask = torch.ones(1, h, w, dtype=torch.float64)
        if missing == "bottom":
            mask[:, h - h // 2:] = 0
        else:
            mask[:, :h // 2] = 0
        return cls(mask)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(device=x.device, dtype=x.dtype)
        m = m if m.ndim == x.ndim else m.unsqueeze(0)
        if m.ndim != x.ndim or any(a not in (1, b) for a, b in zip(m.shape, x.shape)):
            raise ValueError(f"mask of shape {tuple(self.mask.shape)} does not fit images of shape "
                             f"{tuple(x.shape)}")
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._mask(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self._mask(y)

    def normal_diagonal(self, like: torch.Tensor) -> torch.Tensor:
        return self._mask(like)

    def __repr__(self) -> str:
        return f"Mask(shape={tuple(self.mask.shape)}, observed={self.mask.mean().item():.3f})"


def _decimated(shape: Sequence[int], factor: int) -> Shape:
    """``shape`` (..., H, W) with H and W divided by ``factor``; ValueError when it does not divide them."""
    *lead, h, w = shape
    if h % factor or w % factor:
        raise ValueError(f"scale {factor} does not divide the image size {h}x{w}")
    return (*lead, h // factor, w // factor)


def gaussian_kernel(size: int, width: float) -> torch.Tensor:
    """A (size, size) Gaussian of standard deviation ``width`` pixels, centred, summing to 1 (float64)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"blur size {size} is not a positive odd integer")
    if not width > 0:
        raise ValueError(f"blur width {width} is not > 0")
    t = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-t ** 2 / (2 * width ** 2))
    k = torch.outer(g, g)
    return k / k.sum()


class Blur(Operator):
    """A x = k ⋆ x per channel (depthwise cross-correlation, = convolution for a symmetric kernel) with
    zero padding and the same output size, then sampling every ``stride`` pixels (stride 1: no
    decimation). Aᵀ is the transposed convolution with the same kernel, padding and stride."""

    def __init__(self, kernel: torch.Tensor, stride: int = 1) -> None:
        kernel = torch.as_tensor(kernel, dtype=torch.float64)
        if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"a blur kernel is 2-D with odd sides, not {tuple(kernel.shape)}")
        if stride < 1:
            raise ValueError(f"stride {stride} is not >= 1")
        self.kernel, self.stride = kernel, stride
        self.padding = (kernel.shape[0] // 2, kernel.shape[1] // 2)

    def out_shape(self, in_shape: Sequence[int]) -> Shape:
        return _decimated(in_shape, self.stride)

    def _weight(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel.to(device=x.device, dtype=x.dtype)
        return k.expand(x.shape[1], 1, *k.shape).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _decimated(x.shape, self.stride)
        return F.conv2d(x, self._weight(x), stride=self.stride, padding=self.padding, groups=x.shape[1])

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        s, (kh, kw), (ph, pw) = self.stride, self.kernel.shape, self.padding
        h, w = y.shape[-2] * s, y.shape[-1] * s
        # conv_transpose2d gives (n - 1) s - 2p + k; output_padding (< s) adds the rows / columns that
        # the strided forward never read, so the result has the input's size.
        extra = (h - ((y.shape[-2] - 1) * s - 2 * ph + kh), w - ((y.shape[-1] - 1) * s - 2 * pw + kw))
        return F.conv_transpose2d(y, self._weight(y), stride=s, padding=self.padding,
                                  output_padding=extra, groups=y.shape[1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel={tuple(self.kernel.shape)}, stride={self.stride})"


class GaussianBlur(Blur):
    """Deblurring: a normalized (size x size) Gaussian kernel of standard deviation ``width``, zero padding."""

    def __init__(self, size: int, width: float) -> None:
        super().__init__(gaussian_kernel(size, width))
        self.size, self.width = size, width

    def __repr__(self) -> str:
        return f"GaussianBlur(size={self.size}, width={self.width})"


class Downsample(Blur):
    """Super-resolution by ``scale``: a Gaussian anti-aliasing blur (width ``scale / 2`` and size
    2 ceil(3 width) + 1 unless given), zero padding, then keeping pixel (0, 0) of every scale x scale
    block. H and W must be multiples of ``scale``."""

    def __init__(self, scale: int, size: int | None = None, width: float | None = None) -> None:
        if scale < 1:
            raise ValueError(f"scale {scale} is not >= 1")
        width = scale / 2 if width is None else width
        size = 2 * math.ceil(3 * width) + 1 if size is None else size
        super().__init__(gaussian_kernel(size, width), stride=scale)
        self.scale = scale

    def __repr__(self) -> str:
        return f"Downsample(scale={self.scale}, kernel={tuple(self.kernel.shape)})"


class AvgPool(Operator):
    """Super-resolution by ``scale`` with average pooling over scale x scale blocks; Aᵀ spreads each value
    / scale² over its block (so AᵀA = I / scale² on block means, not diagonal)."""

    def __init__(self, scale: int) -> None:
        if scale < 1:
            raise ValueError(f"scale {scale} is not >= 1")
        self.scale = scale

    def out_shape(self, in_shape: Sequence[int]) -> Shape:
        return _decimated(in_shape, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _decimated(x.shape, self.scale)
        return F.avg_pool2d(x, self.scale)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        s = self.scale
        return y.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1) / (s * s)

    def __repr__(self) -> str:
        return f"AvgPool(scale={self.scale})"


def _number(text: str, kind: type, what: str, spec: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        kind_name = "an integer" if kind is int else "a number"
        raise ValueError(f"operator '{spec}': {what} '{text}' is not {kind_name}") from None


def parse_operator(text: str, image_shape: Sequence[int], generator: torch.Generator | None = None) -> Operator:
    """The operator for a command-line spelling, for images of shape (C, H, W) (or (B, C, H, W)).

    ``denoise``; ``inpaint-box[:fraction]`` (a centred box, sides 0.5 of the image's by default);
    ``inpaint-random[:fraction]`` (that fraction of pixels missing, 0.5 by default, drawn with
    ``generator``, a fresh one seeded 0 if None); ``inpaint-half[:bottom|:top]`` (bottom by default);
    ``sr:S`` (Gaussian blur then decimation by S); ``sr-avg:S`` (average pooling); ``blur:SIZE,WIDTH``.
    Raises ValueError, one line naming the bad part.
    """
    name, _, arg = text.strip().partition(":")
    args = [a.strip() for a in arg.split(",")] if arg else []
    h, w = image_shape[-2:]
    if name not in OPERATOR_NAMES:
        raise ValueError(f"unknown operator '{name}' (expected one of {', '.join(OPERATOR_NAMES)})")
    expected = {"denoise": 0, "inpaint-box": 1, "inpaint-random": 1, "inpaint-half": 1,
                "sr": 1, "sr-avg": 1, "blur": 2}[name]
    if len(args) > expected or (name in ("sr", "sr-avg", "blur") and len(args) < expected):
        usage = {"denoise": "denoise", "inpaint-box": "inpaint-box[:fraction]",
                 "inpaint-random": "inpaint-random[:fraction]", "inpaint-half": "inpaint-half[:top|:bottom]",
                 "sr": "sr:SCALE", "sr-avg": "sr-avg:SCALE", "blur": "blur:SIZE,WIDTH"}[name]
        raise ValueError(f"operator '{text}': '{arg}' is not the arguments of {usage}")
    if name == "denoise":
        return Identity()
    if name in ("inpaint-box", "inpaint-random"):
        fraction = float(_number(args[0], float, "fraction", text)) if args else 0.5
        if not 0 < fraction < 1:
            raise ValueError(f"operator '{text}': fraction {args[0]} is not in (0, 1)")
        try:
            if name == "inpaint-box":
                return Mask.box(image_shape, fraction)
            return Mask.random(image_shape, fraction,
                               generator if generator is not None else torch.Generator().manual_seed(0))
        except ValueError as err:
            raise ValueError(f"operator '{text}': {err}") from None
    if name == "inpaint-half":
        missing = args[0] if args else "bottom"
        if missing not in ("top", "bottom"):
            raise ValueError(f"operator '{text}': half '{missing}' is not top or bottom")
        return Mask.half(image_shape, missing)
    if name in ("sr", "sr-avg"):
        scale = int(_number(args[0], int, "scale", text))
        if scale < 2:
            raise ValueError(f"operator '{text}': scale {scale} is not >= 2")
        if h % scale or w % scale:
            raise ValueError(f"operator '{text}': scale {scale} does not divide the image size {h}x{w}")
        return Downsample(scale) if name == "sr" else AvgPool(scale)
    size = int(_number(args[0], int, "blur size", text))
    width = float(_number(args[1], float, "blur width", text))
    if size < 1 or size % 2 == 0:
        raise ValueError(f"operator '{text}': blur size {size} is not a positive odd integer")
    if size > 2 * max(h, w) + 1:  # wider changes nothing (zero padding) but the time and memory it takes
        raise ValueError(f"operator '{text}': blur size {size} is larger than 2 x {max(h, w)} + 1 for "
                         f"{h}x{w} images")
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(f"operator '{text}': blur width {args[1]} is not a positive number")
    return GaussianBlur(size, width)
