"""Frozen pretrained encoders for the anomaly-detection methods.

``build_backbone(name, ...)`` is the single entry point (timm's ``create_model`` idea): it resolves
the weights (:mod:`uad.backbones.weights`, never silently random), freezes the model and wraps it
in :class:`ViTBackbone` (per-block patch tokens) or :class:`CNNBackbone` (per-stage maps), both
returning a :class:`FeatureOutput`.

Example::

    enc = build_backbone("dinov2_vitb14_reg", layers=range(2, 10))
    out = enc(images)            # out.tokens: 8 x (B, N, 768), out.grid == (h, w)
    enc.weights_info.source      # "hub_cache", "file", ...
"""

from __future__ import annotations

import os
from typing import Sequence

from .base import Backbone, FeatureOutput, normalize_layers
from .cnn import CNNBackbone
from .registry import ALIASES, architecture, canonical_name, is_bundled, is_vit
from .vit import ViTBackbone, block_forward_with_attention, dinov2_patch_pos_embed, uses_dino_interpolation
from .weights import (
    WeightsInfo,
    WeightsLoadError,
    WeightsUnavailableError,
    bundled_weights_path,
    load_timm_model,
    map_state_dict_in_order,
    resolve_weights,
    weights_dir,
)

__all__ = [
    "ALIASES",
    "Backbone",
    "CNNBackbone",
    "FeatureOutput",
    "ViTBackbone",
    "WeightsInfo",
    "WeightsLoadError",
    "WeightsUnavailableError",
    "architecture",
    "block_forward_with_attention",
    "build_backbone",
    "dinov2_patch_pos_embed",
    "bundled_weights_path",
    "canonical_name",
    "is_bundled",
    "is_vit",
    "list_layers",
    "load_timm_model",
    "map_state_dict_in_order",
    "normalize_layers",
    "resolve_weights",
    "weights_dir",
]


def build_backbone(
    name: str,
    weights: str | os.PathLike | None = "auto",
    layers: Sequence[int] | None = None,
    allow_random: bool = False,
    img_size: int | None = None,
    need_attention: bool = False,
) -> Backbone:
    """Build a frozen, eval-mode backbone.

    Args:
        name: timm model name (``vit_base_patch14_reg4_dinov2.lvd142m``, ``wide_resnet50_2`` ...)
            or an alias from :data:`ALIASES` (``dinov2_vitb14_reg``, ``dino_vitb8`` ...).
        weights: ``"auto"`` (default), ``"hub"``, ``"bundled"``, ``"random"`` / ``None`` or a local
            file path; see :mod:`uad.backbones.weights` for the resolution order.
        layers: ViT: 0-based block indices (output of that block; default: last block).
            CNN: timm feature-stage indices (``out_indices``; default: all stages).
        allow_random: permit random initialisation when no weights are found (smoke tests only).
        img_size: ViT only: the expected input size; non-DINOv2 ViTs resample their position
            embedding once to it (timm), DINOv2 interpolates at every forward as DINOv2 does; any
            other multiple of the patch size still works (dynamic size).
        need_attention: ViT only: also return the attention maps of the requested blocks.
    """
    cname = canonical_name(name)
    if is_vit(cname):
        kwargs = {"dynamic_img_size": True}
        # DINOv2 keeps its native position embedding and interpolates it at every forward as
        # DINOv2 does (ViTBackbone); other ViTs get timm's one-time resampling to ``img_size``.
        if img_size is not None and not uses_dino_interpolation(cname):
            kwargs["img_size"] = int(img_size)
        model, info = load_timm_model(cname, weights=weights, allow_random=allow_random, **kwargs)
        return ViTBackbone(model, cname, info, layers=layers, need_attention=need_attention)
    if need_attention:
        raise ValueError(f"need_attention=True needs a ViT backbone; {cname!r} is not one")
    if img_size is not None:
        raise ValueError(f"img_size applies to ViT backbones only; {cname!r} is a CNN (any input size works)")
    model, info = load_timm_model(cname, weights=weights, allow_random=allow_random)
    return CNNBackbone(model, cname, info, layers=layers)


def list_layers(name: str) -> list[dict]:
    """The selectable layers of backbone ``name`` (index, module, channels, reduction), no weights needed."""
    import timm

    cname = canonical_name(name)
    if is_vit(cname):
        m = timm.create_model(cname, pretrained=False, dynamic_img_size=True)
        ps = m.patch_embed.patch_size
        ps = ps[0] if isinstance(ps, (tuple, list)) else ps
        return [{"index": i, "module": f"blocks.{i}", "channels": m.embed_dim, "reduction": ps} for i in range(len(m.blocks))]
    m = timm.create_model(cname, pretrained=False)
    return [
        {"index": i, "module": d["module"], "channels": d["num_chs"], "reduction": d["reduction"]}
        for i, d in enumerate(m.feature_info)
    ]
