"""What the model needs to know about the images it models (paper sec. 4, data).

A data module exposes an :class:`ImageSpec`; the command line links it into the model, so image
shape and bit depth are never given twice.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageSpec:
    """Shape and quantization of the images a model is trained on."""

    channels: int = 1
    """Image channels (1 gray, 3 RGB)."""
    size: int = 32
    """Height and width of the (square) network input, padding included."""
    num_bits: int = 8
    """Bits per channel: 1 is binary data; 2..8 levels on the grid k / (2^bits - 1)."""
    pad: int = 0
    """Border (pixels per side) added by the data pipeline; the likelihood ignores it."""

    def __post_init__(self) -> None:
        for name in ("channels", "size", "num_bits", "pad"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"image_spec.{name} must be an integer, got {value!r}")
        if self.channels < 1:
            raise ValueError(f"image_spec.channels must be >= 1, got {self.channels}")
        if not 1 <= self.num_bits <= 8:
            raise ValueError(f"image_spec.num_bits must be in 1..8 (1 = binary), got {self.num_bits}")
        if self.size < 1:
            raise ValueError(f"image_spec.size must be >= 1, got {self.size}")
        if self.pad < 0 or 2 * self.pad >= self.size:
            raise ValueError(f"image_spec.pad must be >= 0 and leave pixels inside size {self.size}, got {self.pad}")

    @property
    def num_dims(self) -> int:
        """Number of modelled values per image (the padding excluded): bits/dim divides by this."""
        inner = self.size - 2 * self.pad
        return self.channels * inner * inner
