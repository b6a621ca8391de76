"""CostFilter-AD's settings, with two presets.

``preset: paper`` (the default: the ICML 2025 paper's equations and hyper-parameters) and
``preset: official`` (what the released ``Costfilter_Dinomaly`` code does where it differs). A
preset only fills the fields left unset (``None``); every field can still be given explicitly.
Each difference between the two presets is a row of ``docs/deviations.md`` (CostFilter-AD).

=======================  ==============================  =====================================
field                    paper                           official (Dinomaly base)
=======================  ==============================  =====================================
query_side               input (sec. 3.2)                template (``zip(en, de)`` swap)
guidance_map             min (initial map, eq. 2)        base (the base's map, per channel)
base_map                 own (the base's evaluation      auto: cosine for Dinomaly (the released
                         map and score)                  code), own for every other base
loss weights             focal 1, CE 1, SSIM 0.1,        focal 1, CE 0.5, SSIM 0.1,
                         soft-IoU 0.1, MSE 0 (eq. 5)     soft-IoU 0.1, MSE 1
gamma rule               gamma0 - sigmoid(max logit)     clamp(3 - max logit, 1.5); 3.5 if wrong
                         if correct, else gamma0
optimiser                Adam lr 1e-3 (betas: not        Adam lr 1e-4, betas (0.9, 0.98)
                         named; torch's .9/.999)
batch / epochs           8 / 40                          12 / 17 (MVTec loop)
matching channels D      one template's grid (h*w)       768 (of Dinomaly's 784; at most h*w)
output map               P (softmax, anomaly channel)    lambda P + (1 - lambda) base map, 0.05
image score              mean of the top 250 pixels      own: lambda s(P) + (1 - lambda) base score;
                                                         cosine: the top max(1 %, 250) of the map
=======================  ==============================  =====================================

``preset: calibrated`` (this project's addition, ``docs/deviations.md``): the ``paper`` column for
the filter and its training, then the blend ``(1 - w) M_base + w (a P + b)`` (score likewise) with
``a, b`` fitted on held-out normals (the ``validation`` split) and ``w`` chosen on them plus
pseudo anomalies of another family than the filter's own (``calibration_recipe: cutpaste``), kept
only when it beats the base there by ``blend_min_gain`` in a ``blend_confidence`` share of bootstrap
resamples (:mod:`uad.methods.costfilter.calibration`); ``blend`` set explicitly fixes ``w``.

``base_map`` (what ``guidance_map: base`` and the blend read): ``own`` is the base's own
evaluation output from the same base forward: its full-size map (resized to the volume for the
guidance) and its image score, so with ``blend`` 0 the output *is* the base; ``cosine`` is the
position-wise ``1 - cos`` of input and reconstruction on the grid (reconstruction bases only):
what the released ``Costfilter_Dinomaly`` code blends, Dinomaly's map before its smoothing, with
the score read from the blended map. s(P) is the mean of the top ``max(score_topk, score_ratio *
H * W)`` pixels of P.

Both: per-layer cost volume 1 - cos, top-D matching channels kept in template order, 3D U-Net
with base width 48, RCSA fusion at levels 1, 3, 4, 6, the released class-aware adaptor (the
paper's "spatial average pooling + FC" on the finest decoder level, after channel attention and a
3x3x3 conv, as the code), Adam with ReduceLROnPlateau halving the rate (the paper's appendix names
the scheduler and the halving; patience 5, stepped once per epoch on the last batch loss, from the
code), the last epoch reported (the official README reports the best epoch on the test set: never
done here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from uad.errors import ConfigError

from ..base import check_param_names, parse_list_params

__all__ = ["CostFilterConfig", "PRESETS", "QUERY_SIDES", "GUIDANCE_MAPS", "GAMMA_RULES", "bases"]

QUERY_SIDES = ("input", "template")
GUIDANCE_MAPS = ("min", "base")
GAMMA_RULES = ("paper", "official", "fixed")
BASE_MAP_CHOICES = ("own", "cosine", "auto")
#: the pseudo-anomaly recipe of the calibrated blend's validation set (uad.synthesis.cutpaste; own: the filter's)
CALIBRATION_RECIPES = ("cutpaste", "own")


def bases() -> tuple[str, ...]:
    """The methods CostFilter-AD can read as a base: every declared method whose declaration names a
    base kind this plug-in reads (:mod:`uad.methods.declaration`), so a new method joins by itself."""
    from uad.methods.declaration import plugins

    return tuple(plugins().get("costfilter", ()))

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "query_side": "input", "guidance_map": "min",
        "focal_weight": 1.0, "ce_weight": 1.0, "ssim_weight": 0.1, "iou_weight": 0.1, "mse_weight": 0.0,
        "gamma_rule": "paper", "lr": 1e-3, "betas": (0.9, 0.999), "batch_size": 8, "epochs": 40,
        "blend": 1.0, "score_topk": 250, "score_ratio": 0.0, "base_map": "own",
    },
    "official": {
        "query_side": "template", "guidance_map": "base",
        "focal_weight": 1.0, "ce_weight": 0.5, "ssim_weight": 0.1, "iou_weight": 0.1, "mse_weight": 1.0,
        "gamma_rule": "official", "lr": 1e-4, "betas": (0.9, 0.98), "batch_size": 12, "epochs": 17,
        "blend": 0.05, "score_topk": 250, "score_ratio": 0.01, "matching_channels": 768, "base_map": "auto",
        "calibrate": False,
    },
}
PRESETS["paper"]["calibrate"] = False
# this project's addition (docs/deviations.md): the paper's filter, its P blended with the base's own
# map and score at the base's scale, the weight chosen on held-out normals + pseudo anomalies
# (uad.methods.costfilter.calibration); blend None = chosen
PRESETS["calibrated"] = {**PRESETS["paper"], "calibrate": True, "blend": None, "base_map": "own"}


@dataclass
class CostFilterConfig:
    """All CostFilter-AD parameters (``None`` = the preset's value)."""

    preset: str = "paper"
    # --- the base (set by the pipeline from the base's own parameters) ---------------------------
    base: str = "dinomaly"
    base_params: dict[str, Any] = field(default_factory=dict)
    # --- templates and cost volume (sec. 3.2) ---------------------------------------------------
    query_side: str | None = None  # input: rows = input positions (paper); template: the official swap
    templates: int = 3  # embedding base: N nearest normal images by global feature (paper N = 3)
    reference_pool: int | None = 48  # embedding base: normal images kept per class to choose them from
    class_identity: bool = False  # embedding base: templates only of the image's own class (test-time class!)
    matching_channels: int | None = None  # D; None: the size of one template's grid (GLAD/AnomalyDINO; official 768 of 784)
    volume_size: int = 64  # H' = W' of the volume the filter sees (all official variants: 64)
    # run the first 1x1x1 conv on the token grid, then resize (exact math, 5x less volume memory and
    # first-conv work for Dinomaly; float rounding can flip min/max ties, so gradients are not
    # bit-comparable with the released order: off by default, see docs/benchmarks.md)
    squeeze_at_grid: bool = False
    cost_eps: float = 1e-8  # added to the token norms (the official normalisation)
    # --- filter network (sec. 3.3) --------------------------------------------------------------
    base_width: int = 48
    squeeze: list[int] = field(default_factory=lambda: [4, 2])  # 1x1x1 input squeeze widths, x base_width
    guidance_map: str | None = None  # min: per-layer min-over-matching maps (eq. 2); base: the base's map
    # the base's map for MG and the blend: own (its evaluation map and score) | cosine (aligned 1 - cos on
    # the grid, the released Dinomaly path) | auto (cosine over Dinomaly, own otherwise)
    base_map: str | None = None
    # --- losses (eq. 5) ---------------------------------------------------------------------------
    focal_weight: float | None = None
    ce_weight: float | None = None
    ssim_weight: float | None = None
    iou_weight: float | None = None
    mse_weight: float | None = None
    gamma_rule: str | None = None
    gamma0: float = 3.0
    # --- optimisation -----------------------------------------------------------------------------
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float = 0.0
    batch_size: int | None = None
    epochs: int | None = None
    iterations: int | None = None  # overrides epochs * ceil(n / batch)
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    seed: int = 1
    # --- output (sec. 3.4) ------------------------------------------------------------------------
    blend: float | None = None  # lambda: map = lambda * P + (1 - lambda) * base map (1: P alone)
    # calibrated blend (preset calibrated): P mapped onto the base's units by the base's and P's
    # median and 99.9 % quantile on the held-out normals (the validation split), and, when ``blend``
    # is unset, the weight chosen among ``blend_candidates`` on those normals + pseudo anomalies
    calibrate: bool | None = None
    blend_candidates: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(21)])
    calibration_quantile: float = 0.999
    blend_min_gain: float = 0.005  # a chosen weight must beat the base on the validation set by this
    # ... and beat it in this share of bootstrap resamples of the validation images (0: no test)
    blend_confidence: float = 0.95
    blend_resamples: int = 400
    # the validation's pseudo anomalies: cutpaste (another family than the filter's training recipe)
    # or own (the filter's own GLAD recipe, which it learnt: measured to overrate P)
    calibration_recipe: str = "cutpaste"
    calibration_copies: int = 4  # pseudo-anomalous images made from each held-out normal
    score_topk: int | None = None  # mean of the top k pixels (> 0) ...
    score_ratio: float | None = None  # ... or of the top ratio of the pixels (official 1 %)

    label: ClassVar[str] = "costfilter"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"costfilter: preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        self._from_preset = set()
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
                self._from_preset.add(key)
        self.betas = tuple(float(b) for b in self.betas)
        checks = (("base", bases()), ("query_side", QUERY_SIDES), ("guidance_map", GUIDANCE_MAPS),
                  ("gamma_rule", GAMMA_RULES), ("base_map", BASE_MAP_CHOICES))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"costfilter: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.volume_size % 16:
            raise ConfigError(f"costfilter: volume_size must be a multiple of 16 (four 2x poolings), got {self.volume_size}")
        if len(self.squeeze) != 2:
            raise ConfigError(f"costfilter: squeeze needs two widths (x base_width), got {self.squeeze}")
        if self.base_map == "auto":
            self.base_map = "cosine" if self.base == "dinomaly" else "own"
        self.calibrate = bool(self.calibrate)
        if self.blend is None and not self.calibrate:
            raise ConfigError("costfilter: blend is unset: give a weight in [0, 1], or calibrate: true (preset "
                              "calibrated) to choose it on the held-out normals")
        if self.blend is not None and not 0.0 <= float(self.blend) <= 1.0:
            raise ConfigError(f"costfilter: blend must be in [0, 1], got {self.blend}")
        if self.calibrate and self.base_map != "own":
            raise ConfigError("costfilter: calibrate blends the base's own map and score (base_map: own), got "
                              f"base_map {self.base_map!r}")
        cands = [float(w) for w in self.blend_candidates]
        if not cands or any(not 0.0 <= w <= 1.0 for w in cands):
            raise ConfigError(f"costfilter: blend_candidates must be weights in [0, 1], got {self.blend_candidates}")
        self.blend_candidates = sorted(set(cands))
        if not 0.0 <= float(self.blend_min_gain) < 1.0:
            raise ConfigError(f"costfilter: blend_min_gain must be in [0, 1), got {self.blend_min_gain}")
        if not 0.0 <= float(self.blend_confidence) < 1.0:
            raise ConfigError(f"costfilter: blend_confidence must be in [0, 1), got {self.blend_confidence}")
        if int(self.blend_resamples) < 1:
            raise ConfigError(f"costfilter: blend_resamples must be >= 1, got {self.blend_resamples}")
        if int(self.calibration_copies) < 1:
            raise ConfigError(f"costfilter: calibration_copies must be >= 1, got {self.calibration_copies}")
        if self.calibration_recipe not in CALIBRATION_RECIPES:
            raise ConfigError(f"costfilter: calibration_recipe must be one of {CALIBRATION_RECIPES}, got "
                              f"{self.calibration_recipe!r}")
        if not 0.5 < float(self.calibration_quantile) < 1.0:
            raise ConfigError(f"costfilter: calibration_quantile must be in (0.5, 1), got {self.calibration_quantile}")
        if int(self.templates) < 1:
            raise ConfigError(f"costfilter: templates must be >= 1, got {self.templates}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None) -> "CostFilterConfig":
        params = dict(params or {})
        check_param_names(cls, params, cls.label)
        parse_list_params(params, ("squeeze", "blend_candidates"))
        if params.get("squeeze") is not None:
            params["squeeze"] = [int(s) for s in params["squeeze"]]
        params["base_params"] = dict(params.get("base_params") or {})
        return cls(**params)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def from_preset(self, name: str) -> bool:
        """True when field ``name`` was filled by the preset (not given explicitly)."""
        return name in self._from_preset
