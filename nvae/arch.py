"""The architecture of an NVAE (paper sec. 3, table 6): ``model.arch`` in the presets.

The image's shape and bits come from :class:`nvae.spec.ImageSpec`, never from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from nvae.likelihoods import AUTO, check_name
from nvae.names import DMOL_BINS

BACKEND_NAMES = ("auto", "plain", "cpu")  # model.arch.backend: nvae.accel


@dataclass
class NVAEConfig:
    """Architecture of an NVAE (paper sec. 3 and table 6); the data shape comes from ImageSpec."""

    num_channels: int = 32
    """Channels of the first encoder cells ("ch"); doubled at every downsampling."""
    num_preprocess_blocks: int = 1
    """Encoder blocks before the latent scales, each halving the resolution."""
    num_preprocess_cells: int = 2
    """Cells per preprocessing block (the last one downsamples)."""
    num_postprocess_blocks: int = 1
    """Decoder blocks after the latent scales, each doubling the resolution."""
    num_postprocess_cells: int = 2
    """Cells per postprocessing block (the first one upsamples)."""
    num_latent_scales: int = 2
    """Spatial scales holding latent groups."""
    num_groups_per_scale: int = 10
    """Latent groups at the finest latent scale."""
    groups_halving: bool = False
    """Halve the number of groups at each coarser scale (the paper's 'adaptive' groups)."""
    min_groups_per_scale: int = 1
    """Lower bound on the groups of a scale when halving."""
    num_latent_per_group: int = 20
    """Latent channels per group."""
    num_cell_per_cond_enc: int = 2
    """Encoder cells per latent group."""
    num_cell_per_cond_dec: int = 2
    """Decoder cells per latent group."""
    num_flows: int = 0
    """Inverse autoregressive flow pairs on each group's posterior sample (0 = none)."""
    likelihood: str = AUTO
    """p(x | z): a name of :data:`nvae.likelihoods.LIKELIHOODS` ("bernoulli", "dmol"), or "auto", the
    paper's choice: Bernoulli for 1-bit data, the discretized mixture of logistics otherwise."""
    num_mixtures: int = 10
    """Logistic mixture components of the "dmol" likelihood."""
    use_se: bool = True
    """Squeeze-and-excitation at the end of every cell."""
    residual_posterior: bool = True
    """Parameterize q relative to the prior: N(mu_p + dmu, sigma_p * dsigma) (sec. 3.2)."""
    decoder_expand: int = 6
    """Channel expansion inside decoder cells."""
    postprocess_expand: int = 3
    """Channel expansion inside postprocessing cells."""
    dmol_bins: Literal["exact", "official"] = "exact"
    """Bins of the discretized logistic likelihood: "exact" (only the lowest and highest levels are
    edge bins, every bin's mass computed stably) or "official" (the official code's: a value above
    0.99 in [-1, 1] is a top edge bin, so 8-bit level 254 is too; bins under 1e-5 use the density).
    Converted official checkpoints use "official"; both are valid likelihoods of the same network."""
    backend: str = "auto"
    """How the layers run (:mod:`nvae.accel`): "plain" PyTorch; "cpu", hand-written autograd on the CPU
    (fused BN-Swish-conv chains storing a cell's input only, weight norm with spectral tokens, NHWC
    depthwise kernels; plain PyTorch off the CPU); "auto", "cpu" where its package is installed. The
    same function either way (tests/test_backends.py)."""
    fused_ops: Optional[bool] = None
    """The former spelling of ``backend`` (true: "cpu", false: "plain"), read from older checkpoints
    and configs; null otherwise."""

    def __post_init__(self) -> None:
        at_least = {1: ("num_channels", "num_preprocess_blocks", "num_preprocess_cells", "num_postprocess_blocks",
                        "num_postprocess_cells", "num_latent_scales", "num_groups_per_scale", "min_groups_per_scale",
                        "num_latent_per_group", "num_cell_per_cond_enc", "num_cell_per_cond_dec", "num_mixtures",
                        "decoder_expand", "postprocess_expand"),
                    0: ("num_flows",)}
        for low, names in at_least.items():
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < low:
                    raise ValueError(f"model.arch.{name} must be an integer >= {low}, got {value!r}")
        if self.fused_ops is not None:  # an older checkpoint's or config's spelling
            if not isinstance(self.fused_ops, bool):
                raise ValueError(f"model.arch.fused_ops must be true or false, got {self.fused_ops!r}")
            self.backend, self.fused_ops = ("cpu" if self.fused_ops else "plain"), None
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"model.arch.backend must be one of {', '.join(BACKEND_NAMES)}, got {self.backend!r}")
        check_name(self.likelihood)
        if self.dmol_bins not in DMOL_BINS:
            raise ValueError(f"model.arch.dmol_bins must be one of {', '.join(DMOL_BINS)}, got {self.dmol_bins!r}")
        if self.num_preprocess_blocks != self.num_postprocess_blocks:
            raise ValueError(f"model.arch.num_postprocess_blocks ({self.num_postprocess_blocks}) must equal "
                             f"num_preprocess_blocks ({self.num_preprocess_blocks}): each upsamples what one downsampled")
        if self.min_groups_per_scale > self.num_groups_per_scale:
            raise ValueError(f"model.arch.min_groups_per_scale ({self.min_groups_per_scale}) must not exceed "
                             f"num_groups_per_scale ({self.num_groups_per_scale})")

    def groups_per_scale(self) -> list[int]:
        """Groups of each latent scale, finest first (halved per coarser scale when asked)."""
        groups, n = [], self.num_groups_per_scale
        for _ in range(self.num_latent_scales):
            groups.append(n)
            if self.groups_halving:
                n = max(self.min_groups_per_scale, n // 2)
        return groups

    @property
    def downsampling(self) -> int:
        """Total spatial reduction between the image and the coarsest latent scale."""
        return 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)
