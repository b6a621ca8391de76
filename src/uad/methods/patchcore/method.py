"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) as an
:class:`~uad.methods.base.AnomalyMethod` — the baseline the five papers compare to.

fit: frozen CNN features of every normal training image -> locally aware patch features ->
memory bank of all patches -> greedy coreset (10 %). predict: distance of every test patch to its
nearest memory-bank patch = patch score map; image score = max patch score (optionally
re-weighted, eq. 7); map upsampled to the crop size and Gaussian-smoothed (sigma 4).

A ViT backbone is accepted too: its patch tokens of the requested blocks are the stage maps, which
with ``neighbourhood: 1`` and ``coreset_ratio: 1.0`` is AnomalyDINO's DINOv2 patch matching (the
embedding base CostFilter-AD's paper filters as "AnomalDF").
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..base import AnomalyMethod, Prediction
from ..capabilities import FeatureFitting
from ..registry import register
from .config import PatchCoreConfig
from .model import aggregate_patches, flatten_patches, greedy_coreset, nearest_neighbors, reweighted_image_score, smooth_maps

__all__ = ["PatchCore"]

log = logging.getLogger("uad.methods.patchcore")


@register("patchcore")
class PatchCore(AnomalyMethod, FeatureFitting):
    """Memory-bank anomaly detection on frozen CNN patch features (no gradient training)."""

    config_class = PatchCoreConfig

    stages = ("fit",)  # the encoder is frozen and training sees no augmentation: a features stage (declared)

    def __init__(self, params: Mapping[str, Any] | None = None):
        super().__init__(params)
        self.config = self.cfg = PatchCoreConfig.from_params(self.params)
        cfg = self.cfg
        self.encoder = self.build_encoder()
        self.memory_bank: torch.Tensor = torch.empty(0, cfg.target_dim)

    # --- contract ---------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder}

    def to(self, device: torch.device | str, autocast_dtype: torch.dtype | None = None) -> "PatchCore":
        super().to(device, autocast_dtype)
        self.memory_bank = self.memory_bank.to(self.device)
        return self

    # --- features ---------------------------------------------------------------------------
    @torch.no_grad()
    def stage_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen encoder's requested stages as (B, C, h, w) maps: a CNN's stage maps, or a
        ViT's patch tokens on their grid (AnomalyDINO-style DINOv2 patch features)."""
        with self.autocast():
            out = self.encoder(images.to(self.device))
        return list(out.maps) if out.maps is not None else out.token_maps()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features of a normalised batch: ``(B, 3, H, W) -> (B, D, h, w)`` float32."""
        return self.features_from_maps(self.stage_maps(images))

    def features_from_maps(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`features` from :meth:`stage_maps`' output."""
        return aggregate_patches(maps, self.cfg.neighbourhood, self.cfg.target_dim)

    # --- fitting ----------------------------------------------------------------------------
    def fit_stage(self, stage: str, loader: Iterable, trainer: Any) -> dict[str, float]:
        """Build the memory bank in one pass over ``loader`` (batches with an ``image`` key)."""
        if stage != "fit":
            raise ValueError(f"patchcore has only the stage 'fit', not {stage!r}")
        from uad.progress import progress as progress_bar

        progress = bool(getattr(getattr(trainer, "config", None), "progress", True))
        self.eval_mode()
        chunks: list[torch.Tensor] = []
        total = len(loader) if hasattr(loader, "__len__") else None
        with torch.no_grad():
            for batch in progress_bar(loader, total=total, desc="patchcore: memory bank", unit="batch", enabled=bool(progress)):
                images = batch["image"] if isinstance(batch, Mapping) else batch
                chunks.append(flatten_patches(self.features(images.to(self.device))).cpu())  # B*h*w, D
        if not chunks:
            raise ValueError("patchcore: the training loader yielded no images")
        return self.fit_from_features(torch.cat(chunks))

    @torch.no_grad()
    def fit_from_features(self, features: torch.Tensor) -> dict[str, float]:
        """Memory bank from patch features ``(N, D, h, w)`` (as :meth:`features` returns, e.g. cached)
        or ``(P, D)``: all patches, subsampled by the greedy coreset to ``coreset_ratio``."""
        patches = flatten_patches(features).float()  # P, D
        if patches.shape[1] != self.cfg.target_dim:
            raise ValueError(f"features have {patches.shape[1]} channels, expected target_dim={self.cfg.target_dim}")
        n_all = patches.shape[0]
        n_keep = max(1, int(round(n_all * float(self.cfg.coreset_ratio))))
        if n_keep >= n_all:
            bank = patches
        else:
            idx = greedy_coreset(patches, n_keep, self.cfg.projection_dim, self.cfg.seed, self.cfg.chunk_size, self.device)
            bank = patches[idx.cpu()]
        self.memory_bank = bank.contiguous().to(self.device)
        log.info("patchcore: memory bank %d of %d patches (%.1f %%)", bank.shape[0], n_all, 100.0 * bank.shape[0] / n_all)
        return {"patches": float(n_all), "memory_bank": float(bank.shape[0])}

    # --- inference --------------------------------------------------------------------------
    def input_multiple(self) -> int | None:
        """Any size whose sides are multiples of the deepest stage's stride (each stage halves
        the first's grid), so every stage map aligns with the first's."""
        return int(self.encoder.patch_size) * 2 ** (len(self.encoder.layers) - 1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Nearest-neighbour patch distances (eq. 6) -> scores (B,) and maps (B, H, W) on CPU."""
        out = self.prediction_from_features(images, self.features(images))
        return Prediction(scores=out.scores.cpu(), maps=out.maps.cpu())

    @torch.no_grad()
    def prediction_from_features(self, images: torch.Tensor, feats: torch.Tensor) -> Prediction:
        """Scores and maps (on the device) from :meth:`features`' output (B, D, h, w)."""
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("patchcore: empty memory bank; run fit_stage / fit_from_features or load a state first")
        B, D, h, w = feats.shape
        q = flatten_patches(feats)  # B*h*w, D
        bank = self.memory_bank.to(q.device)
        dist, idx = nearest_neighbors(q, bank, k=1, chunk_size=self.cfg.chunk_size)
        patch_scores = dist[:, 0].reshape(B, h * w)  # B, h*w
        if self.cfg.reweight:
            scores = reweighted_image_score(
                q.reshape(B, h * w, D), patch_scores, idx[:, 0].reshape(B, h * w), bank, self.cfg.reweight_neighbors
            )
        else:
            scores = patch_scores.max(dim=1).values
        size = tuple(images.shape[-2:])
        maps = smooth_maps(patch_scores.reshape(B, h, w), size, self.cfg.sigma)  # B, H, W
        return Prediction(scores=scores.float(), maps=maps.float())

    # --- state ------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank}

    def load_extra_state(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(state) - {"memory_bank"})
        if unknown or "memory_bank" not in state:
            raise KeyError(f"patchcore: expected extra state ['memory_bank'], got {sorted(state)}")
        bank = state["memory_bank"]
        if bank.ndim != 2 or bank.shape[1] != self.cfg.target_dim:
            raise ValueError(f"patchcore: memory bank of shape {tuple(bank.shape)} does not match target_dim={self.cfg.target_dim}")
        self.memory_bank = bank.float().contiguous().to(self.device)

    def tags(self) -> dict[str, str]:
        return {
            **self.encoder_tags(),
            "coreset_ratio": str(self.cfg.coreset_ratio),
        }
