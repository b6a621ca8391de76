"""An MVTec-AD-2-shaped tree (the embedded images re-arranged: validation/, test_public/, the two
private sets) from ingest to the evaluation server's submission folders, in the smoke profile."""

from __future__ import annotations

import logging
import tarfile

import numpy as np
import pandas as pd
import pytest

from kedro_harness import last_run, run_pipeline, tracked_project

from uad.data.layouts import detect_layout, scan_dataset, scan_unlabelled
from uad.data.mvtec_ad2 import make_mvtec_ad2_tree
from uad.data.synthetic import ensure_synthetic_dataset
from uad.submission import SubmissionError, check_submission, read_float16_tiff

CLASSES = ["fabric", "wood"]  # two of the four embedded classes keep the run short


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    yield from tracked_project(tmp_path_factory)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    src = ensure_synthetic_dataset(tmp_path_factory.mktemp("embedded") / "synthetic", seed=0)
    return make_mvtec_ad2_tree(src, tmp_path_factory.mktemp("ad2") / "mvtec_ad2", seed=0)


def test_layout_reads_every_split_and_mvtec_warns_about_the_rest(tree, caplog):
    assert detect_layout(tree) == "mvtec_ad2"
    idx = scan_dataset(tree, "auto")
    counts = idx.groupby(["split", "label"]).size().to_dict()
    assert counts == {("test", 0): 40, ("test", 1): 60, ("train", 0): 96, ("validation", 0): 32}
    assert (idx[idx.label == 1].mask_path != "").all()
    priv = scan_unlabelled(tree)
    assert priv.groupby("split").size().to_dict() == {"test_private": 100, "test_private_mixed": 100}
    with caplog.at_level(logging.WARNING, logger="uad.data.layouts"):
        scan_dataset(tree, "mvtec")  # the old silent path: now every unread folder is named
    assert "test_public" in caplog.text and "validation" in caplog.text and "set data.layout: mvtec_ad2" in caplog.text


def test_ingest_to_submission(project, tree):
    params = {"data.root": str(tree), "data.classes": CLASSES}
    run_pipeline(project, "patchcore", params=params)
    inter = project / "data/02_intermediate"
    val = pd.read_csv(inter / "validation_index.csv", keep_default_na=False)
    train = pd.read_csv(inter / "train_index.csv", keep_default_na=False)
    unl = pd.read_csv(inter / "unlabelled_index.csv", keep_default_na=False)
    assert len(val) == 16 and not set(val.image_path) & set(train.image_path)
    assert len(unl) == 100 and set(unl.split) == {"test_private", "test_private_mixed"}
    _, run = last_run(f"sqlite:///{project / 'mlflow.db'}")
    m = run.data.metrics
    for name in ("pixel_segf1", "pixel_aupro_005", "pixel_aupimo", "pixel_aupro"):
        for cls in CLASSES:
            assert 0.0 <= m[f"{cls}/{name}"] <= 1.0, name
    assert m["pixel_aupro_005"] < m["pixel_aupro"]  # the stricter limit: AU-PRO@0.05 below AU-PRO@0.3

    run_pipeline(project, "submission", params=params, namespaces=["patchcore"])
    folder = project / "data/07_model_output/patchcore/submission"
    rows = unl.to_dict("records")
    summary = check_submission(folder, rows)
    assert summary["files"] == 200 and summary["classes"] == CLASSES
    tiff = read_float16_tiff(folder / "anomaly_images/fabric/test_private/000_regular.tiff")
    assert tiff.dtype == np.float16 and tiff.ndim == 2
    with tarfile.open(folder.with_name("submission.tar.gz")) as tar:
        assert len([n for n in tar.getnames() if n.endswith((".tiff", ".png"))]) == 200
    # the checker fails a folder the server would refuse: a missing file, a wrong count
    (folder / "anomaly_images_thresholded/wood/test_private_mixed/000_mixed.png").unlink()
    with pytest.raises(SubmissionError, match="missing"):
        check_submission(folder, rows)
    with pytest.raises(SubmissionError, match="server expects 321"):
        check_submission(folder, rows, official_counts={"fabric": 321, "wood": 321})
