"""AGPNet's settings. Defaults = the paper (Sec. 3 and 4.1) where it speaks; where it is silent
(no public code exists) the reading of ``shared/papers/notes_costfilter_rlr_agpnet.md`` part 3,
each one a row of ``docs/deviations.md`` ("AGPNet: open choices").

Ablations of the paper as parameters:

* Table 4 (noise kinds): ``feature_noise`` and ``image_noise``, each ``attention`` (the method),
  ``random`` (the attention map replaced by uniform noise at the same grid, everything else
  equal) or ``none``.
* Table 6 (alpha and masks): ``alpha_fixed`` (0.5 / 1.0 / 1.5) instead of the 0 -> 1 ramp;
  ``masks`` = ``[prior]`` (L), ``[learn]`` (D) or ``[prior, learn]`` (B, the method).
* Table 7 (layers, mean teacher): ``layers`` (``[11]``, ``[2, 5]``, ``[8, 11]``, ``[2, 5, 8, 11]``);
  ``mean_teacher: false`` reads A_learn from the student decoder itself.
* Table 5 (backbones): any timm ViT (CLIP ViT-B: ``vit_base_patch16_clip_224.openai``) or CNN
  (WideResNet-50, EfficientNet-b4); see ``cnn_pool`` / ``cnn_stride`` / ``prior``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from uad.errors import ConfigError

from ..base import check_param_names, parse_list_params

__all__ = ["AGPNetConfig", "NOISE_KINDS", "PRIORS"]

NOISE_KINDS = ("attention", "random", "none")
#: where A_prior comes from: the class token's attention (ViT), the attention each token receives
#: (ViT), the per-location feature energy mean_c |F| (any backbone: what stands in for a CNN), or none
PRIORS = ("auto", "cls", "received", "energy", "none")
LEARNED = ("received", "diagonal", "max_query")
FEATURE_NORMS = ("layernorm", "encoder_norm", "none")
FEW_SHOT_OPS = ("hflip", "vflip", "rotate", "color")


@dataclass
class AGPNetConfig:
    """All AGPNet parameters; unknown keys in :meth:`from_params` raise a ConfigError."""

    # encoder: frozen DINO ViT-S/16 at 224 x 224, blocks 2, 5, 8, 11 (0-based: outputs of the 3rd, 6th, 9th, 12th)
    backbone: str = "dino_vits16"
    weights: str = "auto"
    allow_random: bool = False
    layers: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    resize: int = 224
    crop: int = 224
    # eq. 1: F_clean = sum_l sigma(F_l)
    feature_norm: str = "layernorm"  # parameter-free LayerNorm over channels | encoder_norm (the ViT's final norm) | none
    fusion: str = "auto"  # sum (eq. 1) | concat (stages of different widths); auto: sum when widths agree
    cnn_pool: int = 3  # CNN only: p x p average of each stage (SimpleNet/PatchCore neighbourhood), 0/1: off
    cnn_stride: int | None = None  # CNN only: common grid stride (None: the first stage's; 16: UniAD's MFCN)
    # decoder: plain ViT, 4 pre-norm blocks, learnable position embedding, no class token
    decoder_depth: int = 4
    decoder_dim: int | None = None  # None: the feature width (384 for ViT-S); else Linear in / out projections
    num_heads: int | None = None  # None: the encoder's heads (ViT), 6 for a CNN
    mlp_ratio: float = 4.0  # ViT's; gives Table 8's 5.63 G multiply-adds exactly (2: 5.17 G); see deviations
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    # attention masks (eq. 2)
    masks: list[str] = field(default_factory=lambda: ["prior", "learn"])
    prior: str = "auto"  # auto: cls for a ViT, energy for a CNN
    learned: str = "received"  # how the decoder's (B, heads, N, N) attention becomes one value per token
    mean_teacher: bool = True
    ema_decay: float = 0.9999  # eta, eq. 3
    ema_every: int = 10  # optimiser steps between EMA updates
    # feature noise (eq. 4-5): F' = F_clean + E * (alpha(t) * minmax(A_final) + beta), E ~ N(mu, sigma)
    feature_noise: str = "attention"
    image_noise: str = "attention"
    beta: float = 0.1
    noise_mean: float = 0.0
    noise_std: float = 1.0
    alpha_gamma: float = 1.0  # gamma
    alpha_min: float = 0.0  # m
    alpha_max: float = 1.0  # p
    alpha_ramp_epochs: float = 400.0  # T: alpha reaches gamma * p at epoch T and stays there
    alpha_fixed: float | None = None  # Table 6: a constant alpha instead of the ramp
    # image noise: mask ratio 0.6 -> 1.0 from epoch 100 to 400, N(0, image_noise_std^2) in normalised units
    mask_ratio_start: float = 0.6
    mask_ratio_end: float = 1.0
    mask_ratio_epochs: list[float] = field(default_factory=lambda: [100.0, 400.0])
    image_noise_std: float = 1.0
    # map (eq. 8) and score
    score_pool: int = 16  # image score = max of avg_pool2d(map, score_pool, stride 1) (UniAD's); 0/1: plain max
    # optimisation: AdamW lr 1e-3, wd 1e-4, x0.1 after epoch 200, 500 epochs, batch 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    lr_milestones: list[float] = field(default_factory=lambda: [200.0])
    lr_gamma: float = 0.1
    epochs: int = 500
    iterations: int | None = None  # None: epochs * ceil(n / batch); else the schedules compress to fit
    batch_size: int = 32
    # few-shot: each of the k images 32 times (the first copy as it is), random flips, rotation, colour jitter
    few_shot_folds: int = 32
    few_shot_ops: list[str] = field(default_factory=lambda: ["hflip", "vflip", "rotate", "color"])
    few_shot_max_rotation: float = 15.0  # degrees, uniform in [-x, x]
    few_shot_color: float = 0.1  # brightness / contrast / saturation jitter, factors in [1 - x, 1 + x]
    seed: int = 0  # the decoder's initialisation

    method_label: ClassVar[str] = "agpnet"

    def __post_init__(self) -> None:
        self.layers = [int(i) for i in self.layers]
        self.masks = [str(m) for m in self.masks]
        self.mask_ratio_epochs = [float(e) for e in self.mask_ratio_epochs]
        self.lr_milestones = [float(e) for e in self.lr_milestones]
        self.few_shot_ops = [str(o) for o in self.few_shot_ops]
        if not self.layers:
            raise ConfigError("agpnet: 'layers' must name at least one encoder layer")
        for name, val, allowed in (("feature_noise", self.feature_noise, NOISE_KINDS),
                                   ("image_noise", self.image_noise, NOISE_KINDS),
                                   ("prior", self.prior, PRIORS), ("learned", self.learned, LEARNED),
                                   ("feature_norm", self.feature_norm, FEATURE_NORMS),
                                   ("fusion", self.fusion, ("auto", "sum", "concat"))):
            if val not in allowed:
                raise ConfigError(f"agpnet: {name} must be one of {allowed}, got {val!r}")
        bad = [m for m in self.masks if m not in ("prior", "learn")]
        if bad or not self.masks or len(set(self.masks)) != len(self.masks):
            raise ConfigError(f"agpnet: masks must be a non-empty subset of ['prior', 'learn'], got {self.masks}")
        bad = [o for o in self.few_shot_ops if o not in FEW_SHOT_OPS]
        if bad:
            raise ConfigError(f"agpnet: few_shot_ops must be among {FEW_SHOT_OPS}, got {bad}")
        if len(self.mask_ratio_epochs) != 2 or self.mask_ratio_epochs[0] > self.mask_ratio_epochs[1]:
            raise ConfigError(f"agpnet: mask_ratio_epochs must be [start, end] with start <= end, got {self.mask_ratio_epochs}")
        for name in ("mask_ratio_start", "mask_ratio_end"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"agpnet: {name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay <= 1.0 or self.ema_every < 1:
            raise ConfigError(f"agpnet: ema_decay must be in [0, 1] and ema_every >= 1, got {self.ema_decay}, {self.ema_every}")
        if self.alpha_ramp_epochs <= 0:
            raise ConfigError(f"agpnet: alpha_ramp_epochs must be positive, got {self.alpha_ramp_epochs}")
        if self.decoder_depth < 1 or self.epochs < 1 or self.batch_size < 1 or self.few_shot_folds < 1:
            raise ConfigError("agpnet: decoder_depth, epochs, batch_size and few_shot_folds must be positive")
        if self.crop > self.resize:
            raise ConfigError(f"agpnet: crop ({self.crop}) cannot exceed resize ({self.resize})")
        if self.cnn_pool > 1 and self.cnn_pool % 2 == 0:
            raise ConfigError(f"agpnet: cnn_pool must be odd (stride-1 pooling keeps the map size), got {self.cnn_pool}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None) -> "AGPNetConfig":
        params = dict(params or {})
        check_param_names(cls, params, "agpnet")
        parse_list_params(params, ("layers", "masks", "mask_ratio_epochs", "lr_milestones", "few_shot_ops"))
        return cls(**params)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --- schedules (t: the current epoch, 1-based, may be fractional) ---------------------------
    def alpha(self, t: float) -> float:
        """Eq. 5: ``alpha(t) = gamma * (t / T * (p - m) + m)`` for ``t <= T``, ``gamma * p`` after
        (the paper: "from 0 to 1.0 from the 1st to the 400th epoch"); ``alpha_fixed`` when set."""
        if self.alpha_fixed is not None:
            return float(self.alpha_fixed)
        frac = min(max(float(t), 0.0), self.alpha_ramp_epochs) / self.alpha_ramp_epochs
        return float(self.alpha_gamma * (frac * (self.alpha_max - self.alpha_min) + self.alpha_min))

    def mask_ratio(self, t: float) -> float:
        """Image-noise mask ratio: ``mask_ratio_start`` up to epoch 100, linear to ``mask_ratio_end``
        at epoch 400, constant after."""
        e0, e1 = self.mask_ratio_epochs
        frac = 1.0 if e1 <= e0 and t >= e1 else min(max((float(t) - e0) / max(e1 - e0, 1e-12), 0.0), 1.0)
        return float(self.mask_ratio_start + frac * (self.mask_ratio_end - self.mask_ratio_start))

    def lr_factor(self, t: float) -> float:
        """Step decay: ``lr_gamma ** (number of milestones passed)``; epoch 201 is the first at 0.1x."""
        return float(self.lr_gamma ** sum(1 for m in self.lr_milestones if t > m))
