"""RLR (He et al., "Learning Unified Reference Representation for Unsupervised Multi-class Anomaly
Detection", ECCV 2024) as an :class:`~uad.methods.base.AnomalyMethod`.

Frozen ImageNet CNN (EfficientNet-B6, stages 1-3 at 256 x 256) -> 3x3 local averaging (eq. 1-2)
-> per level, tokens perturbed by feature jitter during training (eq. 3) are reconstructed from a
learnable reference by blocks of Local Cross Attention + Masked Learnable Key Attention without a
residual shortcut (eq. 4-12) -> loss: MSE + cosine per level, summed (eq. 13-14); map: mean over
levels of upsampled (squared error + cosine distance) (eq. 15-16); image score: max of the
sigma-4 smoothed map. Adam lr 1e-4, 200 epochs, one model for all classes.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import torch
from torch import nn

from ..base import AnomalyMethod, OptimSetup, Prediction
from ..capabilities import Reconstruction
from ..common.scoring import gaussian_blur
from ..registry import register
from .config import RLRConfig
from .losses import anomaly_map, feature_jitter, local_average, reconstruction_loss
from .model import ReferenceReconstructor, RLRModel

__all__ = ["RLR"]


@register("rlr")
class RLR(AnomalyMethod, Reconstruction):
    """Reconstruct frozen CNN features from a learnable reference; see the module docstring."""

    stages = ("train",)
    config_class = RLRConfig

    def __init__(self, params: Mapping[str, Any] | None = None):
        super().__init__(params)
        self.cfg = self.config = RLRConfig.from_params(self.params)
        cfg = self.cfg
        self.encoder = self.build_encoder(kind="cnn")  # RLR reconstructs CNN feature maps
        # Map sizes come from the backbone itself (one probe at the crop size), channels and strides
        # from its feature info: any timm CNN works, nothing is hard-coded.
        with torch.no_grad():
            probe = self.encoder(torch.zeros(1, 3, cfg.crop, cfg.crop)).maps
        grids = [(int(m.shape[-2]), int(m.shape[-1])) for m in probe]
        kinds = list(cfg.attention)
        weights = [cfg.mixer_weight(k) for k in kinds]
        levels = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for pos, (stage, channels, stride, grid) in enumerate(
                zip(self.encoder.layers, self.encoder.channels, self.encoder.reductions, grids)
            ):
                levels.append(ReferenceReconstructor(
                    int(channels), grid, cfg.hidden_dim(pos, int(stage)), cfg.window(pos, int(stride)),
                    depth=cfg.depth, num_heads=cfg.num_heads,
                    mlp_ratio=cfg.mlp_ratio, kinds=kinds, weights=weights, residual=cfg.residual,
                    io_projection=cfg.io_projection, pos_embed=cfg.pos_embed, reference_std=cfg.reference_std,
                ))
        self.model = RLRModel(levels)

    # per-level settings, as the reconstructors hold them
    @property
    def grids(self) -> list[tuple[int, int]]:
        return [lvl.grid for lvl in self.model.levels]

    @property
    def windows(self) -> list[int]:
        return [lvl.window_size for lvl in self.model.levels]

    @property
    def hidden_dims(self) -> list[int]:
        return [lvl.dim for lvl in self.model.levels]

    # --- contract ---------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "model": self.model}

    # --- features and reconstruction ----------------------------------------------------------
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Locally aware frozen features (eq. 1-2) as tokens: [(B, N_j, C_j)] float32 (no_grad)."""
        with torch.no_grad(), self.autocast():
            maps = self.encoder(images).maps
        feats = [local_average(m.float(), self.cfg.neighbourhood) for m in maps]
        return [f.flatten(2).transpose(1, 2) for f in feats]  # B, C, h, w -> B, N, C

    def reconstruct(self, images: torch.Tensor, perturb: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(targets, reconstructions)`` per level, (B, N_j, C_j) each. ``perturb``: feature jitter
        on the inputs (training, eq. 3); the targets are always the clean features."""
        targets = self.encode(images)
        inputs = targets
        if perturb:
            inputs = [feature_jitter(t, self.cfg.noise_scale, self.cfg.noise_prob) for t in targets]
        with self.autocast():
            outputs = self.model(inputs)
        return targets, outputs

    # --- training -------------------------------------------------------------------------
    def iterations_for(self, num_train_samples: int) -> int:
        """``ceil(epochs * n / batch_size)``: as many samples as the code's epochs (last partial
        batch included), unless ``iterations`` is set."""
        if self.cfg.iterations is not None:
            return int(self.cfg.iterations)
        return int(math.ceil(self.cfg.epochs * max(1, num_train_samples) / self.cfg.batch_size))

    def configure_optimization(self, stage: str, num_train_samples: int) -> OptimSetup:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        return OptimSetup(optimizer=optimizer, scheduler=None, iterations=self.iterations_for(num_train_samples),
                          grad_clip_norm=None, parameters=params)

    def training_step(self, stage: str, batch: Mapping[str, Any], step: int) -> torch.Tensor | list:
        """Eq. 14: sum over levels of (MSE + cosine) between reconstruction and clean features.
        With ``optimizer_steps: per_level``: one loss function per level, which the engine calls and
        steps one after the other (each level's jitter, forward and loss after the previous level's
        Adam step, as the released loop)."""
        images = batch["image"] if isinstance(batch, Mapping) else batch
        if self.cfg.optimizer_steps == "per_level":
            targets = self.encode(images)
            return [functools.partial(self._level_loss, j, t) for j, t in enumerate(targets)]
        targets, outputs = self.reconstruct(images, perturb=True)
        return sum(reconstruction_loss(o, t, self.cfg.distance) for o, t in zip(outputs, targets))

    def _level_loss(self, level: int, target: torch.Tensor) -> torch.Tensor:
        """Level ``level``'s jitter, reconstruction and loss (eq. 3, 13-14)."""
        x = feature_jitter(target, self.cfg.noise_scale, self.cfg.noise_prob)
        return reconstruction_loss(self.model.levels[level](x), target, self.cfg.distance)

    # --- inference --------------------------------------------------------------------------
    def anomaly_maps(self, images: torch.Tensor, targets=None, outputs=None) -> torch.Tensor:
        """Eq. 15-16 at the input size, (B, H, W) float32 (smoothed only if ``map_sigma > 0``);
        from given ``targets`` / ``outputs`` (:meth:`reconstruct`) when passed."""
        if targets is None or outputs is None:
            targets, outputs = self.reconstruct(images)
        maps = anomaly_map(outputs, targets, self.grids, tuple(images.shape[-2:]), self.cfg.distance)
        if self.cfg.map_sigma > 0:
            maps = gaussian_blur(maps[:, None], self.cfg.map_sigma, None, padding="reflect")[:, 0]
        return maps

    def prediction_from(self, images: torch.Tensor, targets, outputs) -> Prediction:
        """Maps (eq. 16) and image scores (the max of the map smoothed as ``gaussian_filter(sigma=4)``)
        from :meth:`reconstruct`'s output, on the device."""
        with torch.no_grad():
            maps = self.anomaly_maps(images, targets, outputs)
            smooth = gaussian_blur(maps[:, None], self.cfg.score_sigma, None, padding="reflect")[:, 0]
            scores = smooth.flatten(1).max(dim=1).values
        return Prediction(scores=scores.float(), maps=maps.float())

    def predict(self, images: torch.Tensor) -> Prediction:
        self.eval_mode()
        with torch.no_grad():
            out = self.prediction_from(images, *self.reconstruct(images))
        return Prediction(scores=out.scores.cpu(), maps=out.maps.cpu())

    # --- bookkeeping ----------------------------------------------------------------------
    def tags(self) -> dict[str, str]:
        return {
            **self.encoder_tags(),
            "attention": "+".join(self.cfg.attention),
            "windows": ",".join(str(w) for w in self.windows),
            "hidden_dims": ",".join(str(d) for d in self.hidden_dims),
        }
