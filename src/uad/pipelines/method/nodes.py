"""The train -> predict -> evaluate -> report template every method shares (thin Kedro nodes).

Each node builds the method from its name and parameters through the registry and calls the
core library; nothing here is specific to one method. Settings:

- ``multi_class`` / ``few_shot`` / ``zero_shot``: one model for all training classes;
- ``one_class``: one model per class; their states live in one checkpoint, keys prefixed
  ``<class>::``. ``data.per_class: true`` does the same in the ``few_shot`` setting (the per-class
  few-shot protocol the papers' few-shot tables compare with).
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
from uad.data.images import load_image
from uad.data.torch_data import AnomalyImageDataset
from uad.engine import EngineConfig, Trainer
from uad.engine.speed import HostResults
from uad.inference import GROUP_SEP, split_group_state
from uad.pipelines.ingest.nodes import dataset_name
from uad.methods.registry import build_method
from uad.metrics import METRIC_NAMES, compute_metrics
from uad.metrics.metrics import auroc
from uad.io.datasets import PARAM_PREFIX
from uad.metrics.plots import figure_to_png_bytes, per_class_bar_chart, roc_pr_curves
from uad.synthesis.spec import spec_key

log = logging.getLogger(__name__)

ONE_CLASS = "one_class"
_SEP = GROUP_SEP


# ------------------------------------------------------------------------------------ helpers
def _engine_cfg(engine: dict | None, override: dict | None) -> EngineConfig:
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


def per_class_models(setting_or_meta: dict[str, Any]) -> bool:
    """True when a run (its ``data`` parameters) or a checkpoint (its ``meta``) holds one model per
    class: the ``one_class`` setting, or ``per_class: true`` (few-shot per class)."""
    return setting_or_meta.get("setting") == ONE_CLASS or bool(setting_or_meta.get("per_class"))


def _groups(train_df: pd.DataFrame, data: dict[str, Any]) -> list[str | None]:
    if data.get("per_class") and data.get("setting") not in (ONE_CLASS, "few_shot"):
        raise ValueError(f"data.per_class trains one model per class in the few_shot setting (one_class always "
                         f"does); the {data.get('setting')} setting trains one model for all classes: set "
                         f"data.per_class=false or data.setting=few_shot")
    if per_class_models(data):
        return sorted(train_df["class_name"].unique())
    return [None]


def _dataset(method, df: pd.DataFrame, classes: list[str], augment=None, shared_cache: str | None = None) -> AnomalyImageDataset:
    spec = method.input_spec
    return AnomalyImageDataset(df.reset_index(drop=True), resize=spec["resize"], crop=spec["crop"],
                               mean=spec["mean"], std=spec["std"], augment=augment, class_names=classes,
                               shared_cache=shared_cache)


_split_state = split_group_state  # one class's model of a one-model-per-class checkpoint


def _synthesis_augment(method, stage: str, train_df: pd.DataFrame, labelled: pd.DataFrame,
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


def _setting_augment(method, setting: str, df: pd.DataFrame, seed: int, tags: dict[str, str]):
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


def _synthesis_spec(method_name: str, train_index: pd.DataFrame, data: dict, synthesis: dict | None,
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
            check_spec_matches(synthesis, synthesis_params, fingerprint, _groups(normal, data))
        check_spec_current(synthesis, seed)
        return synthesis
    return build_spec(method_name, stages, train_index, synthesis, seed, _groups(normal, data), train_data=fingerprint or None)


# ------------------------------------------------------------------------------------ training
def compose_plugin_params(method_params: dict, base_name: str, base_params: dict) -> dict:
    """A plug-in's parameters (CostFilter-AD): its own block plus the base method's name and
    parameters, so the frozen base is rebuilt exactly as it was trained."""
    return {**dict(method_params or {}), "base": base_name, "base_params": dict(base_params or {})}


def train_stage(method_name: str, stage: str, train_index: pd.DataFrame, data: dict, method_params: dict,
                engine: dict, engine_override: dict, synthesis: dict | None = None,
                previous: dict | None = None, features: dict | None = None,
                base: dict | None = None, synthesis_params: dict | None = None) -> tuple[dict, dict, dict]:
    """Train one stage of ``method_name``; returns (checkpoint, loss history for MLflow, run tags).

    ``synthesis``: the run's synthesis spec (node ``synthesis``; :mod:`uad.synthesis.spec`) for a
    method that learns from pseudo anomalies, or the raw ``synthesis`` parameters (a spec is then
    built here). ``synthesis_params``: this run's ``params:synthesis``, with a spec: a spec made
    for other parameters, data or model groups is an error before anything trains.

    ``previous``: the checkpoint of the method's previous stage. ``features``: cached encoder
    features (``extract_features``) for methods that fit from them in one pass. ``base``: a
    plug-in's trained base method (its checkpoint), loaded frozen before training.

    With ``engine.strategy: ddp`` outside a process group, the node starts ``engine.devices``
    local ranks that run this same function data-parallel; rank 0's result comes back here and
    only this process returns it to the catalog. Under ``torchrun`` the ranks exist already."""
    cfg = _engine_cfg(engine, engine_override)
    spawned = _launch_ranks(cfg, train_stage, method_name=method_name, stage=stage, train_index=train_index, data=data,
                            method_params=method_params, engine=engine, engine_override=engine_override,
                            synthesis=synthesis, previous=previous, features=features, base=base,
                            synthesis_params=synthesis_params)
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
    spec = _synthesis_spec(method_name, train_index, data, synthesis, cfg.seed, synthesis_params,
                           fingerprint)  # validates the textures (and a kept spec) first
    for group in _groups(normal, data):
        method = build_method(method_name, method_params)
        method.adapt_to_setting(str(data.get("setting", "multi_class")))
        if not identity:  # first model of the node (one-class: first class)
            identity = method.identity()
            params = model_params(method, data, cfg, None if spec is None else spec["parameters"])
        if base is not None:
            _check_base_setting(base, data)
            method.load_base(_split_state(base["tensors"], group), base.get("meta"), base.get("path"))
            tags.update(_base_tags(base))
        if previous is not None:
            method.check_checkpoint(previous.get("meta") or {}, previous.get("path"))
            method.load_state_dict(_split_state(previous["tensors"], group))
        if stage not in method.stages:  # a stage switched off by the parameters (an ablation)
            log.info("%s: stage %r is disabled by the parameters; passing the previous state on", method_name, stage)
            tensors.update(previous["tensors"] if previous is not None else {})
            tags.update(method.tags())
            continue
        df = normal if group is None else normal[normal["class_name"] == group]
        # the setting's augmentation first (it replicates rows), then pseudo anomalies on every row
        df, fold = _setting_augment(method, str(data.get("setting", "multi_class")), df, cfg.seed, tags)
        aug, aug_tags = _synthesis_augment(method, stage, df, labelled if group is None else
                                           labelled[labelled["class_name"] == group], spec, cfg.seed, group)
        tags.update(aug_tags)
        if fold is not None:
            from uad.data.augment import ChainAugment

            aug = fold if aug is None else ChainAugment(fold, aug)
        ds = _dataset(method, df, classes, augment=aug, shared_cache=cfg.decoded_cache)
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
        tags.update(_ddp_tags(global_batch))
        if features is not None and hasattr(method, "fit_from_features"):
            result = method.fit_from_features(_split_state(features["tensors"], group)["features"])
        else:
            if features is not None:  # what the features stage computed (a plug-in's reference pool)
                if not hasattr(method, "load_train_features"):
                    raise ValueError(f"{method_name} has no use for a features stage's output (no load_train_features)")
                method.load_train_features(_split_state(features["tensors"], group))
            result = method.fit_stage(stage, loader, trainer)
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
                 "dataset": ",".join(sorted(train_index["dataset"].astype(str).unique()))})
    meta = {**identity, "method": method_name, "stage": stage, "params": method_params, "classes": classes,
            "setting": data.get("setting", "multi_class"), "per_class": per_class_models(data),
            "train_data_sha256": fingerprint, "run_params": params}
    tags.update({PARAM_PREFIX + k: v for k, v in params.items()})
    return {"tensors": tensors, "meta": meta}, history, tags


def _launch_ranks(cfg: EngineConfig, fn: Callable, **kwargs: Any) -> Any:
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


def _ddp_tags(global_batch: int) -> dict[str, str]:
    """A data-parallel run records its ranks and the split of the (unchanged) global batch."""
    from uad.engine import distributed

    world = distributed.world_size()
    if world <= 1:
        return {}
    return {"ddp_world_size": str(world), "ddp_global_batch": str(global_batch),
            "ddp_batch_per_rank": str(global_batch // world), "ddp_backend": str(torch.distributed.get_backend())}


def _check_base_setting(base: dict, data: dict) -> None:
    meta = base.get("meta") or {}
    made = meta.get("setting", "multi_class")
    want = data.get("setting", "multi_class")
    if per_class_models(meta) != per_class_models(data):
        raise ValueError(f"the base checkpoint {base.get('path') or ''} was trained in the {made} setting"
                         f"{' (one model per class)' if per_class_models(meta) else ''}, this run is {want}"
                         f"{' (one model per class)' if per_class_models(data) else ''}: train the base in the same "
                         f"setting (or pick its checkpoint with --load-versions)")


def _base_tags(base: dict) -> dict[str, str]:
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
    cfg = _engine_cfg(engine, engine_override)
    normal = train_index[train_index["label"] == 0]
    classes = sorted(train_index["class_name"].unique())
    tensors: dict[str, torch.Tensor] = {}
    for group in _groups(normal, data):
        method = build_method(method_name, method_params)
        method.adapt_to_setting(str(data.get("setting", "multi_class")))
        if base is not None:
            _check_base_setting(base, data)
            method.load_base(_split_state(base["tensors"], group), base.get("meta"), base.get("path"))
        trainer = Trainer(cfg)
        trainer.prepare(method)
        method.eval_mode()
        df = normal if group is None else normal[normal["class_name"] == group]
        prefix = "" if group is None else f"{group}{_SEP}"
        if hasattr(method, "extract_train_features"):
            state = method.extract_train_features(_dataset(method, df, classes))
            tensors.update({prefix + k: v.detach().cpu() for k, v in state.items()})
            continue
        loader = trainer.loader(_dataset(method, df, classes), batch_size=cfg.batch_size or 8)
        feats = [method.features(b["image"].to(trainer.device)).float().cpu() for b in loader]
        tensors[prefix + "features"] = torch.cat(feats)
    return {"tensors": tensors, "meta": {"method": method_name, "params": method_params,
                                          "train_index_sha256": index_fingerprint(train_index)}}


# ------------------------------------------------------------------------------------ prediction
@torch.no_grad()
def score_dataset(method, ds, trainer: Trainer, cfg, desc: str, errors: list[str] | None = None,
                  on_batch: Callable[[dict, Any], None] | None = None,
                  base: dict[str, list] | None = None, shard: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores float32 (N,), maps float16 (N, crop, crop), masks uint8 (N, crop, crop))`` of a
    prepared method over ``ds``, streamed by the engine's loader (workers, pinned memory) with a
    progress bar. The one scoring loop of evaluation and inference. With a dataset whose samples
    carry ``error`` (:class:`uad.data.torch_data.SkipUnreadable`), ``errors`` receives them in
    order (the flagged samples' scores and maps are placeholders for the caller to drop).
    ``on_batch(batch, prediction)`` sees every batch as it is scored (pictures made from the
    decoded images, without decoding them again). ``base`` receives a plug-in's base predictions
    (``scores`` / ``maps`` lists) when the method returns them. A method with ``wants_class_ids``
    is given the batch's class ids. In a data-parallel run (``shard``) each rank scores a block of
    whole batches and every rank receives all the results, in order (a callback's pictures need
    every image in one process: with ``on_batch`` the process scores everything itself)."""
    from uad.engine import distributed
    from uad.progress import progress

    batch_size = cfg.infer_batch_size or cfg.batch_size or 8
    if shard and distributed.world_size() > 1 and on_batch is None:  # sharded: whole batches per rank
        part = _score_shard(method, ds, trainer, cfg, desc, errors, base, batch_size)
        return _gather_shards(part, errors, base)
    # pictures (on_batch) read the normalised images of the batch: uint8 transfer only without them
    loader = trainer.loader(ds, batch_size=batch_size, uint8=on_batch is None)
    normalise = getattr(loader, "uad_normalise", None)
    host = HostResults(len(ds), trainer.device)
    for batch in progress(loader, desc=desc, unit="batch", enabled=bool(cfg.progress)):
        if errors is not None:
            errors.extend(batch.get("error") or [""] * len(batch["image"]))
        images = batch["image"].to(trainer.device, non_blocking=True)
        if normalise is not None and images.dtype == torch.uint8:
            images = normalise(images)
        if getattr(method, "wants_class_ids", False):
            out = method.predict(images, class_ids=batch["class_id"].to(trainer.device))
        elif on_batch is not None:  # pictures need the maps on the host now
            out = method.predict(images)
        else:  # results stay on the device; HostResults copies them behind the next batch
            out = getattr(method, "predict_on_device", method.predict)(images)
        if base is not None and out.base is not None:
            base.setdefault("scores", []).append(out.base.scores.float().cpu().numpy())
            base.setdefault("maps", []).append(out.base.maps.float().cpu().numpy().astype(np.float16))
        if on_batch is not None:
            on_batch(batch, out)
        host.add(out.scores, out.maps, batch["mask"])
    return host.result()


def _score_shard(method, ds, trainer, cfg, desc, errors, base, batch_size):
    from uad.engine import distributed

    idx = distributed.shard_indices(len(ds), batch=batch_size)
    local_errors: list[str] | None = [] if errors is not None else None
    local_base: dict[str, list] | None = {} if base is not None else None
    quiet = cfg if distributed.is_main() else dataclasses.replace(cfg, progress=False)
    if not idx:
        return None, local_errors, local_base
    out = score_dataset(method, torch.utils.data.Subset(ds, idx), trainer, quiet, desc, local_errors, None, local_base,
                        shard=False)
    return out, local_errors, local_base


def _gather_shards(part, errors, base):
    """Every rank's shard, concatenated in rank order (= the dataset's order), on every rank."""
    from uad.engine import distributed

    parts = [p for p in distributed.all_gather_objects(part) if p[0] is not None]
    scores, maps, masks = (np.concatenate([p[0][i] for p in parts]) for i in range(3))
    if errors is not None:
        errors.extend(e for p in parts for e in (p[1] or []))
    if base is not None:
        for p in parts:
            for key, chunks in (p[2] or {}).items():
                base.setdefault(key, []).extend(chunks)
    return scores, maps, masks


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
def predict(method_name: str, test_index: pd.DataFrame, data: dict, method_params: dict, engine: dict,
            engine_override: dict, checkpoint: dict, infer: dict | None = None,
            evaluation: dict | None = None) -> dict[str, np.ndarray]:
    """Anomaly maps and scores for every test image (maps float16 at the crop size), and the same
    images scored in the full frame as ``infer`` scores new ones (``full_scores``, ``full_maps``:
    for the thresholds inference applies; ``evaluation.full_frame: false`` skips them). Under
    ``engine.strategy: ddp`` the ranks score blocks of whole batches (sharded inference) and the
    results are gathered in order: equal to one process's."""
    cfg = _engine_cfg(engine, engine_override)
    spawned = _launch_ranks(cfg, predict, method_name=method_name, test_index=test_index, data=data,
                            method_params=method_params, engine=engine, engine_override=engine_override,
                            checkpoint=checkpoint, infer=infer, evaluation=evaluation)
    if spawned is not None:
        return spawned
    # zero-shot tests on classes the model never saw: ids cover both sides
    classes = sorted(set(checkpoint["meta"].get("classes") or []) | set(test_index["class_name"].unique()))
    one_class = per_class_models(checkpoint["meta"])
    groups = sorted(test_index["class_name"].unique()) if one_class else [None]
    parts: list[dict[str, np.ndarray]] = []
    scoring_seconds = 0.0
    for group in groups:
        df = test_index if group is None else test_index[test_index["class_name"] == group]
        method = build_method(method_name, method_params)
        method.check_checkpoint(checkpoint.get("meta") or {}, checkpoint.get("path"))
        method.load_state_dict(_split_state(checkpoint["tensors"], group))
        trainer = Trainer(cfg)
        trainer.prepare(method)
        method.eval_mode()
        ds = _dataset(method, df, classes)
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
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out["input_resize"] = np.asarray(method.input_spec["resize"], dtype=np.int64)
    # the evaluation's scoring rate (decode, preprocess, forward, maps to the host), images / s
    out["scoring_img_per_s"] = np.asarray(len(out["scores"]) / max(scoring_seconds, 1e-9), dtype=np.float64)
    return out


# ------------------------------------------------------------------------------------ evaluation
def evaluate(predictions: dict[str, np.ndarray], evaluation: dict) -> tuple[pd.DataFrame, dict, dict]:
    """The seven metrics per class and their mean (the papers' protocol), and the decision
    thresholds inference will apply (:func:`uad.metrics.thresholds.compute_thresholds`: F1-optimal
    on this labelled split, or at ``evaluation.threshold_fpr`` on normal images without labels)."""
    from uad.metrics.thresholds import compute_thresholds

    has_masks = bool(predictions["masks"].any()) and evaluation.get("pixel", True)
    table = compute_metrics(predictions["labels"], predictions["scores"], predictions["masks"].astype(bool),
                            predictions["maps"], predictions["class_names"], pixel=has_masks)
    mlflow_metrics: dict[str, dict[str, float]] = {}
    for cls, row in table.iterrows():
        for name in METRIC_NAMES:
            val = row.get(name)
            if val is None or not np.isfinite(val):
                continue
            key = name if cls == "mean" else f"{cls}/{name}"
            mlflow_metrics[key] = {"value": float(val), "step": 0}
    if "scoring_img_per_s" in predictions:
        mlflow_metrics["scoring_img_per_s"] = {"value": float(predictions["scoring_img_per_s"]), "step": 0}
    mlflow_metrics["n_test_images"] = {"value": float(len(predictions["scores"])), "step": 0}
    mean = table.loc["mean"]
    shown = ", ".join(f"{m}={mean[m]:.4f}" for m in METRIC_NAMES if m in mean and np.isfinite(mean[m]))
    log.info("mean over classes: %s", shown or "no metric (the test split has no anomalous image: normal-only data)")
    if "base_scores" in predictions:  # a plug-in: the base's metrics and the gain, side by side
        base = compute_metrics(predictions["labels"], predictions["base_scores"], predictions["masks"].astype(bool),
                               predictions["base_maps"], predictions["class_names"], pixel=has_masks)
        for cls, row in base.iterrows():
            for name in METRIC_NAMES:
                val, mine = row.get(name), table.loc[cls].get(name)
                if val is None or not np.isfinite(val):
                    continue
                key = name if cls == "mean" else f"{cls}/{name}"
                mlflow_metrics[f"base/{key}"] = {"value": float(val), "step": 0}
                if mine is not None and np.isfinite(mine):
                    mlflow_metrics[f"gain/{key}"] = {"value": float(mine - val), "step": 0}
        table = table.join(base[[m for m in METRIC_NAMES if m in base.columns]].add_prefix("base_"))
        log.info("base detector: %s", ", ".join(f"{m}={base.loc['mean'][m]:.4f}" for m in METRIC_NAMES
                                                 if m in base.columns and np.isfinite(base.loc["mean"][m])))
    thresholds = compute_thresholds(predictions["labels"], predictions["scores"],
                                    predictions["masks"] if has_masks else None,
                                    predictions["maps"] if has_masks else None,
                                    fpr=float(evaluation.get("threshold_fpr", 0.01)))
    thresholds["frame"] = "crop"
    if "full_scores" in predictions:  # the full frame inference scores: its own thresholds and headline metrics
        full = compute_thresholds(predictions["labels"], predictions["full_scores"],
                                  predictions["full_masks"] if has_masks else None,
                                  predictions["full_maps"] if has_masks else None,
                                  fpr=float(evaluation.get("threshold_fpr", 0.01)))
        thresholds["full"] = {**full, "frame": "full"}
        for key in ("image", "pixel"):
            if key in full:
                mlflow_metrics[f"full_frame/threshold_{key}"] = {"value": float(full[key]), "step": 0}
        labels = np.asarray(predictions["labels"])
        if 0 < labels.sum() < labels.size:
            mlflow_metrics["full_frame/image_auroc"] = {"value": float(auroc(labels, predictions["full_scores"])), "step": 0}
        if has_masks:
            m, v = predictions["full_masks"].reshape(-1).astype(bool), predictions["full_maps"].reshape(-1).astype(np.float32)
            step = max(1, v.size // 4_000_000)
            mlflow_metrics["full_frame/pixel_auroc"] = {"value": float(auroc(m[::step], v[::step])), "step": 0}
        log.info("full frame (what infer scores): %s; thresholds image %.6g%s", ", ".join(
            f"{k.split('/')[1]}={v['value']:.4f}" for k, v in mlflow_metrics.items() if k.startswith("full_frame/") and "auroc" in k),
            full["image"], f", pixel {full['pixel']:.6g}" if "pixel" in full else "")
    for key in ("image", "pixel"):
        if key in thresholds:
            mlflow_metrics[f"threshold_{key}"] = {"value": float(thresholds[key]), "step": 0}
    log.info("decision thresholds: image %.6g (%s)%s", thresholds["image"], thresholds["image_source"],
             f", pixel {thresholds['pixel']:.6g} ({thresholds['pixel_source']})" if "pixel" in thresholds else "")
    return table.reset_index().rename(columns={"index": "class_name"}), mlflow_metrics, thresholds


def _run_title(method_name: str, data: dict | None) -> tuple[str, list[tuple[str, str]]]:
    """``<method> · <dataset> · <setting> · run <id>`` and the facts the report lists."""
    data = data or {}
    dataset = dataset_name(data).replace("+", ", ")
    setting = str(data.get("setting", "multi_class"))
    run_id = ""
    try:
        import mlflow

        run = mlflow.active_run()
        run_id = run.info.run_id if run is not None else ""
    except Exception:  # noqa: BLE001
        pass
    title = " · ".join([method_name, dataset, setting] + ([f"run {run_id[:8]}"] if run_id else []))
    facts = [("method", method_name), ("dataset", dataset), ("setting", setting)]
    if run_id:
        facts.append(("MLflow run", run_id))
    return title, facts


def report(method_name: str, predictions: dict[str, np.ndarray], metrics_table: pd.DataFrame, reporting: dict,
           thresholds: dict | None = None, data: dict | None = None) -> tuple[bytes, bytes, bytes, str]:
    """The evaluation's pictures and page: the cases at the stored threshold per class (worst
    false alarm, worst miss, a detection, a normal image; :mod:`uad.metrics.report`), ROC / PR
    curves computed exactly as the metrics table, the per-class chart, and one self-contained
    HTML page with all of it and the per-class table; every title names method, dataset,
    setting and run."""
    from uad.metrics.report import case_grid, case_png, colour_scale_png, html_report, map_scale, pick_cases

    title, facts = _run_title(method_name, data)
    thresholds = thresholds or {}
    per_kind = int(reporting.get("overlays_per_class", 2))
    labels, scores = predictions["labels"], predictions["scores"]
    classes = predictions["class_names"]
    thr = float(thresholds["image"]) if thresholds.get("image") is not None else float(np.median(scores))
    px = float(thresholds["pixel"]) if thresholds.get("pixel") is not None else None
    crop = predictions["maps"].shape[-1]
    resize = int(predictions["input_resize"]) if "input_resize" in predictions else crop
    cache: dict[int, np.ndarray] = {}

    def display(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = _display_image(predictions["image_paths"][i], resize, crop)
        return cache[i]

    cases = pick_cases(labels, scores, classes, thr, per_kind=max(1, per_kind))
    maps = predictions["maps"]
    masks = predictions["masks"].astype(bool)
    scale = map_scale(maps, px)
    overlay = case_grid(cases, display, maps, masks, scores, thr, px, title, scale)
    curves = roc_pr_curves(labels, scores, masks, maps, classes, title=title)
    table = metrics_table.set_index("class_name")
    bars = per_class_bar_chart(table, title=title)
    overlay_png, curves_png, bars_png = figure_to_png_bytes(overlay), figure_to_png_bytes(curves), figure_to_png_bytes(bars)
    pngs, captions = {}, {}
    for kinds in cases.values():
        for idx in kinds.values():
            for i in idx:
                if i not in pngs:
                    pngs[i] = case_png(display(i), maps[i].astype(np.float32), masks[i], scale, px)
                    captions[i] = (f"score {float(scores[i]):.4g} · {predictions['defect_types'][i]} · "
                                   f"{_short_path(predictions['image_paths'][i])}")
    facts += [("image threshold", f"{thr:.6g} ({thresholds.get('image_source', 'median of the scores: none stored')})"),
              ("pixel threshold", f"{px:.6g} ({thresholds.get('pixel_source', '')})" if px is not None else "none"),
              ("test images", f"{len(scores)} ({int(np.sum(labels))} defective)")]
    notes = ["Metrics: the papers' protocol (resize, centre crop). Curves: every pixel, as the table."]
    full = thresholds.get("full") if isinstance(thresholds.get("full"), dict) else None
    if full and full.get("image") is not None:
        notes.append(f"infer scores the whole frame; its thresholds, set on the test split scored that way: image "
                     f"{float(full['image']):.6g}" + (f", pixel {float(full['pixel']):.6g}" if full.get("pixel") is not None else ""))
    page = html_report(title, facts, metrics_table, [("Cases per class", overlay_png), ("ROC and PR curves", curves_png),
                                                     ("Metrics per class", bars_png)],
                       cases, pngs, captions, colour_scale_png(scale, px), notes)
    return overlay_png, curves_png, bars_png, page


def _short_path(path: str, keep: int = 3) -> str:
    parts = str(path).replace("\\", "/").split("/")
    return "/".join(parts[-keep:])


def _display_image(path: str, resize: int, crop: int) -> np.ndarray:
    """The test image as the model saw it (square resize, then centre crop) for overlays."""
    from PIL import Image

    img = np.asarray(Image.fromarray(load_image(path)).resize((resize, resize), Image.BILINEAR))
    top = (resize - crop) // 2
    return img[top:top + crop, top:top + crop]
