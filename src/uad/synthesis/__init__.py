"""Pseudo-anomaly synthesis: DRAEM Perlin masks, texture sources, blending, real-anomaly paste.

Pure numpy / PIL / scipy (no kedro, no mlflow). See ``synthesizer.py`` for the recipe and the
papers' equations (DRAEM sec. 3.3; INP-Former++ sec. 3.5, eq. 7-8; CostFilter-AD: GLAD's recipe).
"""

from uad.synthesis.perlin import fade, perlin_mask, perlin_noise, sample_perlin_params
from uad.synthesis.synthesizer import (
    FOREGROUND_METHODS,
    GLAD_FOREGROUND,
    RECIPES,
    grid_shuffle,
    otsu_foreground,
    MixedSynthesizer,
    PasteConfig,
    PseudoAnomalySynthesizer,
    RealAnomalyPaster,
    SynthesisAugment,
    SynthesisConfig,
    blend_texture,
    estimate_foreground,
    preview_grid,
)
from uad.synthesis.textures import (
    TEXTURE_AUGMENTERS,
    TEXTURE_KINDS,
    DTDTextureSource,
    MixedTextureSource,
    ProceduralTextureSource,
    SelfTextureSource,
    TextureSource,
    TextureSourceError,
    augment_texture,
    make_texture_source,
)

__all__ = [
    "FOREGROUND_METHODS",
    "GLAD_FOREGROUND",
    "RECIPES",
    "grid_shuffle",
    "otsu_foreground",
    "TEXTURE_AUGMENTERS",
    "TEXTURE_KINDS",
    "DTDTextureSource",
    "MixedSynthesizer",
    "MixedTextureSource",
    "PasteConfig",
    "ProceduralTextureSource",
    "PseudoAnomalySynthesizer",
    "RealAnomalyPaster",
    "SelfTextureSource",
    "SynthesisAugment",
    "SynthesisConfig",
    "TextureSource",
    "TextureSourceError",
    "augment_texture",
    "blend_texture",
    "estimate_foreground",
    "fade",
    "make_texture_source",
    "perlin_mask",
    "perlin_noise",
    "preview_grid",
    "sample_perlin_params",
]
