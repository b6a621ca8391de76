"""Experimental settings: which rows train a model and which rows test it.

:func:`make_split` turns sample indexes into ``(train_df, test_df, info)``:

``multi_class``
    One model for all classes (the unified setting of Dinomaly / INP-Former): every train-split
    image of every class trains it, every test-split image tests it.
``one_class``
    One model per class (the classic setting). The rows are the same as ``multi_class``;
    ``info["groups"]`` lists the classes and the caller trains and evaluates one model per group
    on ``train_df[train_df.class_name == g]`` / ``test_df[test_df.class_name == g]``
    (:func:`iter_groups` does the slicing).
``few_shot``
    ``shots`` normal train images per class. The choice is deterministic: per class, the
    candidate paths are sorted and ``shots`` of them are drawn without replacement by
    ``numpy.random.default_rng([seed, crc32(class_name)])`` (a per-class stream, so filtering
    classes does not change any class's choice). The chosen paths are recorded in
    ``info["few_shot_choice"] = {class: [paths]}``. Tests on all test images.
``zero_shot``
    Train on dataset A (the train-split rows of ``train_source_df``), test on dataset B (the
    test-split rows of ``test_source_df``, required). ``info`` records both dataset names.
    ``classes`` then filters the test side (B's classes); A is used whole.

When ``test_source_df`` is given for another setting, test rows come from it instead of from
``train_source_df``. ``info`` is JSON-serialisable.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from .index import INDEX_COLUMNS

__all__ = ["SETTINGS", "hold_out_normals", "hold_out_validation", "iter_groups", "make_split", "validation_rows"]

SETTINGS: tuple[str, ...] = ("multi_class", "one_class", "few_shot", "zero_shot")
_SORT = ["dataset", "class_name", "split", "label", "defect_type", "image_path"]


def _check_columns(df: pd.DataFrame, what: str) -> None:
    missing = [c for c in INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{what} is missing index columns {missing}")


def _filter_classes(df: pd.DataFrame, classes: Sequence[str] | None, what: str) -> pd.DataFrame:
    if classes is None:
        return df
    available = sorted(set(df["class_name"]))
    unknown = [c for c in classes if c not in available]
    if unknown:
        raise ValueError(f"classes {unknown} are not in {what}; available: {available}")
    return df[df["class_name"].isin(list(classes))]


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(_SORT, kind="mergesort").reset_index(drop=True)[INDEX_COLUMNS]


def _names(df: pd.DataFrame) -> list[str]:
    return sorted({str(x) for x in df["dataset"]})


def make_split(
    train_source_df: pd.DataFrame,
    test_source_df: pd.DataFrame | None = None,
    setting: str = "multi_class",
    shots: int | None = None,
    seed: int = 0,
    classes: Iterable[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Select train and test rows for ``setting`` (see the module docstring).

    Returns ``(train_df, test_df, info)``: both frames sorted with a fresh 0..n-1 index, and
    ``info`` with at least ``setting, seed, classes, train_datasets, test_datasets, n_train,
    n_test`` (+ ``groups`` for one_class, ``shots`` and ``few_shot_choice`` for few_shot).
    """
    if setting not in SETTINGS:
        from uad.errors import ConfigError

        raise ConfigError(f"data.setting: {setting!r} is not one of {', '.join(SETTINGS)}; "
                          "e.g. --params=\"data.setting=one_class\"")
    _check_columns(train_source_df, "train_source_df")
    if test_source_df is not None:
        _check_columns(test_source_df, "test_source_df")
    from uad.params import cli_list

    cls_list = None if classes is None else [str(c) for c in cli_list(classes)]

    info: dict = {"setting": setting, "seed": int(seed)}
    if setting == "zero_shot":
        if test_source_df is None:
            raise ValueError("zero_shot needs test_source_df (the target dataset B); got None")
        train = train_source_df[train_source_df["split"] == "train"]
        test = _filter_classes(test_source_df[test_source_df["split"] == "test"], cls_list, "test_source_df")
        info["train_dataset"] = ", ".join(_names(train))
        info["test_dataset"] = ", ".join(_names(test))
    else:
        src_test = test_source_df if test_source_df is not None else train_source_df
        train = _filter_classes(train_source_df[train_source_df["split"] == "train"], cls_list, "train_source_df")
        test = _filter_classes(src_test[src_test["split"] == "test"], cls_list, "the test source")

    if setting == "few_shot":
        if shots is None or int(shots) < 1:
            raise ValueError(f"few_shot needs shots >= 1, got {shots!r}")
        k = int(shots)
        normal = train[train["label"] == 0]
        picked: list[pd.DataFrame] = []
        choice: dict[str, list[str]] = {}
        multi_ds = normal["dataset"].nunique() > 1
        for (ds, cls), grp in normal.groupby(["dataset", "class_name"], sort=True):
            grp = grp.sort_values("image_path", kind="mergesort")
            if len(grp) < k:
                raise ValueError(f"few_shot: class {ds}/{cls} has {len(grp)} normal train images < shots={k}")
            rng = np.random.default_rng([int(seed), zlib.crc32(str(cls).encode("utf-8"))])
            idx = np.sort(rng.choice(len(grp), size=k, replace=False))
            sel = grp.iloc[idx]
            picked.append(sel)
            choice[f"{ds}/{cls}" if multi_ds else str(cls)] = [str(p) for p in sel["image_path"]]
        train = pd.concat(picked) if picked else train.iloc[:0]
        info["shots"] = k
        info["few_shot_choice"] = choice

    train, test = _tidy(train), _tidy(test)
    if len(train) == 0:
        raise ValueError(f"{setting}: no train rows selected")
    if len(test) == 0:
        raise ValueError(f"{setting}: no test rows selected")
    info["classes"] = sorted({str(c) for c in test["class_name"]} | ({str(c) for c in train["class_name"]}
                                                                      if setting != "zero_shot" else set()))
    if setting == "zero_shot":
        info["train_classes"] = sorted({str(c) for c in train["class_name"]})
    if setting == "one_class":
        info["groups"] = sorted({str(c) for c in train["class_name"]})
    info["train_datasets"] = _names(train)
    info["test_datasets"] = _names(test)
    info["n_train"] = int(len(train))
    info["n_test"] = int(len(test))
    return train, test, info


def iter_groups(
    train_df: pd.DataFrame, test_df: pd.DataFrame, info: dict
) -> Iterator[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """Yield ``(group, train_rows, test_rows)``: one per class for ``one_class``, else a single
    ``("all", train_df, test_df)``."""
    groups = info.get("groups")
    if not groups:
        yield "all", train_df, test_df
        return
    for g in groups:
        yield (g, train_df[train_df["class_name"] == g].reset_index(drop=True),
               test_df[test_df["class_name"] == g].reset_index(drop=True))


def hold_out_normals(index: pd.DataFrame, fraction: float, seed: int = 0) -> tuple[pd.DataFrame, dict[str, int]]:
    """For every (dataset, class) with training images but no test images (a production line
    with no defects collected yet), move a seeded ``fraction`` of its normal training images to
    the test split (at least one, and at least one kept for training). Returns the new index and
    ``{"<dataset>/<class>": images held out}``. The evaluation then sets its thresholds at a
    false-positive rate on these normals (:func:`uad.metrics.thresholds.compute_thresholds`)."""
    from uad.errors import ConfigError

    try:
        frac = float(fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"data.normal_holdout: {fraction!r} is not a number in (0, 1); 0.2 holds out a fifth") from None
    out = index.copy()
    held: dict[str, int] = {}
    for (ds, cls), grp in index.groupby(["dataset", "class_name"], sort=True):
        if (grp["split"] == "test").any() or not (grp["split"] == "train").any():
            continue
        if not 0.0 < frac < 1.0:
            continue  # off: validation reports the missing test split with the fix
        normal = grp[(grp["split"] == "train") & (grp["label"] == 0)]
        if len(normal) < 2:
            raise ConfigError(f"class {ds}/{cls} has {len(normal)} normal image(s) and no test images: add images "
                              f"(at least 2: one to train on, one to test) or a test folder")
        n = min(len(normal) - 1, max(1, int(round(frac * len(normal)))))
        rng = np.random.default_rng([int(seed), zlib.crc32(f"{ds}/{cls}".encode())])
        pick = normal.index[np.sort(rng.choice(len(normal), size=n, replace=False))]
        out.loc[pick, "split"] = "test"
        held[f"{ds}/{cls}"] = int(n)
    return out, held


def _fraction(value, key: str) -> float:
    from uad.errors import ConfigError

    try:
        frac = 0.0 if value is None or value is False else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a number; give a fraction in [0, 1) such as 0.1, or 0 for "
                          "none") from None
    if not 0.0 <= frac < 1.0:
        raise ConfigError(f"{key}: {frac} is not in [0, 1); give a fraction such as 0.1, or 0 for none")
    return frac


def hold_out_validation(index: pd.DataFrame, fraction: float, seed: int = 0) -> tuple[pd.DataFrame, dict[str, int]]:
    """The validation split: normal images (label 0) that no method trains on; thresholds and
    calibration read them.

    A (dataset, class) whose layout ships validation images (MVTec AD 2's ``validation/good``:
    rows with ``split == "validation"``) keeps exactly those. Every other (dataset, class) with
    ``fraction > 0`` (``data.validation_fraction``) moves ``n = min(N - 1, max(1, round(fraction *
    N)))`` of its ``N`` normal training images to ``split = "validation"``: at least one held out,
    at least one kept for training; drawn without replacement from the path-sorted normals by
    ``numpy.random.default_rng([seed, crc32("<dataset>/<class>"), 1])`` (a per-class stream, so
    filtering classes changes no class's choice; the trailing 1 keeps it apart from
    :func:`hold_out_normals`' stream). ``fraction == 0`` (the papers' setting) holds out nothing.

    Returns the new index and ``{"<dataset>/<class>": validation images}`` for every class that
    has any (the layout's or held out)."""
    from uad.errors import ConfigError

    frac = _fraction(fraction, "data.validation_fraction")
    out = index.copy()
    counts: dict[str, int] = {}
    for (ds, cls), grp in index.groupby(["dataset", "class_name"], sort=True):
        own = int((grp["split"] == "validation").sum())
        if own:
            counts[f"{ds}/{cls}"] = own
            continue
        if frac == 0.0:
            continue
        normal = grp[(grp["split"] == "train") & (grp["label"] == 0)].sort_values("image_path", kind="mergesort")
        if len(normal) == 0:
            continue  # no training images of this class (the test side of zero-shot)
        if len(normal) < 2:
            raise ConfigError(f"data.validation_fraction: class {ds}/{cls} has {len(normal)} normal training image; "
                              "it needs 2 (one to train on, one to validate): add images, or set "
                              "data.validation_fraction: 0")
        n = min(len(normal) - 1, max(1, int(round(frac * len(normal)))))
        rng = np.random.default_rng([int(seed), zlib.crc32(f"{ds}/{cls}".encode()), 1])
        pick = normal.index[np.sort(rng.choice(len(normal), size=n, replace=False))]
        out.loc[pick, "split"] = "validation"
        counts[f"{ds}/{cls}"] = int(n)
    return out, counts


def validation_rows(index: pd.DataFrame, classes: Iterable[str] | None = None) -> pd.DataFrame:
    """The validation split's rows (normal images only) of ``classes`` (all when None), sorted
    like the other splits, with a fresh 0..n-1 index; an empty frame with the index columns when
    there are none."""
    _check_columns(index, "index")
    val = index[(index["split"] == "validation") & (index["label"] == 0)]
    if classes is not None:
        val = val[val["class_name"].isin([str(c) for c in classes])]
    return _tidy(val)
