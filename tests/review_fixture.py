"""A trained model in a throw-away project's catalog, made in seconds: the smoke profile's PatchCore
fitted on ten normal images of one class of the embedded dataset, its full-frame scores of that
class's test split as the evaluation stores them (checkpoint, predictions and thresholds under one
version folder, as one Kedro run writes them). What the review tests score with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kedro_harness import make_project_copy

VERSION = "2026-01-01T00.00.00.000Z"
CLASS = "fabric"
# conf/smoke/parameters_patchcore.yml: the infer pipeline rebuilds the method from these
PARAMS = {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "layers": [2, 3], "resize": 128, "crop": 112,
          "target_dim": 256}


def trained_project(dest: Path, synthetic_root: Path) -> Path:
    import shutil

    import torch

    from uad.data.images import load_image, load_mask
    from uad.engine.checkpoint import save_state
    from uad.inference import Inferencer
    from uad.methods.registry import build_method
    from uad.metrics.thresholds import compute_thresholds

    project = make_project_copy(dest)
    raw = project / "data" / "01_raw" / "synthetic"
    shutil.copytree(synthetic_root, raw)
    method = build_method("patchcore", PARAMS)
    spec = method.input_spec
    train = sorted((raw / CLASS / "train" / "good").glob("*.png"))[:10]
    x = torch.stack([torch.from_numpy(load_image(p)).permute(2, 0, 1) for p in train]).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(spec["crop"], spec["crop"]), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(spec["mean"]).view(1, 3, 1, 1)) / torch.tensor(spec["std"]).view(1, 3, 1, 1)
    method.fit_from_features(method.features(x))
    meta = {**method.identity(), "method": "patchcore", "stage": "fit", "params": PARAMS, "classes": [CLASS],
            "setting": "multi_class"}
    ckpt = project / "data/06_models/patchcore/fit.safetensors" / VERSION / "fit.safetensors"
    ckpt.parent.mkdir(parents=True)
    save_state(ckpt, method.state_dict(), meta)
    tests = sorted(p for p in (raw / CLASS / "test").glob("*/*.png"))
    labels = np.array([0 if p.parent.name == "good" else 1 for p in tests])
    inf = Inferencer.from_checkpoint(ckpt, None, device="cpu", progress=False)
    results = inf.predict([str(p) for p in tests])
    scores = np.array([r.score for r in results], np.float32)
    maps = np.stack([r.map for r in results])
    masks = np.stack([np.zeros(maps.shape[1:], bool) if p.parent.name == "good" else
                      load_mask(raw / CLASS / "ground_truth" / p.parent.name / f"{p.stem}_mask.png") for p in tests])
    thr = compute_thresholds(labels, scores, masks, maps)
    stored = {**thr, "frame": "crop", "full": {**thr, "frame": "full"}}
    out = project / "data/08_reporting/patchcore/thresholds.json" / VERSION / "thresholds.json"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps(stored))
    pred = project / "data/07_model_output/patchcore/anomaly_maps.npz" / VERSION / "anomaly_maps.npz"
    pred.parent.mkdir(parents=True)
    np.savez(pred, labels=labels, scores=scores, full_scores=scores, image_paths=np.array([str(p) for p in tests]))
    return project
