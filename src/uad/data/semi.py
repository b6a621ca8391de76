"""Semi-supervised setting (INP-Former++): a few labelled real anomalies per class.

The ``k`` anomalous test images per class chosen here move to the training table (label 1) and
leave the test table, so they are never evaluated on. The synthesis stage pastes their anomaly
regions into normal images (:class:`uad.synthesis.RealAnomalyPaster`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def hold_out_labelled_anomalies(train_df: pd.DataFrame, test_df: pd.DataFrame, k: int, seed: int = 0
                                ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, list[str]]]:
    """Move ``k`` anomalous test images per class (seeded) to train; return the choice."""
    if k <= 0:
        return train_df, test_df, {}
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    chosen: dict[str, list[str]] = {}
    bad = test_df[(test_df["label"] == 1) & (test_df["mask_path"].astype(str) != "")]
    for cls, rows in bad.groupby("class_name", sort=True):
        if len(rows) <= k:
            raise ValueError(f"class {cls!r} has only {len(rows)} anomalous test images with masks; "
                             f"cannot hold out {k} for the semi-supervised setting and still evaluate")
        take = rng.choice(rows.index.to_numpy(), size=k, replace=False)
        picked.extend(int(i) for i in take)
        chosen[str(cls)] = sorted(rows.loc[take, "image_path"].astype(str))
    moved = test_df.loc[picked].assign(split="train")
    return (pd.concat([train_df, moved], ignore_index=True),
            test_df.drop(index=picked).reset_index(drop=True), chosen)
