"""Frozen CNN stage-feature extractor (timm ``features_only`` models).

PatchCore (Roth et al., CVPR 2022) reads WideResNet-50 stages 2 and 3; RLR and AGPNet use
EfficientNets. The weights are resolved on the full classification model (so hub files, local
files and the bundled EfficientNet-Lite0 all load strictly, head included), then copied into
timm's ``features_only=True, out_indices=layers`` model, which drops the stages after the deepest
requested one and the head.
"""

from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
from torch import nn

from .base import Backbone, FeatureOutput, normalize_layers
from .weights import WeightsInfo, WeightsLoadError


class CNNBackbone(Backbone):
    """Frozen timm CNN returning the feature maps of the requested stages (timm feature indices)."""

    kind = "cnn"

    def __init__(self, full_model: nn.Module, name: str, weights_info: WeightsInfo, layers: Sequence[int] | None = None):
        info = getattr(full_model, "feature_info", None)
        if not info:
            raise TypeError(f"{name!r} exposes no timm feature_info; it cannot be used as a CNN feature backbone")
        stages = [dict(d) for d in info]
        data_config = timm.data.resolve_data_config({}, model=full_model)
        super().__init__(name, weights_info, data_config)
        self._stages = stages
        self.num_layers = len(stages)
        what = f"{name} (a CNN with {len(stages)} feature stages: {', '.join(s['module'] for s in stages)})"
        self.layers = normalize_layers(layers, len(stages), what, default=tuple(range(len(stages))))
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"CNN stage indices must be increasing and unique, got {list(self.layers)}")
        features = timm.create_model(name, pretrained=False, features_only=True, out_indices=self.layers)
        full_sd = full_model.state_dict()
        feat_sd = features.state_dict()
        missing = [k for k in feat_sd if k not in full_sd]
        bad = [k for k in feat_sd if k in full_sd and full_sd[k].shape != feat_sd[k].shape]
        if missing or bad:
            raise WeightsLoadError(
                f"{name}: cannot transfer weights to the features model: missing {missing[:5]}, shape mismatch {bad[:5]}"
            )
        features.load_state_dict({k: full_sd[k] for k in feat_sd}, strict=True)
        self.model = features
        self.channels = list(features.feature_info.channels())
        self.reductions = list(features.feature_info.reduction())
        self.patch_size = int(self.reductions[0])
        self._freeze()

    def list_layers(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "module": s["module"], "channels": s["num_chs"], "reduction": s["reduction"]}
            for i, s in enumerate(self._stages)
        ]

    def forward(self, x: torch.Tensor) -> FeatureOutput:
        """``x``: (B, 3, H, W) normalised with ``data_config`` -> ``maps``: [(B, C_i, H / r_i, W / r_i)]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        return FeatureOutput(maps=list(self.model(x)), layers=tuple(self.layers))
