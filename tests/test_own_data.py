"""Your own parts: a folder of normal images only ingests (a seeded hold-out becomes the test
split), every ingest error says what to do, and the Python inferencer scores a new image of any
size from the trained checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from uad.data.index import DatasetValidationError, validate_index
from uad.data.layouts import detect_layout, scan_dataset
from uad.data.settings import hold_out_normals
from uad.errors import ConfigError, DatasetLayoutError


def _pngs(folder: Path, n: int, size=(40, 48), seed=0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_hold_out_is_seeded_recorded_and_leaves_classes_with_a_test_split_alone(tmp_path):
    _pngs(tmp_path / "ds" / "bracket" / "train" / "good", 10)
    _pngs(tmp_path / "ds" / "gear" / "train" / "good", 6, seed=1)
    _pngs(tmp_path / "ds" / "gear" / "test" / "good", 2, seed=2)
    index = scan_dataset(tmp_path / "ds")
    out, held = hold_out_normals(index, 0.2, seed=0)
    assert held == {"ds/bracket": 2}
    moved = out[(out["class_name"] == "bracket") & (out["split"] == "test")]
    assert len(moved) == 2 and (moved["label"] == 0).all() and (moved["defect_type"] == "good").all()
    gear = out[out["class_name"] == "gear"]
    assert (gear["split"] == index[index["class_name"] == "gear"]["split"]).all()  # untouched
    again, _ = hold_out_normals(index, 0.2, seed=0)
    other, _ = hold_out_normals(index, 0.2, seed=5)
    assert again.equals(out) and not other.equals(out)  # seeded
    tiny, held = hold_out_normals(index, 0.9, seed=0)
    assert held["ds/bracket"] == 9  # at least one image stays for training
    one = index[index["class_name"] == "bracket"].iloc[:1]
    with pytest.raises(ConfigError, match="at least 2"):
        hold_out_normals(one, 0.2)


def test_flat_folder_is_one_class_and_layout_errors_say_what_to_do(tmp_path):
    _pngs(tmp_path / "line3", 5)
    assert detect_layout(tmp_path / "line3") == "folder"
    df = scan_dataset(tmp_path / "line3")
    assert set(df["class_name"]) == {"line3"} and (df["split"] == "train").all() and len(df) == 5
    _pngs(tmp_path / "cls" / "train" / "good", 3)
    with pytest.raises(DatasetLayoutError, match=r"point data.root at the folder that holds it"):
        scan_dataset(tmp_path / "cls")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="arrange the images so, or set data.layout"):
        scan_dataset(tmp_path / "empty")
    _pngs(tmp_path / "ds" / "bracket" / "train" / "good", 4)
    with pytest.raises(DatasetValidationError) as err:
        validate_index(scan_dataset(tmp_path / "ds"), check_images=False)
    assert "has no test images; add <root>/<class>/test/good" in str(err.value)
    assert "data.normal_holdout" in str(err.value)


@pytest.mark.slow
def test_normal_only_folder_trains_evaluates_and_scores_new_images(tmp_path, monkeypatch):
    """``UAD_DATA_ROOT=<folder with only train/good> kedro run --pipeline=patchcore`` finishes with
    a metrics table and thresholds at the false-positive rate on the held-out normals; then
    ``from uad import Inferencer`` in a fresh process scores a 640 x 480 PNG from the checkpoint
    and returns a 480 x 640 map."""
    sys.path.insert(0, str(Path(__file__).parent))
    from kedro_harness import make_project_copy, run_pipeline

    project = make_project_copy(tmp_path / "project")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    from uad.data.synthetic import ensure_synthetic_dataset

    synth = ensure_synthetic_dataset(tmp_path / "synthetic")
    own = tmp_path / "only_good"
    shutil.copytree(synth / "washer" / "train" / "good", own / "bracket" / "train" / "good")
    monkeypatch.setenv("UAD_DATA_ROOT", str(own))
    run_pipeline(project, "patchcore")
    info = json.loads((project / "data/02_intermediate/split_info.json").read_text())
    n = len(list((own / "bracket" / "train" / "good").glob("*.png")))
    assert info["normal_holdout"]["held_out"] == {"only_good/bracket": round(0.2 * n)}
    test = pd.read_csv(project / "data/02_intermediate/test_index.csv")
    assert len(test) == round(0.2 * n) and (test["label"] == 0).all()
    table = pd.read_csv(project / "data/08_reporting/patchcore/metrics_per_class.csv")
    assert list(table["class_name"]) == ["bracket", "mean"]
    thr_file = sorted((project / "data/08_reporting/patchcore/thresholds.json").iterdir())[-1] / "thresholds.json"
    thresholds = json.loads(thr_file.read_text())
    assert thresholds["image_source"] == "fpr_normal" and thresholds["full"]["image_source"] == "fpr_normal"

    ckpt = sorted((project / "data/06_models/patchcore/fit.safetensors").iterdir())[-1] / "fit.safetensors"
    part = tmp_path / "part.png"
    src = sorted((own / "bracket" / "train" / "good").glob("*.png"))[0]
    Image.open(src).convert("RGB").resize((640, 480)).save(part)
    code = ("from uad import Inferencer\n"
            f"inf = Inferencer.from_checkpoint({str(ckpt)!r}, thresholds={str(thr_file)!r}, device='cpu')\n"
            f"r = inf.predict({str(part)!r})[0]\n"
            "print(r.status, r.decision, r.map.shape, r.size)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "UAD_DATA_ROOT": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    status, decision, *rest = out.stdout.strip().splitlines()[-1].split(" ", 2)
    assert status == "ok" and decision in ("normal", "anomalous")
    assert rest[0].startswith("(480, 640) (480, 640)")
