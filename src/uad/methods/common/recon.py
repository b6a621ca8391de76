"""Shared skeleton of the ViT feature-reconstruction methods (Dinomaly, INP-Former++).

Both methods: a frozen DINOv2-R encoder gives per-layer tokens of the middle layers; a trainable
bottleneck + decoder reconstructs them; encoder and decoder layers are fused into groups (Loose
Constraint); the anomaly map is the group-mean point-wise cosine distance, upsampled to the crop
and Gaussian-smoothed (sigma 4); the image score is the mean of the top 1% of the map. Training
uses StableAdamW with the warm-up cosine schedule and gradient-norm clipping.

A subclass sets ``config_class`` (a :class:`ReconConfig` subclass) and implements
:meth:`build_model` (the trainable ``nn.Module``), :meth:`decode` and :meth:`loss`; it may override
:meth:`anomaly_map` (INP-Former++ adds its segmentation head there) and :meth:`iterations_for`.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from uad.engine.speed import CompiledFn, CompileSpec, describe_error

from ..base import AnomalyMethod, OptimSetup, Prediction, check_param_names
from ..capabilities import GroupReconstruction, RescalableSchedule
from .groups import resolve_groups
from .optim import StableAdamW, WarmCosineSchedule
from .scoring import anomaly_map_from_pairs, topk_mean_score

log = logging.getLogger("uad.engine")

__all__ = ["Encoded", "ReconConfig", "ViTReconstructionMethod", "default_layers", "backbone_depth", "init_trunc_normal"]


@dataclass
class Encoded:
    """Frozen-encoder output: per-layer patch ``tokens`` (B, N, C), per-layer ``prefix`` tokens
    (B, P, C) (class + registers; may be empty lists), and the patch ``grid`` (h, w)."""

    tokens: list[torch.Tensor]
    prefix: list[torch.Tensor]
    grid: tuple[int, int]


# Depth of the ViT sizes, read from the backbone alias (``dinov2_vitb14_reg``) or timm name
# (``vit_base_patch14_reg4_dinov2``).
_DEPTHS = {
    "vits": 12, "vitb": 12, "vitl": 24, "vitg": 40,
    "vit_tiny": 12, "vit_small": 12, "vit_base": 12, "vit_large": 24, "vit_giant": 40,
}


def backbone_depth(name: str) -> int | None:
    """Number of transformer blocks of a ViT alias such as ``dinov2_vitb14_reg``; None if unknown."""
    low = name.lower()
    for key, depth in _DEPTHS.items():
        if key in low:
            return depth
    return None


def default_layers(depth: int, n: int = 8) -> list[int]:
    """Dinomaly's 8 middle layers: ``[2..9]`` for 12-block ViT-S/B, ``[4, 6, ..., 18]`` for the
    24-block ViT-L (Appendix B); other depths scale the same positions by ``depth / 12``."""
    if depth == 12 and n == 8:
        return list(range(2, 10))
    if depth == 24 and n == 8:
        return list(range(4, 19, 2))
    return sorted({min(depth - 1, int(round((2 + i) * depth / 12))) for i in range(n)})


def init_trunc_normal(module: nn.Module, std: float = 0.01) -> None:
    """Dinomaly init: Linear weights ~ truncated normal(0, std) cut at +-3 std (the official
    ``trunc_normal_(std=0.01, a=-0.03, b=0.03)``), biases 0, LayerNorm weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass
class ReconConfig:
    """Settings shared by the ViT reconstruction methods (defaults: Dinomaly's paper values)."""

    backbone: str = "dinov2_vitb14_reg"
    weights: str = "auto"
    allow_random: bool = False
    layers: list[int] | None = None  # None: derived from the backbone depth (default_layers)
    groups: Any = 2  # int, "dense", or explicit lists of positions into ``layers``
    resize: int = 448
    crop: int = 392
    sigma: float = 4.0
    gaussian_kernel_size: int | None = 5
    top_k_ratio: float = 0.01
    # optimisation (StableAdamW + warm-up cosine)
    lr: float = 2e-3
    final_lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-10
    amsgrad: bool = True
    update_clip: float = 1.0  # StableAdamW clip threshold
    warmup_iters: int = 100
    iterations: int = 10000
    grad_clip: float | None = 0.1
    batch_size: int = 16
    seed: int = 1
    init_std: float = 0.01

    method_label: ClassVar[str] = "reconstruction"

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None):
        """Build from a parameter dict; unknown keys raise a ValueError listing the valid ones."""
        params = dict(params or {})
        check_param_names(cls, params, cls.method_label)
        if "betas" in params and params["betas"] is not None:
            params["betas"] = tuple(float(b) for b in params["betas"])
        if params.get("layers") is not None:
            params["layers"] = [int(i) for i in params["layers"]]
        return cls(**params)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ViTReconstructionMethod(AnomalyMethod, GroupReconstruction, RescalableSchedule):
    """Frozen ViT encoder + trainable reconstruction model; see the module docstring."""

    config_class: ClassVar[type[ReconConfig]] = ReconConfig
    stages = ("train",)

    def input_multiple(self) -> int | None:
        """Any multiple of the ViT patch: the position embeddings are interpolated to the grid."""
        return int(self.encoder.patch_size)
    # the frozen encoder only ever runs in :meth:`encode`, under autocast
    hold_frozen_encoder = True

    def __init__(self, params: Mapping[str, Any] | None = None):
        super().__init__(params)
        self.cfg = self.config_class.from_params(self.params)
        cfg = self.cfg
        depth = backbone_depth(cfg.backbone)
        layers = cfg.layers
        if layers is None:
            if depth is None:
                raise ValueError(f"cannot derive layers for backbone {cfg.backbone!r}; set 'layers' explicitly")
            layers = default_layers(depth)
        self.layers: list[int] = list(layers)
        self.encoder = self.build_encoder(layers=self.layers, img_size=cfg.crop)
        n = len(self.layers)
        self.groups: list[list[int]] = resolve_groups(cfg.groups, n)
        self._ramp_scale = 1.0  # set by rescale_schedule when the engine shortens the run
        self._compiled: dict[str, CompiledFn] = {}  # enable_compile: encoder / model / map
        self._static_batch = 0  # with compile on: the largest inference batch seen (smaller ones are padded)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = self.build_model()

    # --- hooks for subclasses --------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The trainable module (built under ``torch.manual_seed(cfg.seed)``)."""

    @abc.abstractmethod
    def decode(self, enc: Encoded) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encoder and decoder group features, each a list of (B, N, C) patch tokens."""

    @abc.abstractmethod
    def loss(self, enc_groups: list[torch.Tensor], dec_groups: list[torch.Tensor], step: int) -> torch.Tensor:
        """Training loss for one batch at iteration ``step``."""

    def iterations_for(self, num_train_samples: int) -> int:
        """Optimisation steps of the stage (Dinomaly: a fixed iteration budget)."""
        return int(self.cfg.iterations)

    # --- contract ---------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.encoder.embed_dim)

    def decoder_heads(self) -> int:
        """Attention heads of the decoder: the config's, else the encoder's, else dim // 64."""
        return getattr(self.cfg, "num_heads", None) or getattr(self.encoder, "num_heads", None) or max(1, self.embed_dim // 64)

    @property
    def config(self) -> ReconConfig:
        """The method's settings (the pipeline reads ``config.batch_size``)."""
        return self.cfg

    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "model": self.model}

    def _encoder_forward(self, images: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The frozen encoder under autocast, tensors only (what :meth:`enable_compile` compiles)."""
        with self.autocast():
            out = self.encoder(images)
        prefix = tuple(out.prefix) if getattr(out, "prefix", None) is not None else ()
        return tuple(out.tokens), prefix

    def encode(self, images: torch.Tensor) -> Encoded:
        """Frozen-encoder features of a normalised batch (no_grad, autocast)."""
        fn = self._compiled.get("encoder", self._encoder_forward)
        with torch.no_grad():
            tokens, prefix = fn(images)
        p = self.encoder.patch_size
        return Encoded(tokens=list(tokens), prefix=list(prefix), grid=(images.shape[-2] // p, images.shape[-1] // p))

    def run_model(self, *args: Any) -> Any:
        """``self.model(*args)``, compiled when :meth:`enable_compile` was called."""
        fn = self._compiled.get("model")
        return fn(*args) if fn is not None else self.model(*args)

    def enable_compile(self, spec: CompileSpec) -> list[str]:
        """Compile the encoder forward, the trainable model's forward and the map + score
        (:class:`~uad.engine.speed.CompiledFn`: static shapes, eager after a failure with one
        warning). The losses stay eager (their hard / soft mining reduces over data-parallel ranks)."""
        if not spec.enabled:
            self._compiled = {}
            return []
        fail = self.compile_fallback
        self._compiled = {
            "encoder": CompiledFn(self._encoder_forward, f"{self.name} encoder", spec, on_fail=fail),
            "model": CompiledFn(self.model, f"{self.name} model", spec, on_fail=fail),
            "map": CompiledFn(self._map_and_score, f"{self.name} anomaly map", spec, on_fail=fail),
        }
        return list(self._compiled)

    def compile_fallback(self, error: BaseException) -> None:
        """Any compiled function failing switches all of them to eager, with one warning."""
        if not self.compiled:
            return
        log.warning("torch.compile failed for %s (%s); %s runs eagerly from now on", self.name,
                    describe_error(error), self.name)
        for fn in self._compiled.values():
            fn.fall_back(error, warn=False)

    @property
    def compiled(self) -> bool:
        """True while any compiled function is in use."""
        return any(fn.active for fn in self._compiled.values())

    def training_step(self, stage: str, batch: Mapping[str, Any], step: int) -> torch.Tensor:
        images = batch["image"] if isinstance(batch, Mapping) else batch
        enc = self.encode(images)
        with self.autocast():
            enc_groups, dec_groups = self.decode(enc)
        return self.loss(enc_groups, dec_groups, self.ramp_step(step))

    def ramp_step(self, step: int) -> int:
        """``step`` in units of the configured schedule (scaled when the engine shortens a run)."""
        return int(round(step / self._ramp_scale)) if self._ramp_scale != 1.0 else step

    def anomaly_map(
        self, images: torch.Tensor, enc: Encoded, enc_groups: Sequence[torch.Tensor], dec_groups: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """(B, H, W) float32 map at the input size: group-mean cosine distance, upsampled, blurred."""
        return anomaly_map_from_pairs(
            enc_groups, dec_groups, enc.grid, tuple(images.shape[-2:]), self.cfg.sigma, self.cfg.gaussian_kernel_size
        )

    def reconstruct_groups(self, images: torch.Tensor) -> tuple[Encoded, list[torch.Tensor], list[torch.Tensor]]:
        """The frozen encoding and the encoder / decoder group features (no_grad, float32): what
        :meth:`predict` scores and what a plug-in (CostFilter-AD) reads as input and template."""
        with torch.no_grad():
            enc = self.encode(images)
            with self.autocast():
                enc_groups, dec_groups = self.decode(enc)
        return enc, [e.float() for e in enc_groups], [d.float() for d in dec_groups]

    def _map_and_score(self, images: torch.Tensor, enc: Encoded, enc_groups, dec_groups) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.anomaly_map(images, enc, enc_groups, dec_groups).float()
        return maps, topk_mean_score(maps, self.cfg.top_k_ratio).float()

    def prediction_from(self, images: torch.Tensor, enc: Encoded, enc_groups, dec_groups) -> Prediction:
        """Maps and scores from :meth:`reconstruct_groups`' output (on the device)."""
        fn = self._compiled.get("map", self._map_and_score)
        with torch.no_grad():
            maps, scores = fn(images, enc, enc_groups, dec_groups)
        return Prediction(scores=scores, maps=maps)

    def predict_on_device(self, images: torch.Tensor) -> Prediction:
        """:meth:`predict` with the results left on the device (float32): the scoring loop
        reduces and copies them asynchronously. With compile on, a batch smaller than the largest
        one seen is padded to it (repeating its last image; samples are independent in
        inference), so the compiled graphs keep one static shape."""
        self.eval_mode()
        n = images.shape[0]
        if self.compiled:
            self._static_batch = max(self._static_batch, n)
            if n < self._static_batch:
                images = torch.cat([images, images[-1:].expand(self._static_batch - n, *images.shape[1:])])
        out = self.prediction_from(images, *self.reconstruct_groups(images))
        if out.maps.shape[0] != n:
            out = Prediction(scores=out.scores[:n], maps=out.maps[:n])
        return out

    def predict(self, images: torch.Tensor) -> Prediction:
        out = self.predict_on_device(images)
        return Prediction(scores=out.scores.cpu(), maps=out.maps.cpu())

    # --- optimisation -------------------------------------------------------------------------
    def _schedule(self, optimizer: torch.optim.Optimizer, total: int, warmup: int) -> WarmCosineSchedule:
        return WarmCosineSchedule(optimizer, base_lr=self.cfg.lr, final_lr=self.cfg.final_lr,
                                  total_iters=total, warmup_iters=min(warmup, total))

    def configure_optimization(self, stage: str, num_train_samples: int) -> OptimSetup:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = StableAdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps,
                                amsgrad=cfg.amsgrad, clip_threshold=cfg.update_clip)
        iterations = self.iterations_for(num_train_samples)
        self._ramp_scale = 1.0
        return OptimSetup(optimizer=optimizer, scheduler=self._schedule(optimizer, iterations, cfg.warmup_iters),
                          iterations=iterations, grad_clip_norm=cfg.grad_clip, parameters=params)

    def rescale_schedule(self, setup: OptimSetup, iterations: int) -> OptimSetup:
        """The engine overrides the iteration budget (smoke runs): shrink the warm-up and every
        per-iteration ramp by the same factor so the schedule keeps its shape."""
        scale = iterations / max(1, setup.iterations)
        self._ramp_scale = scale
        warmup = int(math.floor(self.cfg.warmup_iters * scale))
        return dataclasses.replace(setup, scheduler=self._schedule(setup.optimizer, iterations, warmup), iterations=iterations)

    # --- bookkeeping --------------------------------------------------------------------------
    def tags(self) -> dict[str, str]:
        info = getattr(self.encoder, "weights_info", None)
        return {
            "method": self.name,
            "backbone": self.cfg.backbone,
            "weights_source": str(getattr(info, "source", "unknown")),
            "layers": ",".join(map(str, self.layers)),
            "groups": str(self.groups),
        }
