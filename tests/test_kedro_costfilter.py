"""CostFilter-AD over a trained base (PatchCore, calibrated preset) end to end, smoke environment, tracked in
MLflow. Its own module (and project) so pytest-xdist runs it beside the other Kedro modules."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from kedro_harness import CLASSES, SEVEN, last_run, run_pipeline, tracked_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    yield from tracked_project(tmp_path_factory)


def _check_plugin_run(run, base: str, preset: str = "paper") -> dict[str, float]:
    """A CostFilter-AD run: filtered metrics, the base's on the same images and the gain."""
    m, tags = run.data.metrics, run.data.tags
    assert tags["method"] == "costfilter" and tags["base"] == base and tags["costfilter_preset"] == preset
    assert tags["base_mlflow_run_id"] and tags["synthesis_recipe"] == "glad"
    for name in SEVEN:
        assert name in m and f"base/{name}" in m and f"gain/{name}" in m
        assert m[f"gain/{name}"] == pytest.approx(m[name] - m[f"base/{name}"], abs=1e-9)
        for cls in CLASSES:
            assert f"{cls}/{name}" in m and f"base/{cls}/{name}" in m
    return m


def test_costfilter_over_patchcore_calibrated_logs_base_and_gain(project):
    """``kedro run --pipeline=costfilter_patchcore --env=smoke`` (preset ``calibrated``) over the
    trained smoke PatchCore: the run logs the filtered metrics beside the base's (equal to the base's
    own run on the same test set), the blend weights chosen on held-out normals, and the blend is
    held to the base where a weight is 0. (The plug-in over Dinomaly's ViT is covered without Kedro
    by tests/test_costfilter.py and its DAG by tests/test_synthesis_stage.py; its Kedro run here cost
    a fifth of this module's time.)"""
    from mlflow.tracking import MlflowClient

    # the test split is scored on the crop only: the whole-frame pass (infer's thresholds, tested
    # with the infer pipeline) took 25 of the 33 s of costfilter_patchcore's predict node
    crop_only = {"evaluation.full_frame": False}
    # PatchCore on Lite0's stages 1-2: at 112 px the paper's 28 x 28 patch grid (stages 2-3: 14 x 14,
    # too coarse for the filter to learn in a smoke budget); a 1 % coreset keeps the fit quick. A
    # fifth of the training normals held out (the validation split) for the calibrated preset:
    # the base is trained without them, the blend is fitted on them.
    grid28 = {"patchcore.method.layers": [1, 2], "patchcore.method.coreset_ratio": 0.01,
              "data.validation_fraction": 0.2, **crop_only}
    run_pipeline(project, "patchcore", params=grid28)
    # 40 filter steps (the smoke profile's 80 halved for the suite's time): measured score weight 0.35, map
    # weight 0 (validation image AUROC of P 0.571, of the base 0.771, of the blend 0.816), 2 CPU cores
    run_pipeline(project, "costfilter_patchcore", params={**grid28, "costfilter_patchcore.method.preset": "calibrated",
                                                          "costfilter_patchcore.method.iterations": 40})
    _, run = last_run(os.environ["MLFLOW_TRACKING_URI"])
    m = _check_plugin_run(run, "patchcore", preset="calibrated")
    base_run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run.data.tags["base_mlflow_run_id"])
    for name in ("image_auroc", "pixel_auroc"):  # the base evaluated inside the filter's run = its own run
        assert m[f"base/{name}"] == pytest.approx(base_run.data.metrics[name], abs=1e-6)
    # the weights were chosen on the held-out normals + pseudo anomalies and logged with their figures
    map_w, score_w = m["calibration/map_weight"], m["calibration/score_weight"]
    assert run.data.tags["blend_calibrated"] == "true" and run.data.tags["blend"] == f"map {map_w:g}, score {score_w:g}"
    for key in ("val_image_auroc", "val_pixel_auroc", "val_pixel_aupro", "val_base_image_auroc", "val_p_pixel_auroc",
                "val_base_pixel_aupro", "map_scale"):
        assert f"calibration/{key}" in m, key
    # the held-out normals and 4 CutPaste copies of each (calibration_copies), logged with the recipe
    n_val = m["calibration/val_images"]
    assert n_val >= 5 * len(CLASSES) and n_val % 5 == 0 and 1 <= m["calibration/val_pseudo_anomalies"] <= n_val * 4 / 5
    assert run.data.tags["blend_validation_recipe"] == "cutpaste"
    # neither end for the score: the smoke filter (40 steps) separates the held-out CutPaste images
    # well enough to enter PatchCore's score, not to replace it (measured twice: score weight 0.35,
    # beating the base in 98 % of bootstrap resamples of the held-out normals). The map's weight is 0:
    # P's pixel AUROC there is ~0.57 against PatchCore's ~0.89, and its best weight beat the base in
    # 92.5 % of the resamples, under the 95 % the bootstrap test asks for
    assert 0.0 < score_w < 1.0, score_w
    assert 0.0 <= map_w < 1.0, map_w
    # against the base on the test images: a weight of 0 gives the base's output exactly; a chosen
    # weight is not below the base by more than the half point the issue allows (measured: image
    # AUROC 0.9167 with weight 0.35, equal to the base's; the first chooser, on the filter's own
    # pseudo anomalies without the bootstrap test, measured from +0.2 to -2.3 points over suite runs)
    for name, w in (("image_auroc", score_w), ("pixel_auroc", map_w), ("pixel_aupro", map_w)):
        if w == 0.0:
            assert m[name] == pytest.approx(m[f"base/{name}"], abs=1e-9), (name, m[name], m[f"base/{name}"])
        else:
            assert m[name] >= m[f"base/{name}"] - 0.005, (name, m[name], m[f"base/{name}"])
    # the weights are chosen without the test split: the test labels poisoned on disk (every label
    # flipped), the filter's training and calibration run again and give the same calibration to the
    # bit (the training is deterministic; a chooser that read the test split would move with its labels)
    from safetensors.torch import load_file

    def calibrations() -> list[dict]:
        files = sorted((project / "data/06_models/costfilter_patchcore/filter.safetensors").rglob("filter.safetensors"))
        return [{k: v for k, v in load_file(str(f)).items() if k.startswith("cal.")} for f in files]

    test_csv = project / "data/02_intermediate/test_index.csv"
    clean_csv = test_csv.read_text()
    tdf = pd.read_csv(test_csv, keep_default_na=False)
    tdf["label"] = 1 - tdf["label"]
    tdf.to_csv(test_csv, index=False)
    try:
        run_pipeline(project, "costfilter_patchcore", params={**grid28, "costfilter_patchcore.method.preset": "calibrated",
                                                              "costfilter_patchcore.method.iterations": 40},
                     node_names=["costfilter_patchcore.compose_params", "costfilter_patchcore.train_filter"])
        assert pd.read_csv(test_csv, keep_default_na=False)["label"].tolist() == tdf["label"].tolist()  # still poisoned: not re-ingested
    finally:
        test_csv.write_text(clean_csv)
    before, after = calibrations()[-2:]
    assert set(before) == {"cal.weight", "cal.map_affine", "cal.score_affine"} and before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), (key, before[key], after[key])
    assert (project / "data/06_models/costfilter_patchcore/filter.safetensors").exists()
    # its features stage: the reference pool, computed before the filter's training
    assert (project / "data/04_feature/costfilter_patchcore/train_features.safetensors").exists()
    assert (project / "data/05_model_input/costfilter_patchcore/synthesis_spec.json").exists()
