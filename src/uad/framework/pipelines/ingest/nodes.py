"""Ingest nodes: dataset root(s) -> validated sample index -> train/test split for the setting."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from uad.errors import ConfigError, DatasetRootError
from uad.data.index import validate_index
from uad.data.layouts import UNLABELLED_SPLITS, detect_layout, scan_dataset, scan_unlabelled
from uad.data.semi import hold_out_labelled_anomalies
from uad.data.settings import hold_out_normals, hold_out_validation, make_split, validation_rows
from uad.data.sources import source_name, sources as _sources, train_sources
from uad.data.synthetic import ensure_synthetic_dataset

log = logging.getLogger(__name__)


def _scan(sources: list[dict[str, Any]], classes) -> pd.DataFrame:
    frames = []
    for s in sources:
        root = Path(s["root"])
        if not s.get("synthetic") and not root.exists():
            raise DatasetRootError(f"dataset root {root} does not exist: point data.train[].root at the dataset "
                                    "(the paper environments read it from the UAD_DATA_ROOT environment variable)")
        if s.get("synthetic"):
            ensure_synthetic_dataset(root, seed=int(s.get("seed", 0)), **dict(s.get("generator") or {}))
        frames.append(scan_dataset(root, layout=s.get("layout", "auto"), classes=s.get("classes", classes),
                                   dataset_name=s.get("name")))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _holdout_fraction(data: dict[str, Any]) -> float:
    val = data.get("normal_holdout", 0.2)
    if val is None or val is False:
        return 0.0
    try:
        val = float(val)
    except (TypeError, ValueError):
        raise ConfigError(f"data.normal_holdout: {val!r} is not a number; give a fraction in (0, 1) such as 0.2, "
                          f"or 0 to require a test folder") from None
    if not 0.0 <= val < 1.0:
        raise ConfigError(f"data.normal_holdout: {val} is not in [0, 1); give a fraction such as 0.2, or 0 to "
                          f"require a test folder")
    return val


def build_sample_index(data: dict[str, Any]) -> pd.DataFrame:
    """Scan every configured source (train and, for zero-shot, test) into one validated index.

    A failed validation raises before anything is saved, so a failed ingest writes nothing.
    """
    train_sources_ = train_sources(data)
    test_sources = _sources(data, "test")
    if not train_sources_:
        raise ConfigError("parameters: data.train must name at least one dataset root")
    index = _scan(train_sources_, data.get("classes"))
    if test_sources:
        extra = _scan(test_sources, data.get("test_classes"))
        index = pd.concat([index, extra], ignore_index=True).drop_duplicates(subset=["dataset", "image_path"])
    if data.get("validate", True):
        # a class without test images is held out from its normals by split_for_setting when
        # data.normal_holdout is on; only then may the test split be missing here
        holdout = _holdout_fraction(data) > 0 and data.get("setting", "multi_class") != "zero_shot"
        validate_index(index, check_images=True, full_decode=bool(data.get("full_decode", True)), progress=True,
                       mask_policy=data.get("mask_policy", "binary"),
                       require_splits=("train",) if holdout else ("train", "test"))
    log.info("sample index: %d images, %d classes, datasets %s", len(index), index["class_name"].nunique(),
             sorted(index["dataset"].unique()))
    return index


def split_for_setting(index: pd.DataFrame, data: dict[str, Any]
                      ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Train / validation / test tables for the configured setting (multi-class, one-class,
    few-shot, zero-shot), plus the split information that the run records (few-shot choice,
    held-out normals and anomalies, validation counts).

    The validation table holds normal images no method trains on (the layout's own, MVTec AD 2's
    ``validation/good``, else ``data.validation_fraction`` of each class's training normals:
    :func:`uad.data.settings.hold_out_validation`); ``train_index`` then holds only the rows
    trained on. It has the index columns and may be empty (the default ``validation_fraction: 0``)."""
    train_names = {source_name(s) for s in train_sources(data)}
    test_names = {source_name(s) for s in _sources(data, "test")}
    setting = data.get("setting", "multi_class")
    seed = int(data.get("seed", 0))
    train_src = index[index["dataset"].isin(train_names)]
    test_src = index[index["dataset"].isin(test_names)] if test_names else None
    held: dict[str, int] = {}
    if setting != "zero_shot" and _holdout_fraction(data) > 0:
        train_src, held = hold_out_normals(train_src, _holdout_fraction(data), seed=seed)
        for key, n in held.items():
            log.info("%s has no test images: %d of its normal training images (data.normal_holdout %.2f, seed %d) "
                     "are its test split; thresholds come from the false-positive rate on them "
                     "(evaluation.threshold_fpr), and image metrics need anomalies, so they are not computed",
                     key, n, _holdout_fraction(data), seed)
    if setting != "zero_shot" and test_src is not None and not test_names <= train_names:
        raise ValueError(f"data.test names other datasets {sorted(test_names - train_names)}: that is the "
                         "zero_shot setting (data.setting: zero_shot)")
    # validation normals: from the data the test images come from (zero-shot: the target dataset)
    fraction = data.get("validation_fraction", 0)
    if setting == "zero_shot" and test_src is not None:
        test_src, val_counts = hold_out_validation(test_src, fraction, seed=seed)
        val_src = test_src
    else:
        train_src, val_counts = hold_out_validation(train_src, fraction, seed=seed)
        val_src = train_src
    train_df, test_df, info = make_split(train_src, test_src, setting=setting, shots=data.get("shots"),
                                         seed=seed, classes=data.get("classes"))
    k = int(data.get("anomaly_shots") or 0)
    if k > 0:  # semi-supervised: k labelled anomalies per class move from test to train
        train_df, test_df, held = hold_out_labelled_anomalies(train_df, test_df, k, seed=seed)
        info["semi_supervised_anomalies"] = held
    if held:
        info["normal_holdout"] = {"fraction": _holdout_fraction(data), "held_out": held}
    val_df = validation_rows(val_src, classes=sorted(set(test_df["class_name"])))
    if len(val_df):
        info["validation"] = {"fraction": float(fraction or 0), "images": {
            k: v for k, v in val_counts.items() if k.split("/", 1)[1] in set(val_df["class_name"])}}
        log.info("validation split: %d normal images no method trains on (%s)", len(val_df),
                 ", ".join(f"{k} {v}" for k, v in sorted(info["validation"]["images"].items())))
    info["setting"] = setting
    info["n_train"], info["n_test"], info["n_validation"] = int(len(train_df)), int(len(test_df)), int(len(val_df))
    return train_df.reset_index(drop=True), val_df, test_df.reset_index(drop=True), info


def build_unlabelled_index(index: pd.DataFrame, data: dict[str, Any]) -> pd.DataFrame:
    """MVTec AD 2's test sets without public ground truth (``test_private``,
    ``test_private_mixed``) of every training source in that layout, for the classes the sample
    index holds: listed here, scored by the ``submission`` pipeline. ``label`` is -1 (unknown).
    Empty (the index columns only) for every other layout."""
    frames = []
    classes = sorted(set(index["class_name"])) if len(index) else None
    for s in train_sources(data):
        root = Path(s["root"])
        if s.get("synthetic") or not root.is_dir():
            continue
        layout = str(s.get("layout") or "auto").lower()
        if (detect_layout(root) if layout == "auto" else layout) != "mvtec_ad2":
            continue
        frames.append(scan_unlabelled(root, classes=classes, dataset_name=source_name(s)))
    out = pd.concat(frames, ignore_index=True) if frames else scan_unlabelled(Path("/nonexistent"))
    if len(out):
        counts = out.groupby(["class_name", "split"]).size()
        log.info("unlabelled test sets (no public ground truth; kedro run --pipeline=submission scores them): %s",
                 ", ".join(f"{c}/{sp} {n}" for (c, sp), n in counts.items()))
        for cls in classes or []:
            missing = [sp for sp in UNLABELLED_SPLITS if not ((out["class_name"] == cls) & (out["split"] == sp)).any()]
            if missing:
                log.warning("%s has no %s images: its submission folders will be incomplete", cls, " / ".join(missing))
    return out
