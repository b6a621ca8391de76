"""INP-Former++ settings; defaults = the paper (section 4.1.3) where it says, the official
INP-Former code (luow23/INP-Former, the conference version the ++ paper extends) where it does not.

Encoder and layers. DINOv2-R ViT-B/14 (``dinov2_vitb14_reg``), resize 448 / centre-crop 392. The
paper's "two groups, layers 3 to 6 and 7 to 10" count blocks from 1; the official code takes
``target_layers = [2, 3, 4, 5, 6, 7, 8, 9]`` as 0-based block indices (the output of block i)
and fuses positions ``[[0, 1, 2, 3], [4, 5, 6, 7]]`` of that list, i.e. 0-based blocks {2..5} and
{6..9} = 1-based layers 3-6 and 7-10. ``layers`` here are the same 0-based block indices; ``None``
derives them from the depth: [2..9] for ViT-S/B, [4, 6, ..., 18] for ViT-L (official code).

Table 9 ablation switches:

* ``use_inp`` ("INP"): ``False`` replaces INP extractor + INP-guided decoder by a plain decoder
  of ViT blocks with softmax self-attention and both residuals (the RD4AD-like first row); no
  coherence loss then.
* ``coherence`` (L_c / L_sc): ``"soft"`` (eq. 3, default), ``"hard"`` (eq. 2) or ``"none"``.
* ``soft_mining`` (L_sm): ``False`` uses the plain global cosine loss (no MSE term, no gradient
  re-weighting), the reconstruction loss of the rows without L_sm.
* ``residual_learning`` ("RL"): ``False`` drops the segmentation head and the "residual" stage.
* ``residual_stop_gradient``: ``False`` is "RL‡" (no stop-gradient): the residual stage then also
  updates bottleneck, extractor and decoder through the Dice loss.
* ``num_inp_tokens`` (M, Fig. 8a), ``gamma`` (Fig. 8b), ``coherence_weight`` (lambda, Fig. 8c).

Iteration budget. The paper trains 200 epochs (batch 16 in the official code, which drops the
last incomplete batch): ``iterations=None`` gives ``epochs * (num_train_samples // batch_size)``;
an integer ``iterations`` overrides it. The residual stage likewise: ``residual_epochs`` (100,
the authors' answer in luow23/INP-Former issue #53) unless ``residual_iterations`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from uad.errors import ConfigError

from ..common.recon import ReconConfig

__all__ = ["INPFormerConfig", "COHERENCE", "REC_MAPS", "MSE_REDUCTIONS"]

COHERENCE = ("soft", "hard", "none")
REC_MAPS = ("eq9", "cosine")
MSE_REDUCTIONS = ("mean", "sum")


@dataclass
class INPFormerConfig(ReconConfig):
    """All INP-Former++ parameters; unknown keys in :meth:`from_params` raise a ValueError that
    lists the valid ones.

    Shared fields (``ReconConfig``) with INP-Former++ values: backbone ``dinov2_vitb14_reg``,
    ``weights="auto"``, ``layers=None`` (see module docstring), ``groups=2``, resize 448, crop 392,
    Gaussian ``sigma=4`` with a 5x5 kernel (official evaluation), ``top_k_ratio=0.01``;
    StableAdamW ``lr=5e-4`` (paper), betas (0.9, 0.999), ``eps=1e-10``, AMSGrad, ``weight_decay=1e-4``,
    warm-up 100 iterations, cosine to ``final_lr`` (official code: base / 10), grad-norm clip 0.1,
    batch 16, trunc-normal init std 0.01.
    """

    lr: float = 5e-4
    final_lr: float = 5e-5
    iterations: int | None = None  # None: epochs * (num_train_samples // batch_size)
    epochs: int = 200
    # reconstruction network
    decoder_depth: int = 8
    num_heads: int | None = None  # None: the encoder's (6 / 12 / 16 for ViT-S / B / L)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-8
    bottleneck_dropout: float = 0.0  # official INP-Former code: Mlp(..., drop=0.)
    bottleneck_ratio: float = 4.0
    # INP extractor + INP-guided decoder ("INP")
    use_inp: bool = True
    num_inp_tokens: int = 6
    # losses (eq. 3 / 2, eq. 5, eq. 6)
    coherence: str = "soft"
    coherence_weight: float = 0.2
    soft_mining: bool = True
    gamma: float = 3.0
    mse_reduction: str = "mean"
    # inference map: "eq9" = mean over groups of (cosine distance + L2 distance) / 2 (eq. 9);
    # "cosine" = the conference version's cosine-distance map
    rec_map: str = "eq9"
    # residual learning ("RL", eq. 7-8)
    residual_learning: bool = True
    residual_stop_gradient: bool = True
    seg_channels: tuple[int, int] = (256, 64)
    residual_epochs: int = 100
    residual_iterations: int | None = None
    residual_lr: float = 5e-4
    residual_final_lr: float = 5e-5
    residual_warmup_iters: int = 100
    residual_weight_decay: float = 1e-4
    residual_grad_clip: float | None = None
    dice_per_image: bool = False

    method_label: ClassVar[str] = "inpformer"

    def __post_init__(self) -> None:
        if self.coherence not in COHERENCE:
            raise ConfigError(f"coherence must be one of {COHERENCE}, got {self.coherence!r}")
        if self.rec_map not in REC_MAPS:
            raise ConfigError(f"rec_map must be one of {REC_MAPS}, got {self.rec_map!r}")
        if self.mse_reduction not in MSE_REDUCTIONS:
            raise ConfigError(f"mse_reduction must be one of {MSE_REDUCTIONS}, got {self.mse_reduction!r}")
        if self.num_inp_tokens < 1:
            raise ConfigError(f"num_inp_tokens must be >= 1, got {self.num_inp_tokens}")
        if self.gamma < 0:
            raise ConfigError(f"gamma must be >= 0, got {self.gamma}")
        if not 0.0 <= self.bottleneck_dropout < 1.0:
            raise ConfigError(f"bottleneck_dropout must be in [0, 1), got {self.bottleneck_dropout}")
        if self.crop > self.resize:
            raise ConfigError(f"crop ({self.crop}) cannot exceed resize ({self.resize})")
        if self.layers is not None and len(self.layers) != self.decoder_depth:
            raise ConfigError(
                f"{len(self.layers)} encoder layers but decoder_depth={self.decoder_depth}: "
                "every encoder layer is paired with one decoder layer"
            )
        self.seg_channels = tuple(int(c) for c in self.seg_channels)  # type: ignore[assignment]
        if len(self.seg_channels) != 2 or min(self.seg_channels) < 1:
            raise ConfigError(f"seg_channels must be two positive ints, got {self.seg_channels}")
        for name in ("epochs", "residual_epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def stages(self) -> tuple[str, ...]:
        return ("reconstruction", "residual") if self.residual_learning else ("reconstruction",)
