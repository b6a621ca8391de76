"""Pseudo-anomaly synthesis as a declarative stage (Kedro layer, thin over ``uad.synthesis``).

``build_augment`` is what method pipelines call to get the on-the-fly training hook;
``synthesis_preview`` materialises a preview grid of what the models are trained on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from uad.data.augment import EpochForwarding
from uad.data.images import load_image, load_mask
from uad.synthesis import (
    GLAD_FOREGROUND,
    RECIPES,
    MixedSynthesizer,
    PasteConfig,
    PseudoAnomalySynthesizer,
    RealAnomalyPaster,
    SynthesisAugment,
    SynthesisConfig,
    make_texture_source,
    preview_grid,
)


def _square(img: np.ndarray, resize: int, crop: int, nearest: bool = False) -> np.ndarray:
    out = np.asarray(Image.fromarray(img).resize((resize, resize), Image.NEAREST if nearest else Image.BILINEAR))
    top = (resize - crop) // 2
    return out[top:top + crop, top:top + crop]


class ClassAwareAugment(EpochForwarding):
    """Routes each sample to the augment of its class (object classes restrict defects to the
    foreground, textures do not); forwards ``epoch`` so results stay seeded per (epoch, index)."""

    def __init__(self, by_mode: dict[str, SynthesisAugment], mode_of_index: list[str]):
        self.by_mode, self.mode_of_index = by_mode, mode_of_index

    def inner_hooks(self):
        return self.by_mode.values()

    def __call__(self, image: np.ndarray, index: int):
        return self.by_mode[self.mode_of_index[index]](image, index)


def resolve_recipe(synth: dict[str, Any], method_recipe: str | None = None) -> str:
    """The synthesis recipe of a run: ``synthesis.recipe`` when set, else the method's own (GLAD's
    for CostFilter-AD), else DRAEM's."""
    recipe = synth.get("recipe") or method_recipe or "draem"
    if recipe not in RECIPES:
        raise ValueError(f"synthesis.recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    return str(recipe)


def foreground_modes(classes: pd.Series, synth: dict[str, Any], recipe: str) -> list[str]:
    """Per row, how its anomaly region is restricted: ``synthesis.foreground_modes[class]`` when
    given; else GLAD's per-class Otsu side (recipe ``glad``); else ``auto`` for the
    ``foreground_classes``; else ``none``."""
    explicit = dict(synth.get("foreground_modes") or {})
    objects = set(synth.get("foreground_classes") or [])
    table = GLAD_FOREGROUND if recipe == "glad" else {}

    def mode(c: str) -> str:
        return explicit.get(c) or table.get(c) or ("auto" if c in objects else "none")

    return [mode(str(c)) for c in classes]


def build_augment(train_df: pd.DataFrame, labelled: pd.DataFrame, synth: dict[str, Any], seed: int,
                  crop: int, resize: int, recipe: str | None = None) -> tuple[ClassAwareAugment, dict[str, str]]:
    """The training-time pseudo-anomaly hook for ``train_df`` and the run tags recording it.
    ``recipe``: the method's own recipe (``synthesis.recipe`` overrides it)."""
    recipe = resolve_recipe(synth, recipe)
    cfg = SynthesisConfig.for_recipe(recipe, synth.get("config"))
    rng = np.random.default_rng(seed)
    n_self = min(len(train_df), int(synth.get("self_texture_images", 64)))
    picks = rng.choice(len(train_df), size=n_self, replace=False) if n_self else []
    images = [_square(load_image(train_df.iloc[int(i)]["image_path"]), resize, crop) for i in picks]
    source, description = make_texture_source(synth.get("texture_source", "fallback"),
                                              dtd_root=synth.get("dtd_root"), images=images)
    generator = PseudoAnomalySynthesizer(source, cfg)
    tags = {"synthesis_texture_source": description, "synthesis_recipe": recipe}
    if len(labelled):
        real_imgs = [_square(load_image(p), resize, crop) for p in labelled["image_path"]]
        real_masks = [_square(load_mask(p).astype(np.uint8) * 255, resize, crop, nearest=True) > 0
                      for p in labelled["mask_path"]]
        paste = {"anomaly_probability": cfg.anomaly_probability, **dict(synth.get("paste") or {})}
        paster = RealAnomalyPaster(real_imgs, real_masks, PasteConfig(**paste))
        w = float(synth.get("semi_supervised_weight", 0.5))
        generator = MixedSynthesizer([(generator, 1.0 - w), (paster, w)])
        tags["semi_supervised_anomalies"] = str(len(labelled))
    modes = foreground_modes(train_df["class_name"], synth, recipe)
    by_mode = {m: SynthesisAugment(generator, seed, foreground_mode=m) for m in set(modes) or {"none"}}
    return ClassAwareAugment(by_mode, modes), tags


def synthesis_preview(train_index: pd.DataFrame, synthesis: dict[str, Any], crop: int = 256) -> tuple[bytes, dict]:
    """A grid of normal image | mask | pseudo-anomalous image | overlay, as PNG bytes, plus tags."""
    import io

    preview = dict(synthesis.get("preview") or {})
    crop = int(preview.get("size", crop))
    n = int(preview.get("n", 8))
    seed = int(preview.get("seed", 0))
    normal = train_index[train_index["label"] == 0].reset_index(drop=True)
    labelled = train_index[train_index["label"] == 1].reset_index(drop=True)
    if normal.empty:
        raise ValueError("synthesis preview: the training index has no normal images")
    # one image per class first, so every class shows up in the grid
    rng = np.random.default_rng(seed)
    order = normal.groupby("class_name", sort=True).head(1).index.tolist()
    rest = [i for i in rng.permutation(len(normal)).tolist() if i not in order]
    rows = (order + rest)[:n]
    aug, tags = build_augment(normal, labelled, {**synthesis, "config": {**dict(synthesis.get("config") or {}),
                                                                      "anomaly_probability": 1.0}},
                              seed, crop=crop, resize=crop)
    samples = []
    for k, i in enumerate(rows):
        img = _square(load_image(normal.iloc[i]["image_path"]), crop, crop)
        out, mask, _ = aug.by_mode[aug.mode_of_index[i]](img, i)
        samples.append((img, mask if mask is not None else np.zeros(img.shape[:2], bool), out))
    grid = preview_grid(samples)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue(), tags
