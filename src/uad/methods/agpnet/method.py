"""AGPNet (Huang, Kong et al., "Not All Regions Are Equal: Attention-Guided Perturbation Network
for Industrial Anomaly Detection", arXiv 2408.07490 v3) as an :class:`~uad.methods.base.AnomalyMethod`.

No public code exists; every choice the paper leaves open is a parameter of
:class:`~uad.methods.agpnet.config.AGPNetConfig` and a row of ``docs/deviations.md``.

One training step (Fig. 2, Sec. 3.2-3.3)::

    with no_grad: F_l, A_l = enc(I)             # one encoder pass gives features and attention
                  F_clean = sum_l LN(F_l)       # eq. 1
                  A_prior = mean_l A_l          # eq. 2, the class token's attention
                  A_learn = mean_k A_k(EMA decoder(F_clean))
                  A = minmax(minmax(A_prior) + minmax(A_learn))
    F_feat     = dec(F_clean + E1 * (alpha(t) A + beta))                    # eq. 4-5
    I'         = I + top_r(t)(upsample(A)) * N(0, s^2)                      # image noise
    F_img_feat = dec(sum_l LN(enc(I')_l) + E2 * (alpha(t) A + beta))
    L = 1/2 (MSE(F_feat, F_clean) + MSE(F_img_feat, F_clean))              # eq. 6-7
    every 10 optimiser steps: theta_md <- eta theta_md + (1 - eta) theta_dec  # eq. 3

Both branches go through the decoder as one batch of 2B. Inference runs the student alone: map =
per-location L2 between F_clean and dec(F_clean) (eq. 8), bilinear to the image; score = max of
the average-pooled map.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from uad.errors import ConfigError

from ..base import AnomalyMethod, OptimSetup, Prediction
from ..capabilities import Reconstruction, RescalableSchedule
from ..common.ema import MeanTeacher
from ..common.features import local_average, to_common_grid
from ..registry import register
from .config import AGPNetConfig
from .losses import reconstruction_loss
from .model import AGPDecoder
from .perturb import (
    aggregate_decoder_attention,
    aggregate_encoder_attention,
    anomaly_map,
    energy_map,
    feature_perturbation,
    final_mask,
    fuse_features,
    image_mask,
    image_score,
    minmax,
)

__all__ = ["AGPNet"]


@register("agpnet")
class AGPNet(AnomalyMethod, Reconstruction, RescalableSchedule):
    """Attention-guided perturbation of frozen features; see the module docstring."""

    stages = ("train",)
    config_class = AGPNetConfig

    def __init__(self, params: Mapping[str, Any] | None = None):
        super().__init__(params)
        self.cfg = self.config = AGPNetConfig.from_params(self.params)
        cfg = self.cfg
        self.encoder = self.build_encoder()
        self.is_vit = self.encoder.kind == "vit"
        self.prior = self._resolve_prior()
        if "prior" in cfg.masks and self.prior == "none":
            raise ConfigError("agpnet: masks include 'prior' but prior is 'none'")
        if cfg.feature_norm == "encoder_norm" and not (self.is_vit and isinstance(getattr(self.encoder.model, "norm", None), nn.Module)):
            raise ConfigError("agpnet: feature_norm 'encoder_norm' needs a ViT with a final norm")
        # dimensions come from the backbone: widths of the tapped layers, the token grid of the crop
        widths = [int(c) for c in self.encoder.channels] if not self.is_vit else [self.encoder.embed_dim] * len(self.encoder.layers)
        self.fusion = cfg.fusion if cfg.fusion != "auto" else ("sum" if len(set(widths)) == 1 else "concat")
        in_dim = sum(widths) if self.fusion == "concat" else widths[0]
        self.grid = self.grid_for((cfg.crop, cfg.crop))
        heads = cfg.num_heads or (self.encoder.num_heads if self.is_vit and self.encoder.num_heads else 6)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.decoder = AGPDecoder(in_dim, self.grid, dim=cfg.decoder_dim, depth=cfg.decoder_depth,
                                      num_heads=int(heads), mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, ln_eps=cfg.ln_eps)
        self.teacher = (MeanTeacher(self.decoder, cfg.ema_decay, cfg.ema_every)
                        if cfg.mean_teacher and "learn" in cfg.masks else None)
        self._epoch_len = 1.0  # optimiser steps per epoch; set by configure_optimization

    def _resolve_prior(self) -> str:
        p = self.cfg.prior
        if p == "auto":
            if not self.is_vit:
                return "energy"  # a CNN has no attention: the feature energy stands in (deviations)
            return "cls" if self.encoder.num_prefix_tokens > 0 else "received"
        if p in ("cls", "received") and not self.is_vit:
            raise ConfigError(f"agpnet: prior {p!r} reads encoder attention; {self.encoder.name} is a CNN (use energy or none)")
        if p == "cls" and self.encoder.num_prefix_tokens < 1:
            raise ConfigError(f"agpnet: prior 'cls' needs a class token; {self.encoder.name} has none (use received)")
        return p

    # --- contract ---------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"encoder": self.encoder, "decoder": self.decoder}
        if self.teacher is not None:
            mods["teacher"] = self.teacher
        return mods

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Only the student decoder is learned and saved: the teacher is training-only."""
        return {"decoder": self.decoder}

    def training_state(self) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            return {}
        return {f"teacher.{k}": v for k, v in self.teacher.module.state_dict().items()}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.teacher is None:
            super().load_training_state(state)
            return
        self.teacher.module.load_state_dict({k[len("teacher."):]: v for k, v in state.items()}, strict=True)

    # --- features ---------------------------------------------------------------------------
    def grid_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """The token grid of an input of ``size``: the ViT's patch grid, or the CNN stages' common
        grid at ``cnn_stride`` (default: the first tapped stage's stride)."""
        stride = self.encoder.patch_size if self.is_vit else (self.cfg.cnn_stride or int(self.encoder.reductions[0]))
        return int(size[0]) // stride, int(size[1]) // stride

    def encode(self, images: torch.Tensor, prior: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(F_clean (B, N, C) float32, A_prior (B, N) or None)`` from one frozen encoder pass
        (no_grad). ViT: the tapped blocks' patch tokens and, when ``prior``, their attention (only
        the class-token rows for ``prior: cls``). CNN: each stage p x p averaged and resized to one
        grid, flattened to tokens; the prior is the layers' feature energy before normalisation."""
        cfg = self.cfg
        with torch.no_grad():
            if self.is_vit:
                mode = "none"
                if prior and self.prior in ("cls", "received"):
                    mode = "prefix" if self.prior == "cls" else "full"
                with self.autocast():
                    out = self.encoder(images, attention=mode)
                feats = out.tokens
            else:
                with self.autocast():
                    maps = [local_average(m.float(), cfg.cnn_pool) for m in self.encoder(images).maps]
                maps = to_common_grid(maps, self.grid_for(images.shape[-2:]))
                feats = [m.flatten(2).transpose(1, 2) for m in maps]
            norm_module = getattr(self.encoder.model, "norm", None) if self.is_vit else None
            fused = fuse_features(feats, self.fusion, cfg.feature_norm, norm_module)
            a_prior = None
            if prior and self.prior != "none":
                if self.prior == "energy":
                    a_prior = energy_map(feats)  # the tapped layers before eq. 1's normalisation
                else:
                    a_prior = aggregate_encoder_attention(out.attn, self.encoder.num_prefix_tokens, self.prior)
        return fused, a_prior

    def learned_attention(self, features: torch.Tensor) -> torch.Tensor:
        """A_learn (eq. 2): the EMA teacher's (or, without it, the student's) self-attention on
        ``features``, aggregated per token; no_grad, (B, N) float32."""
        net = self.teacher.module if self.teacher is not None else self.decoder
        with torch.no_grad(), self.autocast():
            _, attns = net(features, need_attention=True)
        return aggregate_decoder_attention(attns, self.cfg.learned)

    def guidance(self, features: torch.Tensor, a_prior: torch.Tensor | None) -> torch.Tensor:
        """``Phi_norm(A_final)`` from the masks the config names (Table 6: L, D or B)."""
        prior = a_prior if "prior" in self.cfg.masks else None
        learn = self.learned_attention(features) if "learn" in self.cfg.masks else None
        return final_mask(prior, learn)

    # --- schedules --------------------------------------------------------------------------
    def epoch_at(self, step: int) -> int:
        """The 1-based epoch that optimiser step ``step`` (0-based) belongs to."""
        return int(math.floor(step / self._epoch_len)) + 1

    def iterations_for(self, num_train_samples: int) -> int:
        if self.cfg.iterations is not None:
            return int(self.cfg.iterations)
        return self.cfg.epochs * int(math.ceil(max(1, num_train_samples) / self.cfg.batch_size))

    def configure_optimization(self, stage: str, num_train_samples: int) -> OptimSetup:
        """AdamW (lr 1e-3, wd 1e-4), x0.1 after epoch 200 of 500. With ``iterations`` set (or the
        engine's), every epoch knot (lr drop, alpha ramp, mask ratio) scales with the budget."""
        cfg = self.cfg
        iterations = self.iterations_for(num_train_samples)
        self._epoch_len = iterations / cfg.epochs
        params = [p for p in self.decoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cfg.lr_factor(self.epoch_at(s)))
        return OptimSetup(optimizer=optimizer, scheduler=scheduler, iterations=iterations, parameters=params)

    def rescale_schedule(self, setup: OptimSetup, iterations: int) -> OptimSetup:
        """The engine overrides the budget: the epoch knots compress (or stretch) to it."""
        self._epoch_len = iterations / self.cfg.epochs
        setup.iterations = iterations
        return setup

    def train_augment(self, setting: str):
        """Few-shot: the paper's 32-fold augmentation (flips, small rotation, colour jitter)."""
        if setting != "few_shot" or self.cfg.few_shot_folds <= 1:
            return None
        from uad.data.augment import FlipRotateColor

        cfg = self.cfg
        return cfg.few_shot_folds, FlipRotateColor(cfg.few_shot_ops, cfg.few_shot_max_rotation, cfg.few_shot_color)

    # --- training -------------------------------------------------------------------------
    @staticmethod
    def _noise_map(kind: str, a_final: torch.Tensor) -> torch.Tensor:
        """The map that weights a perturbation: the attention mask ``a_final`` (B, N), or (Table 4's
        random rows) a uniform random map of its shape, min-max normalised like it."""
        return a_final if kind == "attention" else minmax(torch.rand_like(a_final, dtype=torch.float32))

    def training_step(self, stage: str, batch: Mapping[str, Any], step: int) -> torch.Tensor:
        """Eq. 6: ``1/2 (MSE(dec(F' ), F_clean) + MSE(dec(F'_img), F_clean))``."""
        cfg = self.cfg
        images = batch["image"] if isinstance(batch, Mapping) else batch
        t = self.epoch_at(step)
        alpha = cfg.alpha(t)
        clean, a_prior = self.encode(images, prior="prior" in cfg.masks)
        need_map = "attention" in (cfg.feature_noise, cfg.image_noise)
        a_final = self.guidance(clean, a_prior) if need_map else None
        shape_ref = a_final if a_final is not None else clean[..., 0]

        def perturb(f: torch.Tensor) -> torch.Tensor:
            if cfg.feature_noise == "none":
                return f
            w = self._noise_map(cfg.feature_noise, shape_ref)
            return feature_perturbation(f, w, alpha, cfg.beta, cfg.noise_mean, cfg.noise_std)

        inputs = [perturb(clean)]
        if cfg.image_noise != "none":
            w = self._noise_map(cfg.image_noise, shape_ref)
            m = image_mask(w, self.grid, tuple(images.shape[-2:]), cfg.mask_ratio(t))
            noisy = images + m * (torch.randn_like(images) * cfg.image_noise_std)
            noisy_feats, _ = self.encode(noisy, prior=False)
            inputs.append(perturb(noisy_feats))
        with self.autocast():
            out = self.decoder(torch.cat(inputs))  # both branches in one batch
        # equal-size branches: the mean over both is 1/2 (L_feat + L_img_feat)
        return reconstruction_loss(out, clean.repeat(len(inputs), 1, 1))

    def after_optimizer_step(self, stage: str, step: int) -> None:
        if self.teacher is not None:
            self.teacher.step(self.decoder, step)

    # --- inference --------------------------------------------------------------------------
    @property
    def grids(self) -> list[tuple[int, int]]:
        """Token grid of each reconstructed level (one: the fused features)."""
        return [self.grid]

    def reconstruct(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``([F_clean], [dec(F_clean)])``, (B, N, C) float32 each, no_grad, student only: the
        same per-level contract as RLR's, for a plug-in that reads a base's reconstruction."""
        clean, _ = self.encode(images, prior=False)
        with torch.no_grad(), self.autocast():
            rec = self.decoder(clean)
        return [clean], [rec.float()]

    def prediction_from(self, images: torch.Tensor, clean: list[torch.Tensor], rec: list[torch.Tensor]) -> Prediction:
        """Maps (eq. 8) and image scores (max of the ``score_pool`` average-pooled map) from
        :meth:`reconstruct`'s output, on the device."""
        with torch.no_grad():
            maps = anomaly_map(clean[0], rec[0], self.grid, tuple(images.shape[-2:]))
            scores = image_score(maps, self.cfg.score_pool)
        return Prediction(scores=scores.float(), maps=maps.float())

    def predict(self, images: torch.Tensor) -> Prediction:
        """The student decoder alone."""
        self.eval_mode()
        out = self.prediction_from(images, *self.reconstruct(images))
        return Prediction(scores=out.scores.cpu(), maps=out.maps.cpu())

    # --- bookkeeping ----------------------------------------------------------------------
    def decoder_parameters(self) -> int:
        return sum(p.numel() for p in self.decoder.parameters())

    def tags(self) -> dict[str, str]:
        cfg = self.cfg
        return {
            **self.encoder_tags(),
            "prior": self.prior,
            "masks": "+".join(cfg.masks),
            "feature_noise": cfg.feature_noise,
            "image_noise": cfg.image_noise,
            "mean_teacher": str(self.teacher is not None).lower(),
            "fusion": self.fusion,
            "decoder_params": str(self.decoder_parameters()),
        }
