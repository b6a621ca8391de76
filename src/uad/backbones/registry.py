"""Backbone names: short aliases used in the papers' configs -> timm model names.

The papers name their encoders after the original repositories (``dinov2_vitb14_reg`` in
Dinomaly / INP-Former++, ``dino_vitb8`` ...); timm hosts the same weights under its own names.
Any other timm model name (with or without a pretrained tag) is passed through unchanged.
"""

from __future__ import annotations

import timm

#: alias -> timm ``architecture.tag``
ALIASES: dict[str, str] = {
    # DINOv2 with registers (Darcet et al., "Vision Transformers Need Registers", ICLR 2024)
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    # DINOv2 without registers (Oquab et al., 2023)
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    # DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021)
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vits8": "vit_small_patch8_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
}

#: timm modules whose models are ``timm.models.VisionTransformer`` (token API supported)
VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")

#: models with ImageNet weights bundled in a registry package (works fully offline)
BUNDLED = ("tf_efficientnet_lite0",)


def canonical_name(name: str) -> str:
    """Resolve an alias to its timm name and check that timm knows the architecture."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    resolved = ALIASES.get(name, name)
    arch = resolved.split(".", 1)[0]
    if not timm.is_model(arch):
        close = sorted(set(timm.list_models(f"*{arch.split('_')[0]}*")))[:12]
        raise ValueError(
            f"unknown backbone {name!r} (timm has no architecture {arch!r}). "
            f"Aliases: {', '.join(sorted(ALIASES))}. Similar timm models: {', '.join(close) or 'none'}"
        )
    return resolved


def architecture(name: str) -> str:
    """timm architecture without the pretrained tag: ``vit_base_patch8_224.dino`` -> ``vit_base_patch8_224``."""
    return canonical_name(name).split(".", 1)[0]


def is_vit(name: str) -> bool:
    """True when ``name`` is a timm VisionTransformer (supports the token API)."""
    fn = timm.models.model_entrypoint(architecture(name))
    return fn.__module__ in VIT_MODULES


def is_bundled(name: str) -> bool:
    return architecture(name) in BUNDLED
