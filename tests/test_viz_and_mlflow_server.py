"""kedro viz builds the real graph of every pipeline; a real `mlflow server` receives runs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kedro_harness import last_run, make_project_copy, run_pipeline

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def test_kedro_viz_build_shows_every_pipeline_with_datasets_and_parameters(tmp_path):
    project = make_project_copy(tmp_path / "p")
    out = subprocess.run([str(BIN / "kedro"), "viz", "build"], cwd=project, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    api = project / "build" / "api" / "pipelines"
    for name in ("__default__", "ingest", "synthesis", "features", "patchcore", "dinomaly", "inpformer", "rlr", "evaluate"):
        assert (api / name).is_file(), f"kedro viz has no pipeline {name}"
    graph = json.loads((api / "inpformer").read_text())
    names = {n["name"] for n in graph["nodes"]}
    assert {"train_reconstruction", "train_residual", "predict", "evaluate", "report"} <= names
    assert {"train_index", "inpformer.checkpoint_reconstruction", "inpformer.predictions",
            "params:inpformer.method", "params:synthesis"} <= names
    dino = {n["name"] for n in json.loads((api / "dinomaly").read_text())["nodes"]}
    assert {"train", "dinomaly.checkpoint_train", "params:dinomaly.method"} <= dino
    rlr = {n["name"] for n in json.loads((api / "rlr").read_text())["nodes"]}
    assert {"train", "predict", "rlr.checkpoint_train", "params:rlr.method"} <= rlr
    # the stages between ingestion and training, as edges of the drawn graph
    for pipe, stage, handed, trains in (
            ("inpformer", "synthesis", "inpformer.synthesis_spec", {"train_reconstruction", "train_residual"}),
            ("costfilter_dinomaly", "synthesis", "costfilter_dinomaly.synthesis_spec", {"train_filter"}),
            ("costfilter_patchcore", "extract_features", "costfilter_patchcore.train_features", {"train_filter"}),
            ("patchcore", "extract_features", "patchcore.train_features", {"train_fit"})):
        edges = _edges(api / pipe)
        assert ("train_index", stage) in edges and (stage, handed) in edges, pipe
        assert {t for a, t in edges if a == handed} == trains, pipe
    for pipe in ("dinomaly", "rlr", "agpnet", "patchcore"):
        assert not any("synthesis" in a + b for a, b in _edges(api / pipe)), pipe
    assert not any(a == "extract_features" for a, _ in _edges(api / "costfilter_dinomaly"))


def _edges(path) -> set[tuple[str, str]]:
    """(source name, target name) of every edge of a pipeline ``kedro viz build`` wrote."""
    graph = json.loads(path.read_text())
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    return {(names[e["source"]], names[e["target"]]) for e in graph["edges"] if e["source"] in names and e["target"] in names}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runs_land_in_a_real_mlflow_server(tmp_path, monkeypatch):
    port = _free_port()
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{server_dir / 'server.db'}",
         "--artifacts-destination", str(server_dir / "artifacts")],
        # (its background job runner, a process of its own that tracking does not use, stays off)
        cwd=server_dir, env=_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        # ready means its /health answers, not only its port: on a busy machine the port opens
        # seconds before the application behind it serves (CI once failed the run's own check here)
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, "mlflow server exited early"
            try:
                with urllib.request.urlopen(uri + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health within 180 s")
        project = make_project_copy(tmp_path / "p")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        run_pipeline(project, "synthesis")  # ingest alone opens no MLflow run
        client, run = last_run(uri)
        assert run.info.status == "FINISHED"
        assert run.data.tags.get("pipeline") == "synthesis"
        assert {a.path for a in client.list_artifacts(run.info.run_id, "data")} >= {"data/train_index.csv"}
        assert any((server_dir / "artifacts").rglob("train_index.csv"))
        assert not (project / "mlflow.db").exists(), "the run went to the local store, not the server"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        shutil.rmtree(server_dir, ignore_errors=True)
