"""NVAE: a deep hierarchical VAE (Vahdat & Kautz, NeurIPS 2020, sec. 3).

Bottom-up encoder (stem, preprocessing, one tower over the latent scales, finest first) and a
top-down decoder (learned constant h0, one :class:`LatentGroup` per group, coarsest first, then
postprocessing and the likelihood head). A single top-down traversal, :meth:`NVAE.traverse`,
serves training (posterior samples), sampling (prior samples at a temperature), importance-weighted
evaluation and, through its per-group hook (:mod:`nvae.groups`), the latent API and restoration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from nvae.accel import install
from nvae.arch import NVAEConfig
from nvae.cells import DecoderCell, EncoderCell
from nvae.groups import GroupHook, GroupPosterior, GroupView, LatentGroup
from nvae.likelihoods import Likelihood, LikelihoodFamily, likelihood_family, likelihood_name
from nvae.limits import check_structure
from nvae.ops import CellStack, Conv2d
from nvae.ops.kernel_bank import KernelBank
from nvae.spec import ImageSpec
from nvae.topology import Topology

CHECKPOINT_MODES = ("none", "cell", "group")
__all__ = ["CHECKPOINT_MODES", "GroupHook", "GroupPosterior", "GroupView", "LatentGroup", "NVAE", "NVAEConfig",
           "NVAEOutput"]


@dataclass
class NVAEOutput:
    """What one pass through the model returns."""

    likelihood: Likelihood
    """p(x | z): the decoder's distribution over images."""
    kl: torch.Tensor
    """(B, G) KL of each latent group (analytic, or one-sample log q - log p with flows)."""
    log_q: torch.Tensor
    """(B,) log q(z | x) of the sampled latents, summed over groups (0 when sampling the prior)."""
    log_p: torch.Tensor
    """(B,) log p(z) of the sampled latents under the hierarchical prior."""
    kl_channels: torch.Tensor
    """(G, L) KL of each latent channel of each group, summed over positions, batch mean (diagnostics)."""


class NVAE(nn.Module):
    """The NVAE generative model and its encoder (sec. 3)."""

    def __init__(self, spec: ImageSpec, cfg: NVAEConfig) -> None:
        super().__init__()
        check_structure(spec, cfg)  # a file's numbers bounded before any module is built
        if spec.size % cfg.downsampling:
            raise ValueError(
                f"image size {spec.size} is not divisible by {cfg.downsampling}, the model's total downsampling "
                f"(2^(num_preprocess_blocks + num_latent_scales - 1)); pad or resize the images (data.image_size) "
                f"or change model.arch")
        self.spec, self.cfg = spec, cfg
        ch = cfg.num_channels
        self.stem = Conv2d(spec.channels, ch, 3, padding=1)

        pre: list[nn.Module] = []
        for _ in range(cfg.num_preprocess_blocks):
            for i in range(cfg.num_preprocess_cells):
                down = i == cfg.num_preprocess_cells - 1
                pre.append(EncoderCell(ch, 2 * ch if down else ch, down=down, use_se=cfg.use_se))
                ch = 2 * ch if down else ch
        self.preprocess = CellStack(*pre)

        # Encoder tower, finest scale first: per group its cells; a down cell after each scale but the coarsest.
        self.topology = topology = Topology.of(spec, cfg)
        self.enc_groups = nn.ModuleList()
        self.enc_down = nn.ModuleList()
        for scale, groups in topology.encoder_order():
            c = scale.channels
            for _ in groups:
                self.enc_groups.append(CellStack(*[EncoderCell(c, c, use_se=cfg.use_se)
                                                   for _ in range(cfg.num_cell_per_cond_enc)]))
            if scale.down_after:
                self.enc_down.append(EncoderCell(c, 2 * c, down=True, use_se=cfg.use_se))
        top = topology.scales[0]
        self.enc_top = nn.Sequential(nn.ELU(), Conv2d(top.channels, top.channels, 1), nn.ELU())

        # Decoder, coarsest scale first: learned h0, latent groups, an up cell before each scale but the coarsest.
        self.h0 = nn.Parameter(torch.rand(top.channels, top.size, top.size))
        self.dec_groups = nn.ModuleList()
        self.dec_up = nn.ModuleList()
        for group in topology.groups:
            c = topology.scales[group.scale].channels
            if group.up_before:
                self.dec_up.append(DecoderCell(2 * c, c, cfg.decoder_expand, up=True, use_se=cfg.use_se))
            self.dec_groups.append(LatentGroup(cfg, c, c, first=group.index == 0))

        ch = topology.scales[-1].channels
        post: list[nn.Module] = []
        for _ in range(cfg.num_postprocess_blocks):
            for i in range(cfg.num_postprocess_cells):
                up = i == 0
                post.append(DecoderCell(ch, ch // 2 if up else ch, cfg.postprocess_expand, up=up, use_se=cfg.use_se))
                ch = ch // 2 if up else ch
        self.postprocess = CellStack(*post)
        self.head = nn.Sequential(nn.ELU(), Conv2d(ch, self.likelihood_family.head_channels(spec, cfg), 3, padding=1))
        self.backend = install(self, cfg.backend)  # "plain" or "cpu": nvae.accel
        # Every convolution's kernel for a training step in a few batched calls (the spectral
        # regularizer's groups: both use nvae.ops.kernel_bank.group_convs in module order).
        self.kernel_bank = KernelBank([m for m in self.modules() if isinstance(m, Conv2d)])

    def set_checkpointing(self, mode: bool | str) -> None:
        """Activation checkpointing: recompute activations in backward instead of storing them.

        ``"cell"``: per cell (every cell's input is kept). ``"group"`` (or True): per latent group
        and per cell stack: each decoder group (cells, prior, posterior, flows, combiners), each
        encoder group and the pre-/postprocessing stacks are recomputed as one unit, so only their
        inputs are kept. ``"none"`` (or False): off. Under either mode decoder cells also recompute
        their expanded maps when they run backward (``DecoderCell.recompute_expanded``).
        """
        if isinstance(mode, bool):
            mode = "group" if mode else "none"
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"model.gradient_checkpointing must be one of {', '.join(CHECKPOINT_MODES)} or a "
                             f"boolean, got {mode!r}")
        for m in self.modules():
            if isinstance(m, CellStack):
                m.checkpoint = {"none": "none", "cell": "cell", "group": "stack"}[mode]
            elif isinstance(m, DecoderCell):
                m.recompute_expanded = mode != "none"
        for group in self.dec_groups:
            group.recompute = mode == "group"
            if mode == "group":
                group.cells.checkpoint = "none"  # recomputed with the group

    @property
    def num_groups(self) -> int:
        return len(self.dec_groups)

    def encode_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Bottom-up pass: one feature map per latent group, coarsest (top) group first."""
        h = self.preprocess(self.stem(2.0 * x - 1.0))
        feats: list[torch.Tensor] = [h] * self.num_groups  # each replaced below
        enc_groups, enc_down = iter(self.enc_groups), iter(self.enc_down)
        for scale, groups in self.topology.encoder_order():
            for group in groups:
                h = next(enc_groups)(h)
                feats[group.index] = h
            if scale.down_after:
                h = next(enc_down)(h)
        feats[0] = self.enc_top(feats[0])
        return feats

    def traverse(self, batch: int, feats: list[torch.Tensor] | None = None, temperature: float = 1.0,
                 hook: GroupHook | None = None, use_mean: bool = False) -> NVAEOutput:
        """The one top-down traversal: posterior samples when ``feats`` (:meth:`encode_features`) is
        given, prior samples at ``temperature`` otherwise; ``use_mean`` takes posterior means.

        ``hook`` is called on every group, top first, with a :class:`GroupView` (index, prior given
        the latents above, posterior before the flows when encoding, flows) and returns the latent to
        pass down, or None for the default choice. KL and log q count only default posterior choices.
        """
        h = self.h0.unsqueeze(0).expand(batch, -1, -1, -1)  # (B, C, h, w)
        kls, kl_channels, log_q, log_p = [], [], 0.0, 0.0
        up = iter(self.dec_up)
        for slot, group in zip(self.topology.groups, self.dec_groups):
            if slot.up_before:
                h = next(up)(h)
            i, shape = slot.index, self.topology.latent_shape(slot, batch)
            h, kl, lq, lp = group(h, None if feats is None else feats[i], temperature, shape, use_mean, hook, i)
            per_channel = kl.sum(dim=(2, 3))  # (B, L)
            kls.append(per_channel.sum(dim=1))
            kl_channels.append(per_channel.detach().mean(dim=0))
            log_q = log_q + lq.sum(dim=(1, 2, 3))
            log_p = log_p + lp.sum(dim=(1, 2, 3))
        params = self.head(self.postprocess(h))
        return NVAEOutput(self._likelihood(params), torch.stack(kls, dim=1), log_q, log_p, torch.stack(kl_channels))

    @property
    def likelihood_family(self) -> LikelihoodFamily:
        """How the head parameterizes p(x | z) (``model.arch.likelihood``: :mod:`nvae.likelihoods`)."""
        return likelihood_family(self.spec, self.cfg)

    @property
    def likelihood_name(self) -> str:
        """The name of :attr:`likelihood_family` (``auto`` resolved)."""
        return likelihood_name(self.cfg.likelihood, self.spec.num_bits)

    def _likelihood(self, params: torch.Tensor) -> Likelihood:
        params = params.float()  # the likelihood is evaluated in float32 under mixed precision
        return self.likelihood_family.build(params, self.spec, self.cfg)

    def forward(self, x: torch.Tensor, use_mean: bool = False) -> NVAEOutput:
        """Encode x (B, C, H, W) in [0, 1], sample the posterior (every group at its mean, pushed
        through the flows, with ``use_mean``), decode."""
        return self.traverse(x.shape[0], self.encode_features(x), use_mean=use_mean)

    def log_likelihood(self, likelihood: Likelihood, x: torch.Tensor) -> torch.Tensor:
        """(B,) log p(x | z) over the image interior (the data's padding is not modelled)."""
        logp = likelihood.log_prob(x)  # (B, C, H, W) or (B, H, W)
        p = self.spec.pad
        if p > 0:
            logp = logp[..., p:-p, p:-p]
        return logp.flatten(1).sum(dim=1)

    @classmethod
    def from_pretrained(cls, source: str, device: str | torch.device = "cpu", use_ema: bool = True) -> "NVAE":
        """The NVAE of a model directory (``config.json`` + ``model.safetensors``; nothing unpickled) or of a
        Hugging Face Hub repository ``owner/name`` (with ``nvae[hub]``), in eval mode: :mod:`nvae.pretrained`."""
        from nvae.pretrained import load_model_dir  # model files are read by a layer above the model

        return load_model_dir(source, device, use_ema, cls).model

    def save_pretrained(self, folder: str, card: str = "", data: Optional[dict] = None, overwrite: bool = False) -> None:
        """Write this model's current weights, architecture and memory format as a model directory
        (:func:`nvae.pretrained_save.save_model_dir`); ``data`` records a data module for ``evaluate.py``
        (``{"class_path": ..., "init_args": {...}}``; ``nvae-export`` records the training run's)."""
        from nvae.pretrained_save import save_model_dir  # imports this module

        channels_last = any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                            for p in self.parameters())
        save_model_dir(self, folder, data=data, provenance={"source": "NVAE.save_pretrained"}, card=card,
                       channels_last=channels_last, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, card: str = "") -> str:
        """Upload this model as a model directory to the Hugging Face Hub (needs ``nvae[hub]`` and a login)."""
        import tempfile

        from huggingface_hub import HfApi

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, card)
            HfApi().create_repo(repo_id, exist_ok=True)
            return str(HfApi().upload_folder(repo_id=repo_id, folder_path=folder))

    @torch.no_grad()
    def sample(self, num: int, temperature: float = 1.0, mean: bool = True,
               quantize: Optional[bool] = None) -> torch.Tensor:
        """Images (num, C, H, W) in [0, 1] from the prior at ``temperature`` (sec. 4, sampling).

        ``mean`` returns the likelihood's mean instead of a sample from it; ``quantize`` rounds that
        mean to the bit grid or not (None: the likelihood's default, rounded for multi-bit data).
        """
        out = self.traverse(num, None, temperature)
        if not mean:
            return out.likelihood.sample()
        return out.likelihood.mean() if quantize is None else out.likelihood.mean(quantize=quantize)

    # ------------------------------------------------------------------------------- latent API
    def encode(self, x: torch.Tensor, use_mean: bool = True) -> list[GroupPosterior]:
        """Per-group posteriors of images x (B, C, H, W) in [0, 1], top (coarsest) group first.

        The hierarchy is conditional: group i's posterior depends on the latents chosen above it,
        here their means (``use_mean``, deterministic) or samples. ``decode([g.z for g in ...])``
        retraces the same path.
        """
        trace: list[GroupPosterior] = []

        def record(view: GroupView) -> torch.Tensor:
            q = view.posterior
            z = view.flows(q.mu if use_mean else q.sample())
            trace.append(GroupPosterior(q.mu, q.sigma, z))
            return z

        self.traverse(x.shape[0], self.encode_features(x), hook=record)
        return trace

    def decode(self, latents: Sequence[torch.Tensor | None], temperature: float = 1.0,
               mean: bool = True) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] from fixed latents; groups left out (None, or past the
        end of the list) are drawn from the prior at ``temperature``."""
        given = [z for z in latents if z is not None]
        if not given:
            raise ValueError("decode needs at least one latent; use sample() to draw every group from the prior")
        if len(latents) > self.num_groups:
            raise ValueError(f"{len(latents)} latents given, the model has {self.num_groups} groups")
        out = self.traverse(given[0].shape[0], None, temperature,
                            hook=lambda view: latents[view.index] if view.index < len(latents) else None)
        return out.likelihood.mean() if mean else out.likelihood.sample()

    def reconstruct(self, x: torch.Tensor, keep_groups: int | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Decode x's posterior means for the top ``keep_groups`` groups (all when None), prior below."""
        keep = self.num_groups if keep_groups is None else keep_groups
        if not 0 <= keep <= self.num_groups:
            raise ValueError(f"keep_groups must be in 0..{self.num_groups}, got {keep_groups}")
        if keep == 0:
            return self.sample(x.shape[0], temperature)
        latents = [g.z for g in self.encode(x)]
        return self.decode(latents[:keep], temperature)

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """(steps, B, C, H, W): decodes of the latents on the line between the posteriors of a and b."""
        za, zb = [g.z for g in self.encode(a)], [g.z for g in self.encode(b)]
        frames = [self.decode([(1 - t) * u + t * v for u, v in zip(za, zb)])
                  for t in torch.linspace(0.0, 1.0, steps).tolist()]
        return torch.stack(frames)
