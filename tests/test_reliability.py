"""Reruns and errors a user meets: their own data in one line, one-line errors from the CLI, no
deprecation noise, true run tags, runs that end in MLflow, checkpoints that say what made them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kedro_harness import make_project_copy, run_pipeline
from uad.data.synthetic import MARKER_NAME, ensure_synthetic_dataset

BIN = Path(sys.executable).parent


def _cli_env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "UAD_DATA_ROOT"}
    env.pop("PYTHONWARNINGS", None)
    env.update(KEDRO_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", MPLBACKEND="Agg",
               MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}")
    return env


@pytest.fixture(scope="module")
def my_data(tmp_path_factory) -> Path:
    """A user's own MVTec-layout folder (not the embedded dataset: no marker file)."""
    root = tmp_path_factory.mktemp("user") / "my_parts"
    ensure_synthetic_dataset(root, seed=3, classes=["wood", "washer"], n_train=4, n_test_good=2,
                             n_test_bad_per_defect=1)
    (root / MARKER_NAME).unlink()
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project_copy(tmp_path_factory.mktemp("project"))
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    yield root
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.mark.parametrize("how", ["env", "params"])
@pytest.mark.parametrize("env", ["quick", "smoke"])
def test_own_data_in_one_line(project, my_data, monkeypatch, how, env):
    """``UAD_DATA_ROOT=/path kedro run`` (default env and smoke) and ``--params="data.root=/path"``
    read the user's MVTec-layout folder instead of the embedded dataset."""
    params = None
    if how == "env":
        monkeypatch.setenv("UAD_DATA_ROOT", str(my_data))
    else:
        monkeypatch.delenv("UAD_DATA_ROOT", raising=False)
        params = {"data.root": str(my_data)}
    run_pipeline(project, "ingest", env=env, params=params)
    train = pd.read_csv(project / "data/02_intermediate/train_index.csv")
    test = pd.read_csv(project / "data/02_intermediate/test_index.csv")
    assert set(train["dataset"]) == {"my_parts"} and set(train["class_name"]) == {"washer", "wood"}
    assert len(train) == 8 and set(test["class_name"]) == {"washer", "wood"}
    assert all(str(p).startswith(str(my_data)) for p in train["image_path"])
    assert not (my_data / MARKER_NAME).exists()  # nothing was generated into the user's folder


def test_cli_prints_one_line_for_a_project_error_and_no_deprecation_warning(tmp_path):
    project = make_project_copy(tmp_path / "p")
    out = subprocess.run([str(BIN / "kedro"), "run", "--pipeline=ingest", "--params=data.root=/no/such/folder"],
                         cwd=project, env=_cli_env(project), capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "deprecated" not in text.lower(), text[-3000:]
    last = [ln for ln in out.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("Error: data.root /no/such/folder is not a folder") and "UAD_DATA_ROOT" in last
    assert not (Path("/no/such/folder")).exists()
