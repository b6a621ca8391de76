"""Which trained model the review station scores with, its thresholds, and the held-out scores the
threshold's cost is measured on.

A model is named one of three ways (``kedro review``'s options):

``--method=<ns>`` (and optionally ``--version=<checkpoint version>``)
    the catalog's latest (or that) checkpoint of the method's last stage, the latest thresholds
    version, and the evaluation's predictions of the same run (same version folder: one Kedro run
    saves every output under one version);
``--model=models:/uad-<ns>/<v>`` or ``runs:/<id>/model``
    a model logged by the ``export`` pipeline (downloaded by MLflow);
``--model=<folder>``
    such a model's files, already on disk.

The thresholds saved from the page go into the catalog's ``<ns>.thresholds`` (a new version),
so ``infer`` and :meth:`uad.inference.Inferencer.from_catalog` read them from then on.

Held-out scores: the validation split's normals when the predictions hold them (``data.validation_fraction``),
else the test split's normals; recall and precision on the labelled test split. Each image's score
is the one the Inferencer's frame gives (``full``: the evaluation's ``full_scores``, exactly how
``infer`` scores), so a threshold set on them means the same for new images.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from uad.errors import ConfigError, UadError

log = logging.getLogger(__name__)

__all__ = ["ReviewModel", "Reference", "open_model", "save_thresholds", "project_catalog"]


@dataclass
class Reference:
    """Held-out scores in the Inferencer's frame: ``normals`` (where the false-positive rate is
    read), ``labelled_scores`` / ``labels`` (recall and precision; empty when the split has no
    anomalies), and where each came from (shown on the page)."""

    normals: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    normals_from: str = ""
    labelled_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    labelled_from: str = ""
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"normals": [float(v) for v in self.normals], "normals_from": self.normals_from,
                "labelled": [[float(s), int(y)] for s, y in zip(self.labelled_scores, self.labels)],
                "labelled_from": self.labelled_from, "note": self.note}

    def cost(self, threshold: float) -> dict[str, Any]:
        """False-positive rate on the normals, recall and precision on the labelled split at
        ``score >= threshold`` (None where there is nothing to measure it on)."""
        t = float(threshold)
        out: dict[str, Any] = {"threshold": t, "n_normals": int(self.normals.size), "fpr": None,
                               "n_labelled": int(self.labels.size), "recall": None, "precision": None}
        if self.normals.size:
            out["fpr"] = float((self.normals >= t).mean())
        pos = self.labels == 1
        if pos.any() and (~pos).any():
            flagged = self.labelled_scores >= t
            tp = int((flagged & pos).sum())
            out["recall"] = tp / int(pos.sum())
            out["precision"] = tp / int(flagged.sum()) if flagged.any() else None
        return out


@dataclass
class ReviewModel:
    """A trained model ready to score: the Inferencer, the thresholds as stored (the whole dict:
    saving keeps every field and changes the image threshold of the Inferencer's frame), the
    method's catalog namespace, and the held-out reference scores."""

    inferencer: Any
    namespace: str
    stored_thresholds: dict[str, Any]
    reference: Reference
    description: str
    checkpoint_version: str = ""
    thresholds_version: str = ""
    trained_in_run: str = ""
    classes: list[str] = field(default_factory=list)
    catalog: Any = None  #: the project's catalog entries (a config resolver): where thresholds are saved

    @property
    def threshold_block(self) -> str:
        """Which block of thresholds.json the Inferencer applies: ``full`` or the top level."""
        return "full" if self.inferencer.threshold_frame == "full" else "top"


# ------------------------------------------------------------------------------------ catalog
def project_catalog(project: Path, env: str | None):
    """``(config resolver, params)`` of the Kedro project at ``project`` under ``env``: the
    catalog's dataset entries (factories resolved) and the parameters."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro.io import CatalogConfigResolver

    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env) as session:
        ctx = session.load_context()
        conf = ctx.config_loader["catalog"]
        params = dict(ctx.params)
    return CatalogConfigResolver(conf, default_runtime_patterns={"{default}": {"type": "kedro.io.MemoryDataset"}}), params


def _dataset(resolver, project: Path, name: str, load_version: str | None = None):
    """A fresh catalog dataset ``name`` (its own save version: every save is a new version) and
    its absolute folder."""
    from kedro.io import AbstractDataset

    cfg = dict(resolver.resolve_pattern(name) or {})
    if not cfg or "filepath" not in cfg:
        raise ConfigError(f"the catalog has no file dataset {name!r} (conf/base/catalog.yml)")
    path = Path(cfg["filepath"])
    if not path.is_absolute():
        cfg["filepath"] = str(project / path)
    return AbstractDataset.from_config(name, cfg, load_version, None), Path(cfg["filepath"])


def _versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if (p / folder.name).is_file()) if folder.is_dir() else []


def _method_stage(namespace: str) -> str:
    from uad.methods.declaration import split_namespace
    from uad.methods.registry import method_class

    try:
        return method_class(split_namespace(namespace)[0]).stages[-1]
    except Exception:  # noqa: BLE001 - any failure to find it means the name is not a method
        from uad.methods.declaration import declarations

        names = ", ".join(sorted(declarations()))
        raise ConfigError(f"--method {namespace!r} is not a method of this project ({names}; or a plug-in "
                          f"pairing such as costfilter_patchcore)") from None


# ------------------------------------------------------------------------------------- opening
def open_model(project: Path, *, method: str | None = None, version: str | None = None, model: str | None = None,
               env: str | None = None, class_name: str | None = None, device: str = "auto") -> ReviewModel:
    """The model named by ``method`` (+ ``version``) or ``model`` (see the module docstring),
    scoring with the ``infer`` parameters of ``env`` (frame, short side, tiles). Every failure is
    a :class:`~uad.errors.UadError` naming what to give instead."""
    from uad.inference import Inferencer, frame_options

    if bool(method) == bool(model):
        raise ConfigError("name one model: --method=<method> (its latest trained model, or --version=<version>) "
                          "or --model=<MLflow model URI or model folder>")
    resolver, params = project_catalog(project, env)
    infer = dict(params.get("infer") or {})
    opts = frame_options(infer)
    opts["class_name"] = class_name or infer.get("class_name")
    engine = dict(params.get("engine") or {})
    opts["device"] = device if device != "auto" else str(engine.get("device") or "auto")
    opts["workers"] = 1
    opts["progress"] = False
    if model:
        return _open_exported(project, resolver, model, opts)
    ns = str(method)
    stage = _method_stage(ns)
    _, ckpt_dir = _dataset(resolver, project, f"{ns}.checkpoint_{stage}")
    have = _versions(ckpt_dir)
    if not have:
        raise ConfigError(f"no trained {ns} model in {ckpt_dir}: run kedro run --pipeline={ns} first")
    if version is not None and version not in have:
        raise ConfigError(f"--version {version} is not a version of {ckpt_dir}; versions: {', '.join(have[-5:])}")
    ck_version = version or have[-1]
    ckpt = ckpt_dir / ck_version / ckpt_dir.name
    _, thr_dir = _dataset(resolver, project, f"{ns}.thresholds")
    thr_versions = _versions(thr_dir)
    later = [v for v in thr_versions if v >= ck_version]
    # the thresholds of this checkpoint: the newest version saved since it (its evaluation, or a review)
    nxt = next((v for v in have if v > ck_version), None)
    mine = [v for v in later if nxt is None or v < nxt]
    thr_version = mine[-1] if mine else ""
    stored = json.loads((thr_dir / thr_version / thr_dir.name).read_text()) if thr_version else {}
    inf = Inferencer.from_checkpoint(ckpt, stored or None, **opts)
    _, pred_dir = _dataset(resolver, project, f"{ns}.predictions")
    pred = pred_dir / ck_version / pred_dir.name
    reference = _reference(pred if pred.is_file() else None, inf)
    return ReviewModel(inf, ns, stored, reference,
                       f"{ns} checkpoint {ck_version}" + (f", thresholds {thr_version}" if thr_version else ", no thresholds"),
                       ck_version, thr_version, str(inf.provenance.get("trained_in_run") or ""),
                       list(inf.provenance.get("classes") or []), resolver)


def _open_exported(project: Path, resolver, model: str, opts: dict[str, Any]) -> ReviewModel:
    from uad.inference import Inferencer

    if "://" in model or model.startswith(("models:/", "runs:/")):
        from uad.framework.mlflow_model import inferencer_from_mlflow

        try:
            inf = inferencer_from_mlflow(model, **opts)
        except UadError:
            raise
        except Exception as e:  # noqa: BLE001 - MLflow's own error, said in one line
            raise ConfigError(f"--model {model}: MLflow could not open it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); give a registered model "
                              f"(models:/uad-<method>/<version>) or a run's model (runs:/<id>/model)") from None
        desc = f"MLflow model {model}"
    else:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--model {model} is neither an MLflow model URI nor a folder")
        inf = Inferencer.from_model_folder(folder, **opts)
        desc = f"model folder {folder}"
    ns = str(inf.provenance.get("method") or inf.method.name)
    ckpt = Path(str(inf.provenance.get("checkpoint") or ""))
    thr_file = ckpt.parent / "thresholds.json"
    stored = json.loads(thr_file.read_text()) if thr_file.is_file() else {}
    reference = Reference(note="an exported model carries no held-out scores: the false-positive rate is not "
                               "known here (start with --method to read them from the evaluation)")
    return ReviewModel(inf, ns, stored, reference, desc, trained_in_run=str(inf.provenance.get("trained_in_run") or ""),
                       classes=list(inf.provenance.get("classes") or []), catalog=resolver)


def _reference(pred_file: Path | None, inf) -> Reference:
    """The held-out scores of the evaluation's predictions file (see the module docstring)."""
    if pred_file is None:
        return Reference(note="no evaluation predictions for this checkpoint: run the method's pipeline to "
                              "score its held-out images")
    with np.load(pred_file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k.endswith(("scores", "labels"))}
    full = inf.frame == "full" and inf.threshold_frame == "full"
    key = "full_scores" if full and "full_scores" in arrays else "scores"
    labels = arrays.get("labels", np.zeros(0, np.int64)).astype(np.int64)
    scores = arrays.get(key, np.zeros(0, np.float32)).astype(np.float64)
    frame = "full frame" if key == "full_scores" else "centre crop"
    ref = Reference(labelled_scores=scores, labels=labels, labelled_from=f"test split ({frame}, {len(labels)} images)")
    vkey = "validation_" + key
    if vkey in arrays and arrays[vkey].size:
        ref.normals = arrays[vkey].astype(np.float64)
        ref.normals_from = f"validation normals ({frame}, {ref.normals.size} images)"
    else:
        ref.normals = scores[labels == 0]
        ref.normals_from = f"test split normals ({frame}, {ref.normals.size} images; no validation split)"
    if not (labels == 1).any():
        ref.labelled_scores, ref.labels = np.zeros(0), np.zeros(0, np.int64)
        ref.labelled_from = "the test split has no labelled defects"
    return ref


# ------------------------------------------------------------------------------------ saving
def save_thresholds(project: Path, env: str | None, rm: ReviewModel, image_threshold: float,
                    note: str = "") -> dict[str, Any]:
    """A new version of ``<ns>.thresholds`` with the image threshold of the Inferencer's frame set
    to ``image_threshold`` (every other field kept), recorded in MLflow; the Inferencer applies it
    from now on. Returns the version, the file, the MLflow run id (or why none) and the cost."""
    t = float(image_threshold)
    if not np.isfinite(t):
        raise ConfigError(f"threshold {image_threshold!r} is not a finite number")
    resolver = rm.catalog if rm.catalog is not None else project_catalog(project, env)[0]
    ds, folder = _dataset(resolver, project, f"{rm.namespace}.thresholds")
    new = json.loads(json.dumps(rm.stored_thresholds))  # a deep copy of what was stored
    block = new.setdefault("full", {"frame": "full"}) if rm.threshold_block == "full" else new
    cost = rm.reference.cost(t)
    previous = block.get("image")
    block.update({"image": t, "image_source": "review"})
    if rm.inferencer.thresholds.get("pixel") is not None and block.get("pixel") is None:
        block["pixel"], block["pixel_source"] = rm.inferencer.thresholds["pixel"], rm.inferencer.thresholds["pixel_source"]
    new["review"] = {"saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "frame": rm.threshold_block, "previous_image_threshold": previous,
                     "based_on": rm.thresholds_version or rm.description, "checkpoint_version": rm.checkpoint_version,
                     "cost": cost, "normals_from": rm.reference.normals_from,
                     "labelled_from": rm.reference.labelled_from, "note": note}
    ds.save(new)
    version = ds.resolve_save_version()
    path = folder / version / folder.name
    rm.stored_thresholds = new
    rm.thresholds_version = version
    rm.inferencer.thresholds["image"], rm.inferencer.thresholds["image_source"] = t, "review"
    run_id, why = _record_in_mlflow(project, rm, path, t, cost, version)
    log.info("review: %s image threshold %.6g saved as %s%s", rm.namespace, t, path,
             f" (MLflow run {run_id})" if run_id else f" ({why})")
    return {"version": version, "path": str(path), "mlflow_run": run_id, "mlflow_note": why, "cost": cost,
            "threshold": t}


def _record_in_mlflow(project: Path, rm: ReviewModel, path: Path, threshold: float, cost: Mapping[str, Any],
                      version: str) -> tuple[str, str]:
    """One MLflow run (tag ``pipeline=review``) in the training run's experiment, with the new
    thresholds.json as an artifact; ``(run id, "")`` or ``("", why not)``."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        experiment = None
        if rm.trained_in_run and rm.trained_in_run != "unknown":
            try:
                experiment = client.get_run(rm.trained_in_run).info.experiment_id
            except Exception:  # noqa: BLE001 - the training run lives in another store: use ours
                experiment = None
        if experiment is None:
            found = client.get_experiment_by_name("uad-review")
            experiment = found.experiment_id if found else client.create_experiment("uad-review")
        tags = {"pipeline": "review", "method": rm.namespace, "trained_in_run": rm.trained_in_run or "unknown",
                "checkpoint_version": rm.checkpoint_version, "thresholds_version": version,
                "threshold_source": "review", "mlflow.runName": f"review {rm.namespace} threshold"}
        run = client.create_run(experiment, tags=tags)
        rid = run.info.run_id
        client.log_metric(rid, "review/image_threshold", threshold)
        for key in ("fpr", "recall", "precision"):
            if cost.get(key) is not None:
                client.log_metric(rid, f"review/{key}", float(cost[key]))
        client.log_artifact(rid, str(path), "metrics")
        client.set_terminated(rid)
        del mlflow
        return rid, ""
    except Exception as e:  # noqa: BLE001 - the version is saved; the record is what failed
        log.warning("review: thresholds saved as %s but not recorded in MLflow: %s", path, e)
        return "", f"not recorded in MLflow: {type(e).__name__}: {e}"
