"""The synthesis spec: what made the pseudo anomalies a model trains on, written once per run.

A method that learns from pseudo anomalies (INP-Former++'s residual stage, CostFilter-AD's
filter) gets them from a *spec* built before its training: the recipe of each such stage
(``draem``, ``glad``), the synthesis parameters, the foreground rule of every class, and the
texture source made concrete: the DTD folder's file list with a digest of every file, or, for
the ``self`` / ``fallback`` sources, the training images cut into textures (chosen once, with
the run's seed, per model group) with theirs. The spec is a small JSON dict; its ``digest``
(location-free: file names and contents, not folders) enters the training key, so other
textures retrain and an unchanged spec reuses a finished training.

Training still makes the anomalies on the fly from the spec (:func:`augment_from_spec`), fresh
per epoch and seeded per (seed, epoch, index) exactly as before the spec existed.

Pure numpy / pandas / PIL: no kedro, no mlflow, no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from uad.data.augment import EpochForwarding
from uad.data.images import load_image, load_mask
from uad.errors import ConfigError, UadError
from uad.synthesis.synthesizer import (
    GLAD_FOREGROUND,
    RECIPES,
    MixedSynthesizer,
    PasteConfig,
    PseudoAnomalySynthesizer,
    RealAnomalyPaster,
    SynthesisAugment,
    SynthesisConfig,
)
from uad.synthesis.textures import TEXTURE_KINDS, DTDTextureSource, ProceduralTextureSource, make_texture_source

SPEC_FORMAT = "uad-synthesis-spec/1"
ALL = "all"  #: the group key of a run with one model for every class


class SynthesisSpecError(UadError, ValueError):
    """A spec that does not match what is on disk now (textures replaced since it was written)."""


# ------------------------------------------------------------------------------------ recipe
def resolve_recipe(synth: Mapping[str, Any], method_recipe: str | None = None) -> str:
    """The synthesis recipe of a run: ``synthesis.recipe`` when set, else the method's own (GLAD's
    for CostFilter-AD), else DRAEM's."""
    recipe = synth.get("recipe") or method_recipe or "draem"
    if recipe not in RECIPES:
        raise ConfigError(f"synthesis.recipe must be one of {sorted(RECIPES)} (or null: the method's own), got {recipe!r}")
    return str(recipe)


def foreground_modes(classes: Sequence[str] | pd.Series, synth: Mapping[str, Any], recipe: str) -> list[str]:
    """Per row, how its anomaly region is restricted: ``synthesis.foreground_modes[class]`` when
    given; else GLAD's per-class Otsu side (recipe ``glad``); else ``auto`` for the
    ``foreground_classes``; else ``none``."""
    explicit = dict(synth.get("foreground_modes") or {})
    objects = set(synth.get("foreground_classes") or [])
    table = GLAD_FOREGROUND if recipe == "glad" else {}

    def mode(c: str) -> str:
        return explicit.get(c) or table.get(c) or ("auto" if c in objects else "none")

    return [mode(str(c)) for c in classes]


def square(img: np.ndarray, resize: int, crop: int, nearest: bool = False) -> np.ndarray:
    """Resize to ``resize`` x ``resize`` and centre-crop ``crop`` (the training images' geometry)."""
    out = np.asarray(Image.fromarray(img).resize((resize, resize), Image.NEAREST if nearest else Image.BILINEAR))
    top = (resize - crop) // 2
    return out[top:top + crop, top:top + crop]


def self_texture_picks(n_rows: int, n: int, seed: int) -> list[int]:
    """Which rows of a model group's normal training images become self textures: ``min(n_rows,
    n)`` distinct rows drawn with ``seed`` (the order matters: it is the texture list's order)."""
    n_self = min(int(n_rows), int(n))
    if n_self <= 0:
        return []
    return [int(i) for i in np.random.default_rng(seed).choice(int(n_rows), size=n_self, replace=False)]


# ------------------------------------------------------------------------------------ the hook
class ClassAwareAugment(EpochForwarding):
    """Routes each sample to the augment of its class (object classes restrict defects to the
    foreground, textures do not); forwards ``epoch`` so results stay seeded per (epoch, index)."""

    def __init__(self, by_mode: dict[str, SynthesisAugment], mode_of_index: list[str]):
        self.by_mode, self.mode_of_index = by_mode, mode_of_index

    def inner_hooks(self):
        return self.by_mode.values()

    def __call__(self, image: np.ndarray, index: int):
        return self.by_mode[self.mode_of_index[index]](image, index)


def _assemble(texture_images: list[np.ndarray], train_df: pd.DataFrame, labelled: pd.DataFrame,
              synth: Mapping[str, Any], recipe: str, seed: int, crop: int, resize: int
              ) -> tuple[ClassAwareAugment, dict[str, str]]:
    cfg = SynthesisConfig.for_recipe(recipe, synth.get("config"))
    source, description = make_texture_source(synth.get("texture_source", "fallback"),
                                              dtd_root=synth.get("dtd_root"), images=texture_images)
    generator = PseudoAnomalySynthesizer(source, cfg)
    tags = {"synthesis_texture_source": description, "synthesis_recipe": recipe}
    if len(labelled):
        real_imgs = [square(load_image(p), resize, crop) for p in labelled["image_path"]]
        real_masks = [square(load_mask(p).astype(np.uint8) * 255, resize, crop, nearest=True) > 0
                      for p in labelled["mask_path"]]
        paste = {"anomaly_probability": cfg.anomaly_probability, **dict(synth.get("paste") or {})}
        paster = RealAnomalyPaster(real_imgs, real_masks, PasteConfig(**paste))
        w = float(synth.get("semi_supervised_weight", 0.5))
        generator = MixedSynthesizer([(generator, 1.0 - w), (paster, w)])
        tags["semi_supervised_anomalies"] = str(len(labelled))
    modes = foreground_modes(train_df["class_name"], synth, recipe)
    by_mode = {m: SynthesisAugment(generator, seed, foreground_mode=m) for m in set(modes) or {"none"}}
    return ClassAwareAugment(by_mode, modes), tags


def build_augment(train_df: pd.DataFrame, labelled: pd.DataFrame, synth: Mapping[str, Any], seed: int,
                  crop: int, resize: int, recipe: str | None = None) -> tuple[ClassAwareAugment, dict[str, str]]:
    """The training-time pseudo-anomaly hook for ``train_df`` straight from synthesis parameters
    (no spec): self textures picked here with ``seed``. ``recipe``: the method's own
    (``synthesis.recipe`` overrides it)."""
    recipe = resolve_recipe(synth, recipe)
    picks = self_texture_picks(len(train_df), int(synth.get("self_texture_images", 64)), seed)
    images = [square(load_image(train_df.iloc[i]["image_path"]), resize, crop) for i in picks]
    return _assemble(images, train_df, labelled, synth, recipe, seed, crop, resize)


def augment_from_spec(spec: Mapping[str, Any], stage: str, train_df: pd.DataFrame, labelled: pd.DataFrame,
                      seed: int, crop: int, resize: int, group: str | None = None
                      ) -> tuple[ClassAwareAugment, dict[str, str]]:
    """The training-time hook of ``stage`` made from ``spec``: its recipe, parameters and texture
    list (the self textures listed for ``group``, in the spec's order), seeded with ``seed``."""
    if stage not in spec["stages"]:
        raise ValueError(f"the synthesis spec has no stage {stage!r} (it has {sorted(spec['stages'])})")
    synth = spec["parameters"]
    images: list[np.ndarray] = []
    if synth.get("texture_source", "fallback") in ("self", "fallback"):
        key = ALL if group is None else str(group)
        if key not in spec["textures"]["self"]:
            raise SynthesisSpecError(
                f"the synthesis spec lists self textures for the model group(s) {sorted(spec['textures']['self'])}, "
                f"this training builds {key!r} (another data.setting?): run the pipeline again so its synthesis "
                "node writes a new spec")
        images = [square(load_image(t["path"]), resize, crop) for t in spec["textures"]["self"][key]]
    return _assemble(images, train_df, labelled, synth, spec["stages"][stage], seed, crop, resize)


def cutpaste_augment(spec: Mapping[str, Any], stage: str, df: pd.DataFrame, seed: int) -> ClassAwareAugment:
    """CutPaste pseudo anomalies (:mod:`uad.synthesis.cutpaste`) on the rows of ``df``, each
    restricted to its object as ``stage``'s own recipe restricts its anomalies (GLAD's per-class
    Otsu side, the spec's foreground settings): a validation set of another family than the one
    ``stage`` trains on, in the same places."""
    from uad.synthesis.cutpaste import CutPasteSynthesizer

    if stage not in spec["stages"]:
        raise ValueError(f"the synthesis spec has no stage {stage!r} (it has {sorted(spec['stages'])})")
    modes = foreground_modes(df["class_name"], spec["parameters"], spec["stages"][stage])
    generator = CutPasteSynthesizer()
    by_mode = {m: SynthesisAugment(generator, seed, foreground_mode=m) for m in set(modes) or {"none"}}
    return ClassAwareAugment(by_mode, modes)


# ------------------------------------------------------------------------------------ the spec
def _checked(setting: str, make):
    """``make()``, with a bad value's ValueError / TypeError turned into one ConfigError naming ``setting``."""
    try:
        return make()
    except UadError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{setting}: {exc}") from None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_entries(paths: Sequence[str], names: Sequence[str] | None = None) -> list[dict[str, str]]:
    from uad.data.index import file_digests

    digests = file_digests([str(p) for p in paths])
    names = list(names) if names is not None else [Path(p).name for p in paths]
    return [{"path": str(p), "name": n, "digest": digests[str(p)]} for p, n in zip(paths, names)]


def _dtd_entries(dtd_root: str | None) -> tuple[str, list[dict[str, str]]]:
    if dtd_root is None or str(dtd_root) in ("", "None", "null"):
        raise ConfigError("synthesis.texture_source is 'dtd' but synthesis.dtd_root is not set: set it to the DTD "
                          "folder (--params synthesis.dtd_root=/data/dtd, or the environment variable UAD_DTD_ROOT), "
                          "or choose synthesis.texture_source self, procedural or fallback")
    try:
        source = DTDTextureSource(dtd_root, cache_size=1)  # the list training will sample from
    except UadError as exc:
        raise type(exc)(f"synthesis.dtd_root: {exc}") from None
    names = [p.relative_to(source.images_dir).as_posix() for p in source.files]
    entries = _file_entries([str(p) for p in source.files], names)
    bad = [e["path"] for e in entries if e["digest"] == "missing"]
    if bad:
        raise SynthesisSpecError(f"cannot read DTD texture file {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    return str(source.images_dir), entries


def _texture_digest(textures: Mapping[str, Any]) -> str:
    """Location-free: names and contents of every texture file, and the procedural kinds."""
    return _digest({"dtd": [(e["name"], e["digest"]) for e in textures.get("dtd", {}).get("files", [])],
                    "self": {g: [(e["name"], e["digest"]) for e in lst] for g, lst in textures.get("self", {}).items()},
                    "procedural": textures.get("procedural")})


def build_spec(method: str, stage_recipes: Mapping[str, str], train_index: pd.DataFrame,
               synth: Mapping[str, Any] | None, seed: int, groups: Sequence[str | None],
               train_data: str | None = None) -> dict[str, Any]:
    """The synthesis spec of ``method``'s training on ``train_index``.

    ``stage_recipes``: the method's own recipe of each stage that learns from pseudo anomalies
    (``synthesis.recipe`` overrides them). ``groups``: the model groups training will build
    (``[None]``: one model; class names: one model per class), each with its own self textures.
    Validates the texture source now: a missing or empty DTD folder, an unreadable texture file or
    an unknown recipe / parameter raises before any training starts. ``train_data``: the index's
    :func:`~uad.data.index.content_fingerprint` when the caller has it already."""
    synth = {k: v for k, v in dict(synth or {}).items() if k != "preview"}
    kind = str(synth.get("texture_source", "fallback"))
    if kind not in TEXTURE_KINDS:
        raise ConfigError(f"synthesis.texture_source must be one of {list(TEXTURE_KINDS)}, got {kind!r}")
    stages = {str(s): resolve_recipe(synth, r) for s, r in stage_recipes.items()}
    configs = {r: dataclasses.asdict(_checked("synthesis.config", lambda r=r: SynthesisConfig.for_recipe(r, synth.get("config"))))
               for r in sorted(set(stages.values()))}
    if synth.get("paste"):
        _checked("synthesis.paste", lambda: PasteConfig(**dict(synth["paste"])))  # an unknown field fails here
    n_self = _checked("synthesis.self_texture_images", lambda: int(synth.get("self_texture_images", 64)))
    if n_self < 0:
        raise ConfigError(f"synthesis.self_texture_images must be >= 0, got {n_self}")
    normal = train_index[train_index["label"] == 0]
    labelled = train_index[train_index["label"] == 1]
    classes = sorted(str(c) for c in train_index["class_name"].unique())
    foreground = {r: dict(zip(classes, foreground_modes(classes, synth, r))) for r in configs}
    textures: dict[str, Any] = {"source": kind}
    if kind == "dtd":
        root, files = _dtd_entries(synth.get("dtd_root"))
        textures["dtd"] = {"root": root, "count": len(files), "files": files}
    if kind in ("self", "fallback"):
        n = n_self
        textures["self"] = {}
        for g in groups:
            rows = normal if g is None else normal[normal["class_name"] == g]
            picked = [str(rows.iloc[i]["image_path"]) for i in self_texture_picks(len(rows), n, seed)]
            textures["self"][ALL if g is None else str(g)] = _file_entries(picked)
        if kind == "self" and not any(textures["self"].values()):
            raise ConfigError("synthesis.texture_source 'self' needs training images (synthesis.self_texture_images > 0)")
    if kind in ("procedural", "fallback"):
        textures["procedural"] = list(ProceduralTextureSource.KINDS)
    textures["digest"] = _texture_digest(textures)
    semi = {"anomalies": int(len(labelled)), "weight": float(synth.get("semi_supervised_weight", 0.5))} if len(labelled) else None
    if train_data is None:
        from uad.data.index import content_fingerprint

        train_data = content_fingerprint(train_index)
    spec = {"format": SPEC_FORMAT, "method": method, "seed": int(seed), "stages": stages, "parameters": synth,
            "configs": configs, "foreground": foreground, "textures": textures, "semi_supervised": semi,
            "train_data": train_data}  # checked by training, not part of the digest
    spec["digest"] = spec_digest(spec)
    return spec


def _portable(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's parameters without where the files lie (``dtd_root``)."""
    return {k: v for k, v in dict(spec["parameters"]).items() if k != "dtd_root"}


def spec_digest(spec: Mapping[str, Any]) -> str:
    """What decides the anomalies, independent of where the files lie: recipes, resolved configs,
    foreground rules, texture names and contents, seed (dtd_root and the file paths left out)."""
    return _digest({"format": spec["format"], "stages": spec["stages"], "parameters": _portable(spec), "configs": spec["configs"],
                    "foreground": spec["foreground"], "textures": spec["textures"]["digest"], "seed": spec["seed"],
                    "semi_supervised": spec.get("semi_supervised")})


def spec_key(spec: Mapping[str, Any]) -> dict[str, str]:
    """The part of a training key that stands for the spec (and lets the log say which part changed)."""
    return {"digest": spec["digest"][:16], "recipes": ",".join(f"{s}={r}" for s, r in sorted(spec["stages"].items())),
            "textures": f"{spec['textures']['source']}@{spec['textures']['digest'][:12]}",
            "parameters": _digest(_portable(spec))[:12]}


def is_spec(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == SPEC_FORMAT


def describe_spec(spec: Mapping[str, Any]) -> str:
    """One line for the log: recipes and textures."""
    t = spec["textures"]
    parts = [f"{s}: {r}" for s, r in sorted(spec["stages"].items())]
    if "dtd" in t:
        parts.append(f"DTD {t['dtd']['count']} files under {t['dtd']['root']}")
    if "self" in t:
        parts.append(f"{sum(len(v) for v in t['self'].values())} self texture(s) from the training images")
    if "procedural" in t:
        parts.append("procedural textures")
    return "; ".join(parts) + f" (spec {spec['digest'][:12]})"


def check_spec_matches(spec: Mapping[str, Any], synth: Mapping[str, Any] | None, train_data: str,
                       groups: Sequence[str | None]) -> None:
    """Raise :class:`SynthesisSpecError` when ``spec`` was made for other synthesis parameters,
    other training data or other model groups than the training about to use it (a spec kept on
    disk and read by ``--from-nodes`` after a change): training would otherwise follow the old spec."""
    fix = "run the pipeline again so its synthesis node writes a new spec (kedro run --pipeline=<pipeline>)"
    now = json.loads(json.dumps({k: v for k, v in dict(synth or {}).items() if k != "preview"}, default=str))
    made = json.loads(json.dumps(dict(spec["parameters"]), default=str))
    if now != made:
        keys = sorted(k for k in set(now) | set(made) if now.get(k) != made.get(k))
        raise SynthesisSpecError(f"the synthesis spec was made with other synthesis parameters than this run's "
                                 f"({', '.join('synthesis.' + k for k in keys)}): {fix}")
    if spec.get("train_data") not in (None, train_data):
        raise SynthesisSpecError(f"the synthesis spec was made from other training data (fingerprint "
                                 f"{str(spec['train_data'])[:12]}, this run's {train_data[:12]}): {fix}")
    if "self" in spec["textures"]:
        want = sorted(ALL if g is None else str(g) for g in groups)
        if sorted(spec["textures"]["self"]) != want:
            raise SynthesisSpecError(f"the synthesis spec lists self textures for the model group(s) "
                                     f"{sorted(spec['textures']['self'])}, this training builds {want} "
                                     f"(another data.setting?): {fix}")


def check_spec_current(spec: Mapping[str, Any], seed: int, where: str = "") -> None:
    """Raise :class:`SynthesisSpecError` when ``spec`` no longer describes what is on disk (a DTD
    file added, removed or replaced, a self-texture image changed) or was made with another seed:
    training would otherwise not make the anomalies the spec records. Cheap: digests are cached
    by file stat."""
    from uad.data.index import file_digests

    origin = f"the synthesis spec{f' {where}' if where else ''}"
    fix = "run the pipeline again so its synthesis node writes a new spec (kedro run --pipeline=<pipeline>)"
    if int(spec["seed"]) != int(seed):
        raise SynthesisSpecError(f"{origin} was made with seed {spec['seed']}, this training uses engine.seed {seed}: {fix}")
    t = spec["textures"]
    if "dtd" in t:
        try:
            root, files = _dtd_entries(spec["parameters"].get("dtd_root"))
        except UadError as exc:
            raise SynthesisSpecError(f"{origin}: {exc}") from None
        old = {e["name"]: e["digest"] for e in t["dtd"]["files"]}
        new = {e["name"]: e["digest"] for e in files}
        changed = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
        if changed:
            raise SynthesisSpecError(f"{origin} lists other DTD textures than {root} holds now "
                                     f"({len(changed)} file(s) differ, e.g. {changed[0]}): {fix}")
    for group, entries in t.get("self", {}).items():
        now = file_digests([e["path"] for e in entries])
        for e in entries:
            if now[e["path"]] != e["digest"]:
                raise SynthesisSpecError(f"{origin}: self-texture image {e['path']} ({group}) changed or is missing: {fix}")
