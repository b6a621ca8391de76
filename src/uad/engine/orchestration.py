"""Training, feature extraction and prediction of a method over a run's index: the engine's
orchestration, called by the Kedro nodes, the library, the benchmarks and the tests alike.

- :func:`train_stage`: one stage of a method over the training index: the model groups (one model
  for all classes, or one per class: ``one_class``, or ``few_shot`` with ``per_class``; their
  states in one checkpoint, keys ``<class>::<name>``), data-parallel ranks when asked, the
  setting's augmentation and the stage's pseudo anomalies chained, the resume key, the loss
  history and the run's tags and parameters.
- :func:`extract_features`: the features stage (frozen-encoder features of clean normals, or a
  plug-in's reference pool).
- :func:`predict_split`: the test split scored by the evaluation protocol (crop) through
  :func:`uad.engine.scoring.score_dataset`, and in the full frame through
  :class:`uad.inference.Inferencer`, the same loop ``infer`` uses.

Core library: torch / numpy / pandas; no kedro, no mlflow.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from uad.data.index import content_fingerprint, index_fingerprint
from uad.data.sources import dataset_name
from uad.data.torch_data import AnomalyImageDataset
from uad.engine.scoring import score_dataset
from uad.engine.trainer import EngineConfig, Trainer
from uad.inference import GROUP_SEP, holds_per_class_models as per_class_models, split_group_state
from uad.methods.capabilities import Calibrated, FeatureFitting, ReferencePool
from uad.methods.registry import build_method
from uad.params import PARAM_PREFIX
from uad.synthesis.spec import spec_key

log = logging.getLogger(__name__)

__all__ = ["ONE_CLASS", "PARAM_PREFIX", "engine_config", "flatten_params", "model_params", "checkpoint_params",
           "per_class_models", "model_groups", "method_dataset", "synthesis_augment", "resolve_synthesis_spec",
           "check_method_params", "compose_plugin_params", "train_stage", "extract_features", "predict_split", "launch_ranks"]

ONE_CLASS = "one_class"
_SEP = GROUP_SEP


def engine_config(engine: dict | None, override: dict | None = None) -> EngineConfig:
    """The engine settings of a run: ``engine`` with a method's ``engine_override`` over it."""
    merged = {**(engine or {}), **(override or {})}
    return EngineConfig.from_params(merged)


_MAX_PARAM_CHARS = 500


def flatten_params(block: dict[str, Any] | None, prefix: str) -> dict[str, str]:
    """``{"a": {"b": 1}}`` under ``prefix`` -> ``{"prefix.a.b": "1"}``; long values are cut."""
    out: dict[str, str] = {}
    for k, v in (block or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten_params(v, key))
        else:
            text = "None" if v is None else str(v)
            out[key] = text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."
    return out


def model_params(method, data: dict, cfg: EngineConfig, synthesis: dict | None) -> dict[str, str]:
    """What a model was trained with, as MLflow parameters aligned across methods: ``method.*``
    (resolved: code defaults included, no namespace), ``data.*``, ``engine.*`` (resolved) and
    ``synthesis.*`` (methods that learn from pseudo anomalies). Stored in the checkpoint's meta
    (``run_params``) so export and infer log the same values."""
    out = flatten_params(method.resolved_params(), "method")
    out.update(flatten_params({k: v for k, v in (data or {}).items() if k not in ("train", "test")}, "data"))
    out["data.name"] = dataset_name(data)
    out.update(flatten_params(dataclasses.asdict(cfg), "engine"))
    if synthesis and method.synthesis_stages():
        out.update(flatten_params(synthesis, "synthesis"))
    return out


def checkpoint_params(meta: dict[str, Any]) -> dict[str, str]:
    """The MLflow parameters stored with a checkpoint (``param:``-prefixed run-tags entries);
    an older checkpoint without them gives its method block."""
    stored = meta.get("run_params")
    if not isinstance(stored, dict):
        stored = flatten_params(meta.get("params") or {}, "method")
    return {PARAM_PREFIX + str(k): str(v) for k, v in stored.items()}


def model_groups(train_df: pd.DataFrame, data: dict[str, Any]) -> list[str | None]:
    if data.get("per_class") and data.get("setting") not in (ONE_CLASS, "few_shot"):
        raise ValueError(f"data.per_class trains one model per class in the few_shot setting (one_class always "
                         f"does); the {data.get('setting')} setting trains one model for all classes: set "
                         f"data.per_class=false or data.setting=few_shot")
    if per_class_models(data):
        return sorted(train_df["class_name"].unique())
    return [None]


def method_dataset(method, df: pd.DataFrame, classes: list[str], augment=None, shared_cache: str | None = None) -> AnomalyImageDataset:
    spec = method.input_spec
    return AnomalyImageDataset(df.reset_index(drop=True), resize=spec["resize"], crop=spec["crop"],
                               mean=spec["mean"], std=spec["std"], augment=augment, class_names=classes,
                               shared_cache=shared_cache)


def synthesis_augment(method, stage: str, train_df: pd.DataFrame, labelled: pd.DataFrame,
                       spec: dict[str, Any] | None, seed: int, group: str | None):
    """The pseudo-anomaly hook of a stage that learns from synthetic anomalies, made from the run's
    synthesis spec (None for other stages)."""
    if spec is None or not method.wants_synthesis(stage):
        return None, {}
    from uad.synthesis.spec import augment_from_spec

    aug, tags = augment_from_spec(spec, stage, train_df, labelled, seed, crop=method.input_spec["crop"],
                                  resize=method.input_spec["resize"], group=group)
    tags["synthesis_spec"] = spec["digest"][:16]
    return aug, tags


def setting_augment(method, setting: str, df: pd.DataFrame, seed: int, tags: dict[str, str]):
    """The method's augmentation for ``setting`` (AGPNet's 32-fold few-shot augmentation):
    ``(rows repeated folds times, hook)``, copy 0 as it is, the others transformed;
    ``(df, None)`` when the method asks for none."""
    spec = method.train_augment(setting)
    if spec is None:
        return df, None
    from uad.data.augment import FoldAugment

    folds, fn = spec
    fold = FoldAugment(fn, n_images=len(df), seed=seed)
    log.info("%s: %s training set of %d image(s) augmented %d-fold", method.name, setting, len(df), folds)
    tags["train_augment_folds"] = str(int(folds))
    return pd.concat([df] * int(folds), ignore_index=True), fold


def resolve_synthesis_spec(method_name: str, train_index: pd.DataFrame, data: dict, synthesis: dict | None,
                    seed: int, synthesis_params: dict | None = None, fingerprint: str = "") -> dict[str, Any] | None:
    """The synthesis spec a training uses: the one the pipeline's ``synthesis`` node wrote (checked
    against the textures on disk now, so ``--from-nodes`` after a DTD change fails instead of
    training on other textures than it records), or, when a caller hands raw ``params:synthesis``
    (the library, notebooks), one built here the same way. None for a method that learns from no
    pseudo anomalies."""
    from uad.methods.registry import method_class
    from uad.synthesis.spec import build_spec, check_spec_current, is_spec

    stages = method_class(method_name).synthesis_stages()
    if not stages:
        return None
    normal = train_index[train_index["label"] == 0]
    if is_spec(synthesis):
        from uad.synthesis.spec import check_spec_matches

        if synthesis_params is not None:
            check_spec_matches(synthesis, synthesis_params, fingerprint, model_groups(normal, data))
        check_spec_current(synthesis, seed)
        return synthesis
    return build_spec(method_name, stages, train_index, synthesis, seed, model_groups(normal, data), train_data=fingerprint or None)


# ------------------------------------------------------------------------------------ training
def check_method_params(namespace: str, method_params: dict | None, engine: dict | None = None,
                        engine_override: dict | None = None) -> None:
    """The settings a run of ``namespace`` (``dinomaly``, ``costfilter_patchcore``, ...) will read,
    checked as its nodes would check them: the engine's (``engine`` with the namespace's
    ``engine_override`` over it) and the method's own block against its config class. A bad value
    raises the same one-line :class:`~uad.errors.ConfigError` the node would, before anything runs
    (no ingest, no model built). A plug-in's base parameters are checked by the base's own block."""
    from uad.methods.declaration import split_namespace
    from uad.methods.registry import method_class

    engine_config(engine, engine_override)
    if method_params is None:
        return
    method, _base = split_namespace(namespace)
    try:
        cls = method_class(method)
    except KeyError:
        return  # not a method's block: nothing of ours reads it
    cls.config_class.from_params(dict(method_params))


def compose_plugin_params(method_params: dict, base_name: str, base_params: dict) -> dict:
    """A plug-in's parameters (CostFilter-AD): its own block plus the base method's name and
    parameters, so the frozen base is rebuilt exactly as it was trained."""
    return {**dict(method_params or {}), "base": base_name, "base_params": dict(base_params or {})}


def train_stage(method_name: str, stage: str, train_index: pd.DataFrame, data: dict, method_params: dict,
                engine: dict, engine_override: dict, synthesis: dict | None = None,
                previous: dict | None = None, features: dict | None = None,
                base: dict | None = None, synthesis_params: dict | None = None,
                validation_index: pd.DataFrame | None = None) -> tuple[dict, dict, dict]:
    """Train one stage of ``method_name``; returns (checkpoint, loss history for MLflow, run tags).

    ``synthesis``: the run's synthesis spec (node ``synthesis``; :mod:`uad.synthesis.spec`) for a
    method that learns from pseudo anomalies, or the raw ``synthesis`` parameters (a spec is then
    built here). ``synthesis_params``: this run's ``params:synthesis``, with a spec: a spec made
    for other parameters, data or model groups is an error before anything trains.

    ``previous``: the checkpoint of the method's previous stage. ``features``: cached encoder
    features (``extract_features``) for methods that fit from them in one pass. ``base``: a
    plug-in's trained base method (its checkpoint), loaded frozen before training.
    ``validation_index``: the held-out normals (the ``validation`` split, no model trained on
    them); a :class:`~uad.methods.capabilities.Calibrated` method is fitted on them after its last
    stage (:func:`calibrate_method`). The test split is never an input of training.

    With ``engine.strategy: ddp`` outside a process group, the node starts ``engine.devices``
    local ranks that run this same function data-parallel; rank 0's result comes back here and
    only this process returns it to the catalog. Under ``torchrun`` the ranks exist already."""
    cfg = engine_config(engine, engine_override)
    spawned = launch_ranks(cfg, train_stage, method_name=method_name, stage=stage, train_index=train_index, data=data,
                            method_params=method_params, engine=engine, engine_override=engine_override,
                            synthesis=synthesis, previous=previous, features=features, base=base,
                            synthesis_params=synthesis_params, validation_index=validation_index)
    if spawned is not None:
        return tuple(spawned)  # type: ignore[return-value]
    normal = train_index[train_index["label"] == 0]
    labelled = train_index[train_index["label"] == 1]
    classes = sorted(train_index["class_name"].unique())
    fingerprint = content_fingerprint(train_index)  # contents and names, not where the files lie
    tensors: dict[str, torch.Tensor] = {}
    history: dict[str, list[dict[str, float]]] = {}
    tags: dict[str, str] = {}
    identity: dict[str, str] = {}
    params: dict[str, str] = {}
    spec = resolve_synthesis_spec(method_name, train_index, data, synthesis, cfg.seed, synthesis_params,
                           fingerprint)  # validates the textures (and a kept spec) first
    for group in model_groups(normal, data):
        method = build_method(method_name, method_params)
        method.adapt_to_setting(str(data.get("setting", "multi_class")))
        if not identity:  # first model of the node (one-class: first class)
            identity = method.identity()
            params = model_params(method, data, cfg, None if spec is None else spec["parameters"])
        if base is not None:
            check_base_setting(base, data)
            method.load_base(split_group_state(base["tensors"], group), base.get("meta"), base.get("path"))
            tags.update(base_tags(base))
        if previous is not None:
            method.check_checkpoint(previous.get("meta") or {}, previous.get("path"))
            method.load_state_dict(split_group_state(previous["tensors"], group))
        if stage not in method.stages:  # a stage switched off by the parameters (an ablation)
            log.info("%s: stage %r is disabled by the parameters; passing the previous state on", method_name, stage)
            tensors.update(previous["tensors"] if previous is not None else {})
            tags.update(method.tags())
            continue
        df = normal if group is None else normal[normal["class_name"] == group]
        # the setting's augmentation first (it replicates rows), then pseudo anomalies on every row
        df, fold = setting_augment(method, str(data.get("setting", "multi_class")), df, cfg.seed, tags)
        aug, aug_tags = synthesis_augment(method, stage, df, labelled if group is None else
                                           labelled[labelled["class_name"] == group], spec, cfg.seed, group)
        tags.update(aug_tags)
        if fold is not None:
            from uad.data.augment import ChainAugment

            aug = fold if aug is None else ChainAugment(fold, aug)
        ds = method_dataset(method, df, classes, augment=aug, shared_cache=cfg.decoded_cache)
        # resolved parameters: a changed code default must not resume an older training
        parts = {"method": method_name, "stage": stage, "group": group, "params": method.resolved_params(), "data": fingerprint,
                 "seed": cfg.seed, "iterations": cfg.iterations, "batch_size": cfg.batch_size,
                 "synthesis": spec_key(spec) if spec is not None and method.wants_synthesis(stage) else None,
                 "base": None if base is None else [str(base.get("path") or ""), (base.get("meta") or {}).get("params_sha")]}
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1:  # several ranks: their own random draws (dropout, noise), so their own resume folder
            parts["ddp_world_size"] = world
        metric = f"train_loss/{stage}" + (f"/{group}" if group else "")
        trainer = Trainer(cfg, key_parts=parts)
        trainer.prepare(method)
        global_batch = cfg.batch_size or int(getattr(getattr(method, "config", None), "batch_size", 8))
        loader = trainer.loader(ds, batch_size=global_batch)
        tags.update(ddp_tags(global_batch))
        if features is not None and isinstance(method, FeatureFitting):
            result = method.fit_from_features(split_group_state(features["tensors"], group)["features"])
        else:
            if features is not None:  # what the features stage computed (a plug-in's reference pool)
                if not isinstance(method, ReferencePool):
                    raise ValueError(f"{method_name} has no use for a features stage's output (not a ReferencePool)")
                method.load_train_features(split_group_state(features["tensors"], group))
            result = method.fit_stage(stage, loader, trainer)
        if isinstance(method, Calibrated) and method.wants_calibration and stage == method.stages[-1]:
            figures = calibrate_method(method, method_name, validation_index, group, classes, spec, cfg.seed, base,
                                       fingerprint)
            for key, value in figures.items():
                if key != "curve":
                    history.setdefault(f"calibration/{key}" + (f"/{group}" if group else ""), []).append(
                        {"step": 0, "value": float(value)})
        for step, loss in (result or {}).get("history", []):
            history.setdefault(metric, []).append({"step": int(step), "value": float(loss)})
        suffix = f"{stage}" + (f"/{group}" if group else "")
        for key, name in (("it_per_s", "train_it_per_s"), ("gpu_utilisation", "gpu_utilisation")):
            if (result or {}).get(key) is not None:
                history.setdefault(f"{name}/{suffix}", []).append({"step": 0, "value": float(result[key])})
        state = method.state_dict()
        prefix = "" if group is None else f"{group}{_SEP}"
        tensors.update({prefix + k: v for k, v in state.items()})
        tags.update(method.tags())
    tags.update({"setting": str(data.get("setting", "multi_class")),
                 "dataset": ",".join(sorted(train_index["dataset"].astype(str).unique())),
                 # a CPU training is bit-identical run to run at one thread count and ATen kernel set,
                 # not across them (float sums in another order): the figures say which they came from
                 "torch_threads": str(torch.get_num_threads()),
                 "cpu_capability": str(torch.backends.cpu.get_cpu_capability())})
    meta = {**identity, "method": method_name, "stage": stage, "params": method_params, "classes": classes,
            "setting": data.get("setting", "multi_class"), "per_class": per_class_models(data),
            "train_data_sha256": fingerprint, "run_params": params}
    tags.update({PARAM_PREFIX + k: v for k, v in params.items()})
    return {"tensors": tensors, "meta": meta}, history, tags


#: the pseudo anomalies of the validation set draw from their own stream, never the training's
VALIDATION_SEED_OFFSET = 7919


def calibrate_method(method, method_name: str, validation_index: pd.DataFrame | None, group: str | None,
                     classes: list[str], spec: dict[str, Any] | None, seed: int, base: dict | None,
                     fingerprint: str) -> dict[str, Any]:
    """Fit a :class:`~uad.methods.capabilities.Calibrated` method on the held-out normals of its
    model group and pseudo anomalies made on them with its own synthesis recipe (a seed stream of
    their own). A plug-in's base must have trained on exactly this run's training images, else
    the held-out normals could be images it learnt (``train_data_sha256`` of its checkpoint)."""
    from uad.errors import ConfigError

    if validation_index is None or validation_index.empty:
        raise ConfigError(f"{method_name}: calibrate needs held-out normals (the validation split), and this run has "
                          "none: set data.validation_fraction (e.g. 0.2) and train the base again with it, or use a "
                          "dataset with a validation folder (mvtec_ad2)")
    rows = validation_index[validation_index["label"] == 0]
    if group is not None:
        rows = rows[rows["class_name"] == group]
    if rows.empty:
        raise ConfigError(f"{method_name}: the validation split has no normal image of {group or 'any class'}: raise "
                          "data.validation_fraction (at least one image per class)")
    made = ((base or {}).get("meta") or {}).get("train_data_sha256")
    if base is not None and made and made != fingerprint:
        raise ConfigError(f"{method_name}: the base checkpoint {base.get('path') or ''} was trained on other training "
                          "images than this run's (another data.validation_fraction or dataset): its held-out normals "
                          "may be images it learnt; train the base again with this run's data parameters")
    stage = method.stages[-1]
    val_seed = int(seed) + VALIDATION_SEED_OFFSET
    recipe = str(getattr(method, "validation_recipe", "own"))
    # each held-out normal gives `copies` pseudo-anomalous images (rows repeated: each index its own draw)
    copies = pd.concat([rows] * int(getattr(method, "validation_copies", 1)), ignore_index=True)
    if spec is None or not method.wants_synthesis(stage):
        raise ConfigError(f"{method_name}: calibrate needs the method's pseudo-anomaly recipe (a synthesis stage)")
    if recipe == "cutpaste":  # placed where the stage's own recipe places its anomalies, no texture read
        from uad.synthesis.spec import cutpaste_augment

        aug = cutpaste_augment(spec, stage, copies, val_seed)
    else:
        aug, _ = synthesis_augment(method, stage, copies, rows.iloc[0:0], spec, val_seed, group)
    normals = method_dataset(method, rows, classes)
    pseudo = method_dataset(method, copies, classes, augment=aug)
    figures = method.calibrate(normals, pseudo)
    nan = float("nan")
    log.info("%s%s: calibrated on %d held-out normals + %d %s pseudo anomalies: map weight %.2f, score weight %.2f "
             "(validation image AUROC / pixel AUROC / AUPRO %.3f / %.3f / %.3f; base %.3f / %.3f / %.3f, "
             "P %.3f / %.3f / %.3f)", method_name,
             f" [{group}]" if group else "", len(rows), len(copies), recipe, figures["map_weight"], figures["score_weight"],
             figures["val_image_auroc"], figures["val_pixel_auroc"], figures.get("val_pixel_aupro", nan),
             *(figures.get(f"val_{who}_{key}", nan) for who in ("base", "p")
               for key in ("image_auroc", "pixel_auroc", "pixel_aupro")))
    return figures


def launch_ranks(cfg: EngineConfig, fn: Callable, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` in ``engine.devices`` spawned ranks when ``engine.strategy`` is ``ddp``
    and no process group exists yet; None when this process should run ``fn`` itself."""
    from uad.engine import distributed

    if cfg.strategy != "ddp" or distributed.is_active():
        return None
    if int(cfg.num_nodes) > 1:
        raise ValueError("engine.num_nodes > 1: start the ranks with torchrun on every node "
                         "(torchrun --nnodes=N --nproc_per_node=G ... -m kedro run ...); see the README")
    world = distributed.local_world(cfg.devices)
    if world <= 1:
        return None
    log.info("%s: data-parallel over %d local ranks (%s)", fn.__name__, world, cfg.backend or distributed.default_backend())
    return distributed.launch(fn, world=world, backend=cfg.backend, kwargs=kwargs)


def ddp_tags(global_batch: int) -> dict[str, str]:
    """A data-parallel run records its ranks and the split of the (unchanged) global batch."""
    from uad.engine import distributed

    world = distributed.world_size()
    if world <= 1:
        return {}
    return {"ddp_world_size": str(world), "ddp_global_batch": str(global_batch),
            "ddp_batch_per_rank": str(global_batch // world), "ddp_backend": str(torch.distributed.get_backend())}


def check_base_setting(base: dict, data: dict) -> None:
    meta = base.get("meta") or {}
    made = meta.get("setting", "multi_class")
    want = data.get("setting", "multi_class")
    if per_class_models(meta) != per_class_models(data):
        raise ValueError(f"the base checkpoint {base.get('path') or ''} was trained in the {made} setting"
                         f"{' (one model per class)' if per_class_models(meta) else ''}, this run is {want}"
                         f"{' (one model per class)' if per_class_models(data) else ''}: train the base in the same "
                         f"setting (or pick its checkpoint with --load-versions)")


def base_tags(base: dict) -> dict[str, str]:
    meta = base.get("meta") or {}
    out = {"base_checkpoint": str(base.get("path") or ""), "base_params_sha": str(meta.get("params_sha", ""))}
    if meta.get("mlflow_run_id"):
        out["base_mlflow_run_id"] = str(meta["mlflow_run_id"])
    return out


@torch.no_grad()
def extract_features(method_name: str, train_index: pd.DataFrame, data: dict, method_params: dict, engine: dict,
                     engine_override: dict, base: dict | None = None) -> dict:
    """The features stage: frozen-encoder features of every clean normal training image, computed
    once and saved (no augmentation, no pseudo anomaly). PatchCore: its patch features, which its
    fit reads instead of the images. A plug-in over an embedding base (CostFilter-AD over
    PatchCore, ``base``: the trained base checkpoint): the reference pool its training reads
    (``method.extract_train_features``)."""
    cfg = engine_config(engine, engine_override)
    normal = train_index[train_index["label"] == 0]
    classes = sorted(train_index["class_name"].unique())
    tensors: dict[str, torch.Tensor] = {}
    for group in model_groups(normal, data):
        method = build_method(method_name, method_params)
        method.adapt_to_setting(str(data.get("setting", "multi_class")))
        if base is not None:
            check_base_setting(base, data)
            method.load_base(split_group_state(base["tensors"], group), base.get("meta"), base.get("path"))
        trainer = Trainer(cfg)
        trainer.prepare(method)
        method.eval_mode()
        df = normal if group is None else normal[normal["class_name"] == group]
        prefix = "" if group is None else f"{group}{_SEP}"
        if isinstance(method, ReferencePool):
            state = method.extract_train_features(method_dataset(method, df, classes))
            tensors.update({prefix + k: v.detach().cpu() for k, v in state.items()})
            continue
        loader = trainer.loader(method_dataset(method, df, classes), batch_size=cfg.batch_size or 8)
        feats = [method.features(b["image"].to(trainer.device)).float().cpu() for b in loader]
        tensors[prefix + "features"] = torch.cat(feats)
    return {"tensors": tensors, "meta": {"method": method_name, "params": method_params,
                                          "train_index_sha256": index_fingerprint(train_index)}}


def _full_frame_part(method, df: pd.DataFrame, classes: list[str], cfg, infer: dict, method_name: str,
                     group: str | None) -> dict[str, np.ndarray]:
    """The same test images scored as ``infer`` scores new ones (:class:`uad.inference.Inferencer`,
    ``infer.frame: full``: every pixel), so the evaluation can set the thresholds inference applies
    on the scores inference produces. Maps and whole-image masks are brought to the crop square
    (float16 / uint8) for the pixel threshold; the crop protocol's metrics do not read them."""
    from uad.data.images import load_mask
    from uad.inference import Inferencer, frame_options

    opts = {**frame_options(infer, int(cfg.infer_batch_size or cfg.batch_size or 8)), "frame": "full"}
    inf = Inferencer(method, None, classes=classes, engine=cfg, progress=False, workers=max(1, int(cfg.num_workers or 1)),
                     **opts)
    crop = int(method.input_spec["crop"])
    res = inf.predict(list(df["image_path"]), class_names=list(df["class_name"]) if inf.wants_class else None, strict=True)
    maps = np.stack([F.interpolate(torch.from_numpy(r.map)[None, None], size=(crop, crop), mode="bilinear",
                                   align_corners=False)[0, 0].numpy() for r in res]).astype(np.float16)
    masks = np.zeros((len(res), crop, crop), np.uint8)
    for k, mp in enumerate(df["mask_path"].fillna("")):
        if mp:
            m = torch.from_numpy(load_mask(mp).astype(np.float32))[None, None]
            masks[k] = (F.interpolate(m, size=(crop, crop), mode="nearest")[0, 0].numpy() > 0.5).astype(np.uint8)
    log.info("%s: full-frame scores of %d test images%s (%s)", method_name, len(res), f" of {group}" if group else "",
             "tiles" if any(r.pieces > 1 for r in res) else "whole frames")
    return {"full_scores": np.array([r.score for r in res], np.float32), "full_maps": maps, "full_masks": masks}


@torch.no_grad()
def predict_split(method_name: str, test_index: pd.DataFrame, data: dict, method_params: dict, engine: dict,
            engine_override: dict, checkpoint: dict, infer: dict | None = None,
            evaluation: dict | None = None, validation_index: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
    """Anomaly maps and scores for every test image (maps float16 at the crop size), and the same
    images scored in the full frame as ``infer`` scores new ones (``full_scores``, ``full_maps``:
    for the thresholds inference applies; ``evaluation.full_frame: false`` skips them). Under
    ``engine.strategy: ddp`` the ranks score blocks of whole batches (sharded inference) and the
    results are gathered in order: equal to one process's.

    With a non-empty ``validation_index`` (held-out normals), its rows are scored the same way and
    returned under ``validation_`` keys (``validation_scores``, ``validation_maps``,
    ``validation_class_names``, ``validation_image_paths``, ``validation_full_scores`` /
    ``validation_full_maps`` with the full frame, ``validation_base_scores`` / ``validation_base_maps``
    for a plug-in): the evaluation sets its thresholds on them."""
    cfg = engine_config(engine, engine_override)
    spawned = launch_ranks(cfg, predict_split, method_name=method_name, test_index=test_index, data=data,
                            method_params=method_params, engine=engine, engine_override=engine_override,
                            checkpoint=checkpoint, infer=infer, evaluation=evaluation,
                            validation_index=validation_index)
    if spawned is not None:
        return spawned
    if validation_index is not None and len(validation_index) == 0:
        validation_index = None
    # zero-shot tests on classes the model never saw: ids cover both sides
    classes = sorted(set(checkpoint["meta"].get("classes") or []) | set(test_index["class_name"].unique())
                     | (set(validation_index["class_name"].unique()) if validation_index is not None else set()))
    one_class = per_class_models(checkpoint["meta"])
    groups = sorted(test_index["class_name"].unique()) if one_class else [None]
    parts: list[dict[str, np.ndarray]] = []
    vparts: list[dict[str, np.ndarray]] = []
    scoring_seconds = 0.0
    for group in groups:
        df = test_index if group is None else test_index[test_index["class_name"] == group]
        method = build_method(method_name, method_params)
        method.check_checkpoint(checkpoint.get("meta") or {}, checkpoint.get("path"))
        method.load_state_dict(split_group_state(checkpoint["tensors"], group))
        trainer = Trainer(cfg)
        trainer.prepare(method)
        method.eval_mode()
        ds = method_dataset(method, df, classes)
        base: dict[str, list] = {}
        t0 = time.perf_counter()
        scores, maps, masks = score_dataset(method, ds, trainer, cfg, f"{method_name}:predict" + (f":{group}" if group else ""),
                                            base=base)
        scoring_seconds += time.perf_counter() - t0
        part = {
            "scores": scores,
            "maps": maps,
            "masks": masks,
            "labels": df["label"].to_numpy(np.int64),
            "class_names": df["class_name"].to_numpy(str),
            "image_paths": df["image_path"].to_numpy(str),
            "defect_types": df["defect_type"].to_numpy(str),
        }
        if base:  # a plug-in: its base's own scores and maps of the same images, evaluated beside
            part["base_scores"] = np.concatenate(base["scores"]).astype(np.float32)
            part["base_maps"] = np.concatenate(base["maps"])
        if evaluation is None or evaluation.get("full_frame", True):
            part.update(_full_frame_part(method, df, classes, cfg, infer or {}, method_name, group))
        parts.append(part)
        vdf = None if validation_index is None else (
            validation_index if group is None else validation_index[validation_index["class_name"] == group])
        if vdf is not None and len(vdf):
            vdf = vdf.reset_index(drop=True)
            vbase: dict[str, list] = {}
            vscores, vmaps, _ = score_dataset(method, method_dataset(method, vdf, classes), trainer, cfg,
                                              f"{method_name}:predict:validation" + (f":{group}" if group else ""),
                                              base=vbase)
            vpart = {"scores": vscores, "maps": vmaps, "class_names": vdf["class_name"].to_numpy(str),
                     "image_paths": vdf["image_path"].to_numpy(str)}
            if vbase:
                vpart["base_scores"] = np.concatenate(vbase["scores"]).astype(np.float32)
                vpart["base_maps"] = np.concatenate(vbase["maps"])
            if evaluation is None or evaluation.get("full_frame", True):
                full = _full_frame_part(method, vdf, classes, cfg, infer or {}, method_name, group)
                vpart.update({k: v for k, v in full.items() if k != "full_masks"})
            vparts.append(vpart)
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if vparts:
        out.update({f"validation_{k}": np.concatenate([p[k] for p in vparts]) for k in vparts[0]})
    out["input_resize"] = np.asarray(method.input_spec["resize"], dtype=np.int64)
    # the evaluation's scoring rate (decode, preprocess, forward, maps to the host), images / s
    out["scoring_img_per_s"] = np.asarray(len(out["scores"]) / max(scoring_seconds, 1e-9), dtype=np.float64)
    return out


