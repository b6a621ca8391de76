"""PatchCore defaults: the values of Roth et al., "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022 (Sec. 3-4: WideResNet-50 stages 2 + 3, neighbourhood p = 3, 1024-d patch
features, 10 % greedy coreset with a 128-d Johnson-Lindenstrauss projection, nearest-neighbour
scoring, images resized to 256 and centre-cropped to 224, maps smoothed with a Gaussian sigma 4)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from uad.errors import ConfigError

from ..base import check_param_names, parse_list_params


@dataclass
class PatchCoreConfig:
    #: timm backbone name (or alias); paper: WideResNet-50-2 with ImageNet weights
    backbone: str = "wide_resnet50_2"
    #: "auto" / "hub" / "bundled" / "random" / a local file (see uad.backbones.weights)
    weights: str | None = "auto"
    #: permit random backbone weights when none are found (smoke tests only)
    allow_random: bool = False
    #: timm feature-stage indices (wide_resnet50_2: 2 = layer2, 3 = layer3)
    layers: tuple[int, ...] = (2, 3)
    #: local neighbourhood size p of the patch aggregation (Sec. 3.1, eq. 2)
    neighbourhood: int = 3
    #: channel dimension of the patch features after adaptive average pooling
    target_dim: int = 1024
    #: fraction of all training patches kept in the memory bank (Sec. 3.2; 0.1 = 10 %)
    coreset_ratio: float = 0.1
    #: dimension of the random projection used during coreset selection (0 = no projection)
    projection_dim: int = 128
    #: image score re-weighting of eq. 7 (off: the image score is the max patch score)
    reweight: bool = False
    #: neighbourhood size b of the re-weighting (eq. 7)
    reweight_neighbors: int = 9
    #: input preparation (Sec. 4.1)
    resize: int = 256
    crop: int = 224
    #: Gaussian smoothing of the upsampled map (Sec. 4.1)
    sigma: float = 4.0
    #: coreset start point and random projection
    seed: int = 0
    #: batch size of the feature-extraction pass
    batch_size: int = 8
    #: rows per chunk in the nearest-neighbour search and the coreset projection
    chunk_size: int = 8192

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None) -> "PatchCoreConfig":
        """Paper defaults overridden by ``params``; unknown keys raise a ValueError listing the valid ones."""
        params = dict(params or {})
        check_param_names(cls, params, "patchcore")
        parse_list_params(params, ("layers",))  # a list, or "2+3" from the command line
        if params.get("layers") is not None:
            params["layers"] = tuple(int(i) for i in params["layers"])
        cfg = cls(**params)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        problems = []
        if not 0.0 < float(self.coreset_ratio) <= 1.0:
            problems.append(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            problems.append(f"neighbourhood must be odd and >= 1, got {self.neighbourhood}")
        if self.target_dim < 1:
            problems.append(f"target_dim must be >= 1, got {self.target_dim}")
        if self.projection_dim < 0:
            problems.append(f"projection_dim must be >= 0, got {self.projection_dim}")
        if self.crop > self.resize:
            problems.append(f"crop ({self.crop}) cannot exceed resize ({self.resize})")
        if not self.layers:
            problems.append("layers must name at least one stage")
        if self.reweight_neighbors < 1:
            problems.append(f"reweight_neighbors must be >= 1, got {self.reweight_neighbors}")
        if problems:
            raise ConfigError("invalid patchcore parameters: " + "; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
