"""The layout of an NVAE's latent hierarchy, computed once from its configuration (paper sec. 3.1,
fig. 2; table 6 for the sizes).

The latent groups live on ``num_latent_scales`` spatial scales. The decoder visits them top-down,
coarsest scale first, with an up cell between scales; the encoder tower visits them bottom-up,
finest first, with a down cell between scales. Every group of a scale has the same channels and
latent shape. The model builds and traverses from this table, the official-checkpoint map walks its
tensor names in the same order, and KL balancing (appendix A) weighs each group by its scale.
"""
from __future__ import annotations

from dataclasses import dataclass

from nvae.arch import NVAEConfig
from nvae.spec import ImageSpec


@dataclass(frozen=True)
class Scale:
    """One spatial scale of latent groups; scale 0 is the coarsest."""

    index: int
    groups: int
    """Latent groups on this scale."""
    channels: int
    """Channels of the encoder and decoder features at this scale."""
    size: int
    """Height and width of its features and latents."""

    @property
    def down_after(self) -> bool:
        """The encoder halves the resolution after this scale (every scale but the coarsest)."""
        return self.index > 0


@dataclass(frozen=True)
class Group:
    """One latent group, as the decoder meets it; group 0 is the top (coarsest) one."""

    index: int
    scale: int
    """Index of its :class:`Scale` (0 = coarsest)."""
    up_before: bool
    """The first group of a scale below the top one: the decoder's up cell runs just before it."""


@dataclass(frozen=True)
class Topology:
    """Scales (coarsest first) and groups (top first) of an NVAE, with their sizes."""

    scales: tuple[Scale, ...]
    groups: tuple[Group, ...]
    latent_channels: int
    """Channels of every group's latent z."""

    @classmethod
    def of(cls, spec: ImageSpec, cfg: NVAEConfig) -> "Topology":
        """The layout that ``cfg`` gives images of ``spec`` (whose size the downsampling divides)."""
        finest_first = cfg.groups_per_scale()
        n = len(finest_first)
        top = spec.size // cfg.downsampling
        finest_channels = cfg.num_channels * 2 ** cfg.num_preprocess_blocks  # doubled by each preprocessing block
        scales = tuple(Scale(s, finest_first[n - 1 - s], finest_channels * 2 ** (n - 1 - s), top * 2 ** s)
                       for s in range(n))
        groups: tuple[Group, ...] = ()
        for scale in scales:
            below_top = scale.index > 0  # the up cell runs before its first group
            groups += tuple(Group(len(groups) + g, scale.index, g == 0 and below_top) for g in range(scale.groups))
        return cls(scales, groups, cfg.num_latent_per_group)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def latent_shape(self, group: Group, batch: int) -> tuple[int, int, int, int]:
        """(B, L, h, w) of ``group``'s latent."""
        size = self.scales[group.scale].size
        return batch, self.latent_channels, size, size

    def encoder_order(self) -> list[tuple[Scale, list[Group]]]:
        """The encoder tower's order: scales finest first, each with its groups bottom-up (the
        decoder's last group first); a down cell follows every scale but the coarsest."""
        return [(scale, [g for g in reversed(self.groups) if g.scale == scale.index]) for scale in reversed(self.scales)]

    @property
    def group_scales(self) -> list[int]:
        """Each group's scale index, top group first (what KL balancing weighs by: appendix A)."""
        return [g.scale for g in self.groups]

    @property
    def groups_per_scale(self) -> list[int]:
        """Groups of each scale, coarsest first."""
        return [s.groups for s in self.scales]


__all__ = ["Group", "Scale", "Topology"]
