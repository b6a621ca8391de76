"""INP-Former++ (Luo et al.) as an :class:`~uad.methods.base.AnomalyMethod`.

Two decoupled stages (Fig. 2):

* ``"reconstruction"`` (normal pattern modelling, eq. 6): frozen DINOv2-R encoder -> fused
  tokens F_Q -> INP Extractor (M INPs) and Bottleneck -> 8 INP-guided decoder blocks; encoder
  and decoder layers fused into 2 groups; loss ``L_sm + lambda * L_sc`` (eq. 5 + eq. 3). Trains
  bottleneck, extractor and decoder on normal images.
* ``"residual"`` (residual learning, eq. 7-8): the reconstruction model is frozen; its forward
  pass runs under ``torch.no_grad`` and the eq. 7 residual is detached (stop-gradient), so only the
  segmentation head learns, with the Dice loss, on pseudo-anomalous images. The batch then holds
  ``image`` (already synthesised by the data loader through the synthesis pipeline's augment
  hook: Perlin + DTD pseudo anomalies, and in the semi-supervised setting real anomaly regions
  pasted into normal images) and ``mask`` (B, 1, H, W) in {0, 1}. :meth:`wants_synthesis` tells the
  pipeline which stage needs them. Skipped when ``residual_learning=False``.

Inference (eq. 9): ``A = (Theta(A_rec) + M_pred) / 2``, Gaussian-smoothed (sigma 4, 5x5 kernel as
in the official evaluation); image score = mean of the top 1% of A.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch
from torch import nn

from ..base import OptimSetup
from ..common.groups import fuse_groups
from ..common.optim import StableAdamW, WarmCosineSchedule
from ..common.recon import Encoded, ViTReconstructionMethod
from ..registry import register
from .config import INPFormerConfig
from .losses import dice_loss, inp_coherence_loss_hard, inp_coherence_loss_soft, plain_global_cosine_loss, soft_mining_loss
from .model import INPFormerModel, combine_anomaly_maps, reconstruction_error_map, residual_features

__all__ = ["INPFormer"]

STAGES = ("reconstruction", "residual")


@register("inpformer")
class INPFormer(ViTReconstructionMethod):
    """INP-Former++; see the module docstring. ``params``: :class:`INPFormerConfig` fields."""

    config_class = INPFormerConfig
    stages = STAGES
    cfg: INPFormerConfig

    def __init__(self, params: Mapping[str, Any] | None = None):
        super().__init__(params)
        if len(self.layers) != self.cfg.decoder_depth:
            raise ValueError(f"{len(self.layers)} encoder layers {self.layers} but decoder_depth={self.cfg.decoder_depth}")
        self.stages = self.cfg.stages
        self._stage = "reconstruction"

    # --- construction ----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        cfg = self.cfg
        dim = self.embed_dim
        heads = self.decoder_heads()
        return INPFormerModel(
            dim,
            heads,
            depth=cfg.decoder_depth,
            num_inp_tokens=cfg.num_inp_tokens,
            use_inp=cfg.use_inp,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            ln_eps=cfg.ln_eps,
            bottleneck_dropout=cfg.bottleneck_dropout,
            bottleneck_ratio=cfg.bottleneck_ratio,
            init_std=cfg.init_std,
            seg_channels=cfg.seg_channels if cfg.residual_learning else None,
        )

    def _check_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise ValueError(f"inpformer has no stage {stage!r}; stages: {self.stages}")

    def modules(self) -> dict[str, nn.Module]:
        m = self.model
        mods: dict[str, nn.Module] = {"encoder": self.encoder, "bottleneck": m.bottleneck}
        if m.extractor is not None:
            mods["extractor"] = m.extractor
        mods["decoder"] = m.decoder
        if m.seg_head is not None:
            mods["seg_head"] = m.seg_head
        return mods

    def reconstruction_parameters(self) -> list[nn.Parameter]:
        """Bottleneck + extractor (INP tokens included) + decoder parameters."""
        m = self.model
        mods = [m.bottleneck, m.decoder] + ([m.extractor] if m.extractor is not None else [])
        return [p for mod in mods for p in mod.parameters()]

    def train_mode(self, stage: str) -> None:
        self._check_stage(stage)
        joint = stage == "residual" and not self.cfg.residual_stop_gradient
        for name, mod in self.modules().items():
            if name == "encoder":
                mod.eval()
            elif name == "seg_head":
                mod.train(stage == "residual")
            else:  # reconstruction modules: frozen (eval) during residual learning unless RL‡
                mod.train(stage == "reconstruction" or joint)

    # --- forward pieces --------------------------------------------------------------------
    def _forward(self, enc: Encoded):
        dec, inps, fused = self.run_model(enc.tokens)
        return fuse_groups(enc.tokens, self.groups), fuse_groups(dec, self.groups), fused, inps

    def decode(self, enc: Encoded) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encoder / decoder group features, (B, N, C) patch tokens each."""
        enc_groups, dec_groups, _, _ = self._forward(enc)
        return enc_groups, dec_groups

    def segment(self, enc_groups, dec_groups, grid: tuple[int, int], size: tuple[int, int],
                stop_gradient: bool = True) -> torch.Tensor:
        """Seg-head logits (B, 1, H, W) at ``size`` from the eq. 7 residual of the groups."""
        if self.model.seg_head is None:
            raise RuntimeError("residual_learning is off: there is no segmentation head")
        res = residual_features(enc_groups, dec_groups, dim=-1, stop_gradient=stop_gradient)  # B, N, C
        b, n, c = res.shape
        res = res.transpose(1, 2).reshape(b, c, *grid)  # B, N, C -> B, C, h, w
        with self.autocast():
            logits = self.model.seg_head(res, out_size=tuple(size))
        return logits.float()

    # --- losses ------------------------------------------------------------------------------
    def loss(self, enc_groups: list[torch.Tensor], dec_groups: list[torch.Tensor], step: int) -> torch.Tensor:
        """Reconstruction loss: L_sm (eq. 5) or, with ``soft_mining=False``, plain global cosine."""
        if self.cfg.soft_mining:
            return soft_mining_loss(enc_groups, dec_groups, gamma=self.cfg.gamma, dim=-1, mse_reduction=self.cfg.mse_reduction)
        return plain_global_cosine_loss(enc_groups, dec_groups)

    def coherence_loss(self, fused: torch.Tensor, inps: torch.Tensor | None) -> torch.Tensor | None:
        """L_sc (eq. 3) or L_c (eq. 2) between F_Q and the INPs; None when switched off."""
        if inps is None or self.cfg.coherence == "none":
            return None
        fn = inp_coherence_loss_soft if self.cfg.coherence == "soft" else inp_coherence_loss_hard
        return fn(fused, inps)

    def training_step(self, stage: str, batch: Mapping[str, Any], step: int) -> torch.Tensor:
        self._check_stage(stage)
        images = batch["image"] if isinstance(batch, Mapping) else batch
        enc = self.encode(images)
        if stage == "reconstruction":
            with self.autocast():
                enc_groups, dec_groups, fused, inps = self._forward(enc)
            loss = self.loss(enc_groups, dec_groups, self.ramp_step(step))  # eq. 6: L_sm + lambda L_sc
            coh = self.coherence_loss(fused, inps)
            return loss if coh is None else loss + self.cfg.coherence_weight * coh
        # residual learning (eq. 7-8)
        if not isinstance(batch, Mapping) or "mask" not in batch:
            raise KeyError("the residual stage needs batches with 'image' (pseudo-anomalous) and 'mask' (B, 1, H, W)")
        stop = self.cfg.residual_stop_gradient
        with torch.set_grad_enabled(not stop), self.autocast():
            enc_groups, dec_groups, _, _ = self._forward(enc)
        logits = self.segment(enc_groups, dec_groups, enc.grid, tuple(images.shape[-2:]), stop_gradient=stop)
        target = (batch["mask"].float() > 0.5).float()
        return dice_loss(torch.sigmoid(logits), target, per_image=self.cfg.dice_per_image)

    # --- inference ---------------------------------------------------------------------------
    def anomaly_map(self, images: torch.Tensor, enc: Encoded, enc_groups, dec_groups) -> torch.Tensor:
        """Eq. 9 map (B, H, W) at the input size: ``(Theta(A_rec) + M_pred) / 2``, smoothed."""
        size = tuple(images.shape[-2:])
        a_rec = reconstruction_error_map(enc_groups, dec_groups, enc.grid, self.cfg.rec_map)
        m_pred = None
        if self.model.seg_head is not None:
            m_pred = torch.sigmoid(self.segment(enc_groups, dec_groups, enc.grid, size))
        return combine_anomaly_maps(a_rec, m_pred, size, self.cfg.sigma, self.cfg.gaussian_kernel_size)

    # --- optimisation ------------------------------------------------------------------------
    def iterations_for(self, num_train_samples: int) -> int:
        """``iterations`` if set, else ``epochs * (num_train_samples // batch_size)`` (>= 1)."""
        return self._budget(self.cfg.iterations, self.cfg.epochs, num_train_samples)

    def _budget(self, iterations: int | None, epochs: int, n: int) -> int:
        if iterations:
            return int(iterations)
        return int(epochs) * max(1, int(n) // int(self.cfg.batch_size))

    def _stage_lrs(self, stage: str) -> tuple[float, float, int]:
        cfg = self.cfg
        if stage == "residual":
            return cfg.residual_lr, cfg.residual_final_lr, cfg.residual_warmup_iters
        return cfg.lr, cfg.final_lr, cfg.warmup_iters

    def _schedule(self, optimizer: torch.optim.Optimizer, total: int, warmup: int) -> WarmCosineSchedule:
        base, final, _ = self._stage_lrs(self._stage)
        return WarmCosineSchedule(optimizer, base_lr=base, final_lr=final, total_iters=total, warmup_iters=min(warmup, total))

    def configure_optimization(self, stage: str, num_train_samples: int) -> OptimSetup:
        """Reconstruction stage: bottleneck + extractor + decoder, StableAdamW (lr 5e-4, wd 1e-4,
        AMSGrad, eps 1e-10), warm-up cosine, grad clip 0.1. Residual stage: the seg head only
        (plus the reconstruction model for RL‡), StableAdamW with the ``residual_*`` settings."""
        self._check_stage(stage)
        cfg = self.cfg
        self._stage = stage
        self._ramp_scale = 1.0
        if stage == "reconstruction":
            params = self.reconstruction_parameters()
            lr, wd, clip = cfg.lr, cfg.weight_decay, cfg.grad_clip
            iterations = self.iterations_for(num_train_samples)
        else:
            params = list(self.model.seg_head.parameters())
            if not cfg.residual_stop_gradient:
                params += self.reconstruction_parameters()
            lr, wd, clip = cfg.residual_lr, cfg.residual_weight_decay, cfg.residual_grad_clip
            iterations = self._budget(cfg.residual_iterations, cfg.residual_epochs, num_train_samples)
        optimizer = StableAdamW(params, lr=lr, betas=cfg.betas, weight_decay=wd, eps=cfg.eps, amsgrad=cfg.amsgrad,
                                clip_threshold=cfg.update_clip)
        _, _, warmup = self._stage_lrs(stage)
        return OptimSetup(optimizer=optimizer, scheduler=self._schedule(optimizer, iterations, warmup),
                          iterations=iterations, grad_clip_norm=clip, parameters=params)

    def rescale_schedule(self, setup: OptimSetup, iterations: int) -> OptimSetup:
        scale = iterations / max(1, setup.iterations)
        self._ramp_scale = scale
        _, _, warmup = self._stage_lrs(self._stage)
        warmup = int(math.floor(warmup * scale))
        return dataclasses.replace(setup, scheduler=self._schedule(setup.optimizer, iterations, warmup), iterations=iterations)

    # --- bookkeeping -------------------------------------------------------------------------
    def tags(self) -> dict[str, str]:
        tags = super().tags()
        cfg = self.cfg
        tags.update(
            use_inp=str(cfg.use_inp),
            num_inp_tokens=str(cfg.num_inp_tokens),
            coherence=cfg.coherence,
            soft_mining=str(cfg.soft_mining),
            residual_learning=str(cfg.residual_learning),
            residual_stop_gradient=str(cfg.residual_stop_gradient),
        )
        return tags
