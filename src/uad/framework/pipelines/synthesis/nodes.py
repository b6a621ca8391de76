"""Pseudo-anomaly synthesis as a stage of the method pipelines (Kedro layer, thin over
``uad.synthesis``).

``synthesis_spec`` is the node every method pipeline that trains on pseudo anomalies runs
between ingestion and training: it resolves the recipe, validates and lists the textures, writes
the versioned spec the training node consumes, and a preview grid of anomalies made from this
run's own training images. ``synthesis_preview`` is the stand-alone preview pipeline.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from uad.data.images import load_image
from uad.synthesis import preview_grid
from uad.synthesis.spec import ALL, augment_from_spec, build_augment, build_spec, describe_spec, square

log = logging.getLogger(__name__)


def _preview_png(train_index: pd.DataFrame, make_augment, preview: dict[str, Any], crop: int) -> bytes:
    """A grid of normal image | mask | pseudo-anomalous image | overlay, one class per row first."""
    n = int(preview.get("n", 8))
    seed = int(preview.get("seed", 0))
    normal = train_index[train_index["label"] == 0].reset_index(drop=True)
    if normal.empty:
        raise ValueError("synthesis preview: the training index has no normal images")
    rng = np.random.default_rng(seed)
    order = normal.groupby("class_name", sort=True).head(1).index.tolist()
    rest = [i for i in rng.permutation(len(normal)).tolist() if i not in order]
    rows = (order + rest)[:n]
    aug = make_augment(normal, seed, crop)
    samples = []
    for i in rows:
        img = square(load_image(normal.iloc[i]["image_path"]), crop, crop)
        out, mask, _ = aug.by_mode[aug.mode_of_index[i]](img, i)
        samples.append((img, mask if mask is not None else np.zeros(img.shape[:2], bool), out))
    buf = io.BytesIO()
    Image.fromarray(preview_grid(samples)).save(buf, format="PNG")
    return buf.getvalue()


def _always(synth: dict[str, Any]) -> dict[str, Any]:
    """The parameters with every sample made anomalous (a preview shows anomalies, not coin flips)."""
    return {**synth, "config": {**dict(synth.get("config") or {}), "anomaly_probability": 1.0}}


def synthesis_preview(train_index: pd.DataFrame, synthesis: dict[str, Any], crop: int = 256) -> tuple[bytes, dict]:
    """The stand-alone preview (``kedro run --pipeline=synthesis``): a grid of normal image | mask |
    pseudo-anomalous image | overlay as PNG bytes, plus tags; ``synthesis.recipe`` (DRAEM's when
    unset) and this run's training images."""
    preview = dict(synthesis.get("preview") or {})
    crop = int(preview.get("size", crop))
    labelled = train_index[train_index["label"] == 1].reset_index(drop=True)
    tags: dict[str, str] = {}

    def make(normal, seed, size):
        aug, t = build_augment(normal, labelled, _always(synthesis), seed, crop=size, resize=size)
        tags.update(t)
        return aug

    return _preview_png(train_index, make, preview, crop), tags


def synthesis_spec(method_name: str, train_index: pd.DataFrame, data: dict, synthesis: dict, engine: dict,
                   engine_override: dict) -> tuple[dict, bytes, dict]:
    """The synthesis stage of ``method_name``'s pipeline: ``(spec, preview PNG, run tags)``.

    The spec (:func:`uad.synthesis.spec.build_spec`) names the recipe of every stage that learns
    from pseudo anomalies, the parameters, each class's foreground rule and the textures (DTD
    files or the self textures picked from this run's training images, each with a content
    digest); the training node consumes it. The preview shows anomalies made from it on this run's
    training images (every sample anomalous)."""
    from uad.methods.registry import method_class
    from uad.engine.orchestration import engine_config, model_groups

    stages = method_class(method_name).synthesis_stages()
    if not stages:
        raise ValueError(f"{method_name} trains on no pseudo anomalies: its pipeline has no synthesis stage")
    seed = engine_config(engine, engine_override).seed
    normal = train_index[train_index["label"] == 0]
    spec = build_spec(method_name, stages, train_index, synthesis, seed, model_groups(normal, data))
    log.info("%s: synthesis spec: %s", method_name, describe_spec(spec))
    preview = dict((synthesis or {}).get("preview") or {})
    crop = int(preview.get("size", 256))
    labelled = train_index[train_index["label"] == 1].reset_index(drop=True)
    first = sorted(stages)[0]
    shown = {**spec, "parameters": _always(spec["parameters"])}
    group = next(iter(spec["textures"].get("self", {ALL: None})))

    def make(normal_rows, _seed, size):
        return augment_from_spec(shown, first, normal_rows, labelled, seed, crop=size, resize=size,
                                 group=None if group == ALL else group)[0]

    png = _preview_png(train_index, make, preview, crop)
    t = spec["textures"]
    tags = {"synthesis_spec": spec["digest"][:16], "synthesis_recipe": ",".join(f"{s}={r}" for s, r in sorted(stages.items())),
            "synthesis_texture_source": t["source"], "synthesis_textures": t["digest"][:16]}
    if "dtd" in t:
        tags["synthesis_dtd_files"] = str(t["dtd"]["count"])
    return spec, png, tags
