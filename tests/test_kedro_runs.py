"""End-to-end Kedro runs on the embedded dataset with the smoke environment, tracked in MLflow.

One throw-away project copy is shared by the module (the embedded dataset is generated once);
the runs are real ``KedroSession`` runs, exactly what ``kedro run --pipeline=... --env=smoke``
does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kedro_harness import CLASSES, SEVEN, _check_metrics, _latest, _versions, last_run, run_pipeline, tracked_project


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    yield from tracked_project(tmp_path_factory)


def test_patchcore_smoke_run_is_tracked_versioned_and_reported(project, monkeypatch):
    from uad.framework.hooks import run_summary

    # the hooks' own log lines, read at the logger (Kedro's logging set-up, applied when a session
    # configures the project, drops handlers that tests attach to the root or to uad.*)
    said: list[str] = []
    info = run_summary.log.info
    monkeypatch.setattr(run_summary.log, "info", lambda msg, *a, **k: (said.append(msg % a if a else msg), info(msg, *a, **k)))
    run_pipeline(project, "patchcore")
    client, run = last_run(os.environ["MLFLOW_TRACKING_URI"])
    _check_metrics(run, "patchcore", 0.75)
    assert run.data.tags["weights_source"] == "bundled"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/anomaly_overlays.png", "plots/roc_pr_curves.png", "plots/per_class_metrics.png"} <= arts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {"report/report.html"}
    # the run ends by saying where its results went: metrics, version folders, the MLflow run
    summary = [m for m in said if m.startswith("results of this run")]
    assert summary, "no run summary was logged"
    text = summary[-1]
    assert "mean" in text and "image_auroc" in text and f"{run.data.metrics['image_auroc']:.3f}" in text
    ckpt_version = sorted((project / "data/06_models/patchcore/fit.safetensors").iterdir())[-1].name
    assert f"data/06_models/patchcore/fit.safetensors/{ckpt_version}/" in text
    assert "data/08_reporting/patchcore/report.html/" in text
    assert f"MLflow run {run.info.run_id}" in text and "mlflow ui --backend-store-uri" in text
    assert {a.path for a in client.list_artifacts(run.info.run_id, "metrics")} == {"metrics/metrics_per_class.csv",
                                                                               "metrics/thresholds.json"}
    assert client.list_artifacts(run.info.run_id, "predictions")
    # per-class table in data/08_reporting
    table = pd.read_csv(project / "data/08_reporting/patchcore/metrics_per_class.csv")
    assert list(table["class_name"]) == [*CLASSES, "mean"]
    assert np.isclose(table.set_index("class_name").loc["mean", "image_auroc"], run.data.metrics["image_auroc"])
    # versioned checkpoint + maps; a rerun adds a version and never overwrites
    ckpt = project / "data/06_models/patchcore/fit.safetensors"
    maps = project / "data/07_model_output/patchcore/anomaly_maps.npz"
    first = _versions(ckpt)
    assert len(first) == 1 and len(_versions(maps)) == 1
    run_pipeline(project, "patchcore")
    second = _versions(ckpt)
    assert len(second) == 2 and first[0] in second
    # --load-versions reloads a chosen checkpoint: evaluate the first version's maps again. The rerun
    # made the same maps (same seed), so the newest version's scores are turned round first: reading
    # it instead of the chosen one would give 1 - AUROC, not the first run's AUROC
    oldest = _versions(maps)[0]
    newest = _latest(maps, "anomaly_maps.npz")
    with np.load(newest, allow_pickle=False) as z:
        arrays = dict(z)
    np.savez(newest, **{**arrays, "scores": -arrays["scores"]})
    assert not np.isclose(run.data.metrics["image_auroc"], 0.5)
    run_pipeline(project, "evaluate", namespaces=["patchcore"], load_versions={"patchcore.predictions": oldest})
    _, rerun = last_run(os.environ["MLFLOW_TRACKING_URI"])
    assert rerun.data.tags["pipeline"] == "evaluate"
    assert np.isclose(rerun.data.metrics["image_auroc"], run.data.metrics["image_auroc"])


def test_dinomaly_smoke_run_detects_defects(project):
    run_pipeline(project, "dinomaly")
    _, run = last_run(os.environ["MLFLOW_TRACKING_URI"])
    _check_metrics(run, "dinomaly", 0.6)
    assert any(k.startswith("train_loss/train") for k in run.data.metrics)
    # where the minutes went: every node's wall time, in MLflow and in data/08_reporting
    times = json.loads((project / "data/08_reporting/node_times.json").read_text())
    nodes = times["nodes"]
    assert times["pipeline"] == "dinomaly" and any(n.endswith("train") for n in nodes) and any("predict" in n for n in nodes)
    assert run.data.metrics["node_seconds/total"] >= max(nodes.values()) > 0
    assert all(f"node_seconds/{n}" in run.data.metrics for n in nodes)
    assert run.data.metrics["train_it_per_s/train"] > 0


def test_infer_and_export_use_the_trained_dinomaly(project, tmp_path):
    """Score a folder of new images with the trained smoke Dinomaly: the scores equal the evaluate
    run's for the same images, the stored threshold decides, a corrupt file is listed and skipped,
    the run links to the training run. Then the ONNX export equals torch and is registered."""
    import shutil

    import yaml
    from mlflow.tracking import MlflowClient

    from uad.data.torch_data import AnomalyImageDataset
    from uad.engine import load_state
    from uad.export import onnx_predict
    from uad.inference import load_trained

    if not (project / "data/06_models/dinomaly/train.safetensors").exists():
        run_pipeline(project, "dinomaly")
    preds = dict(np.load(_latest(project / "data/07_model_output/dinomaly/anomaly_maps.npz", "anomaly_maps.npz")))
    thresholds = __import__("json").loads(_latest(project / "data/08_reporting/dinomaly/thresholds.json",
                                                  "thresholds.json").read_text())
    ckpt_path = _latest(project / "data/06_models/dinomaly/train.safetensors", "train.safetensors")
    tensors, meta = load_state(ckpt_path)
    folder = tmp_path / "new"
    picks = [0, 5, len(preds["image_paths"]) - 1]
    for k, i in enumerate(picks):  # nested, renamed copies of test images
        dst = folder / f"line{k % 2}" / f"img{k}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(project / preds["image_paths"][i] if not Path(preds["image_paths"][i]).is_absolute()
                    else preds["image_paths"][i], dst)
    (folder / "line0" / "corrupt.png").write_bytes(b"not an image")

    # the evaluation's centre crop: the same scores as the evaluate run
    run_pipeline(project, "infer", namespaces=["dinomaly"], params={"infer.images": str(folder), "infer.frame": "crop"})
    client, run = last_run(os.environ["MLFLOW_TRACKING_URI"])
    res = pd.read_csv(_latest(project / "data/07_model_output/dinomaly/infer/results.csv", "results.csv"),
                      keep_default_na=False).set_index("relative_path")
    assert res.loc["line0/corrupt.png", "status"] == "unreadable" and res.loc["line0/corrupt.png", "error"]
    for k, i in enumerate(picks):
        row = res.loc[f"line{k % 2}/img{k}.png"]
        # results.csv holds 6 significant digits (%.6g): a relative 5e-6 is the file's own rounding
        assert float(row["score"]) == pytest.approx(float(preds["scores"][i]), rel=1e-5, abs=1e-5)
        assert row["decision"] == ("anomalous" if float(row["score"]) >= thresholds["image"] else "normal")
        assert float(row["image_threshold"]) == pytest.approx(thresholds["image"], rel=1e-5)
    assert run.data.tags["trained_in_run"] == meta["mlflow_run_id"] and run.data.tags["n_unreadable"] == "1"
    overlays = list(_latest(project / "data/08_reporting/dinomaly/infer_overlays", "infer_overlays").glob("*.png"))
    assert len(overlays) == 3 and set(res["overlay"][res["status"] == "ok"]) == {p.name for p in overlays}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "inference")} >= {"inference/results.csv"}

    run_pipeline(project, "export", namespaces=["dinomaly"])
    onnx_file = _latest(project / "data/06_models/dinomaly/model.onnx", "model.onnx")
    spec = __import__("json").loads(_latest(project / "data/06_models/dinomaly/model.json", "model.json").read_text())
    assert spec["thresholds"]["image"] == thresholds["image"] and spec["preprocessing"]["crop"] == 112
    params = yaml.safe_load((project / "conf/smoke/parameters_dinomaly.yml").read_text())["dinomaly"]["method"]
    method = load_trained("dinomaly", params, tensors, meta, str(ckpt_path), None, "export")
    sp = method.input_spec
    df = pd.DataFrame({"image_path": [str(project / preds["image_paths"][i]) for i in picks], "class_name": "x",
                       "label": 0, "mask_path": ""})
    x = torch.stack([AnomalyImageDataset(df, sp["resize"], sp["crop"], sp["mean"], sp["std"])[j]["image"] for j in range(3)])
    maps, scores = onnx_predict(onnx_file, x)
    ref = method.predict(x)
    np.testing.assert_allclose(maps, ref.maps.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores, ref.scores.numpy(), atol=1e-4, rtol=0)
    versions = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_model_versions("name='uad-dinomaly'")
    assert len(versions) >= 1

    # export.formats on the smoke PatchCore (its Lite0 exports in seconds; the ViT's uint8 graph took a
    # minute): the deployable folder (uint8 in, no torch needed) scores as the evaluation did, and its
    # self-test on this CPU passed when it loaded
    from uad.deploy.runtime import DeployedModel

    # (its float model.onnx at a fixed batch: the smoke PatchCore's float graph cannot keep the batch
    # dynamic, and trying first costs one more export)
    run_pipeline(project, "export", namespaces=["patchcore"], params={"export.formats": ["onnx", "onnx_int8"],
                                                                      "export.calibration_images": 8,
                                                                      "export.dynamic_batch": False})
    _, run = last_run(os.environ["MLFLOW_TRACKING_URI"])
    assert run.data.tags["deploy_formats"] == "onnx,onnx_int8"
    deploy = _latest(project / "data/06_models/patchcore/deploy", "deploy")
    assert {p.name for p in deploy.iterdir()} == {"model.onnx", "model_int8.onnx", "deploy.json", "uad_runtime.py",
                                                  "selftest.npz"}
    pc_maps = project / "data/07_model_output/patchcore/anomaly_maps.npz"  # the first version: the test above
    pc = dict(np.load(pc_maps / _versions(pc_maps)[0] / "anomaly_maps.npz"))  # turned the newest one's scores round
    paths = [p if Path(p).is_absolute() else str(project / p) for p in pc["image_paths"][picks]]
    for model in ("onnx", "onnx_int8"):
        deployed = DeployedModel(deploy, model)
        assert deployed.check["checked"] and deployed.check["difference"] <= deployed.check["limit"], deployed.check
        got = [r["score"] for r in deployed.predict(paths)]
        if model == "onnx":  # fp32: the evaluate run's scores
            np.testing.assert_allclose(got, pc["scores"][picks], rtol=1e-4, atol=1e-4)


def test_runs_are_named_and_their_parameters_line_up(project):
    """After the smoke runs above: every run has a readable name of its own, training runs carry
    the data as an MLflow dataset input, ``method.backbone`` is logged without the namespace on
    two methods, nothing namespaced is logged, and an export run's parameters are exactly the
    ones stored in the checkpoint it exported (not the profile's)."""
    from mlflow.tracking import MlflowClient

    from uad.engine import load_state

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("uad-synthetic")  # one experiment per dataset
    assert exp is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([exp.experiment_id], max_results=500)
    trained = {}
    for run in runs:
        tags = run.data.tags
        if tags.get("uad.action") == "" and tags.get("uad.method") in ("patchcore", "dinomaly") and run.info.status == "FINISHED":
            trained.setdefault(tags["uad.method"], run)
    assert set(trained) == {"patchcore", "dinomaly"}
    for name, run in trained.items():
        assert run.info.run_name == f"{name} synthetic multi_class smoke"
        assert run.data.params["method.backbone"], name
        assert not any(k.startswith((f"{name}.", "patchcore.", "dinomaly.")) for k in run.data.params), run.data.params
        assert {"data.setting", "engine.seed", "engine.iterations"} <= set(run.data.params)
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert inputs and inputs[0].dataset.name == "synthetic" and len(inputs[0].dataset.digest) == 16
        assert inputs[0].dataset.source and "sample_index" in inputs[0].dataset.source
    assert trained["patchcore"].data.params["method.backbone"] != trained["dinomaly"].data.params["method.backbone"]
    # a resolved code default is logged though no profile names it
    assert "method.coreset_ratio" in trained["patchcore"].data.params
    exports = [r for r in runs if r.data.tags.get("uad.action") == "export" and r.data.tags.get("uad.method") == "dinomaly"]
    assert exports, "no export run"
    export = exports[0]
    assert export.info.run_name == "dinomaly export synthetic multi_class smoke"
    version = export.data.tags["checkpoint_version"]
    _, meta = load_state(project / "data/06_models/dinomaly/train.safetensors" / version / "train.safetensors")
    stored = meta["run_params"]
    logged = {k: v for k, v in export.data.params.items() if k.split(".")[0] in ("method", "data", "engine", "synthesis")}
    assert logged == stored
    assert stored["engine.iterations"] == trained["dinomaly"].data.params["engine.iterations"]


def test_benchmark_runs_two_methods_as_child_runs_compares_them_and_resumes(project):
    """``kedro run --pipeline=benchmark --env=smoke``: PatchCore and Dinomaly as child runs of one
    parent (nested in MLflow), the comparison (per class, summary, heat map) logged to the parent
    with each child's own figures; run again, it reads both children back instead of rerunning."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    # the parent's own parameters reach its children (and keep the suite short: 8 Dinomaly steps, the
    # crop metrics only: the whole-frame pass is the infer pipeline's, tested below)
    short = {"dinomaly.method.iterations": 8, "evaluation.full_frame": False}
    run_pipeline(project, "benchmark", params=short)
    exp = client.get_experiment_by_name("uad-synthetic")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`uad.method` = 'benchmark'",
                                 order_by=["attributes.start_time DESC"])
    parent = parents[0]
    assert parent.info.run_name == "benchmark synthetic multi_class smoke" and parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["dinomaly synthetic multi_class smoke",
                                                         "patchcore synthetic multi_class smoke"]
    (dino,) = [c for c in children if c.data.tags["uad.method"] == "dinomaly"]
    assert dino.data.params["method.iterations"] == "8", dino.data.params.get("method.iterations")
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "benchmark")}
    assert {"benchmark/comparison.csv", "benchmark/per_class.csv", "benchmark/heatmap.png"} <= arts
    table = pd.read_csv(_latest(project / "data/08_reporting/benchmark/comparison.csv", "comparison.csv")).set_index("method")
    per_class = pd.read_csv(_latest(project / "data/08_reporting/benchmark/per_class.csv", "per_class.csv"))
    for child in children:
        method = child.data.tags["uad.method"]
        assert table.loc[method, "image_auroc"] == pytest.approx(child.data.metrics["image_auroc"], abs=1e-6)
        assert parent.data.metrics[f"{method}/pixel_auroc"] == pytest.approx(child.data.metrics["pixel_auroc"], abs=1e-9)
        assert table.loc[method, "scoring_img_per_s"] > 0
        for cls in CLASSES:
            row = per_class[(per_class["method"] == method) & (per_class["class_name"] == cls) & (per_class["metric"] == "image_auroc")]
            assert row["value"].iloc[0] == pytest.approx(child.data.metrics[f"{cls}/image_auroc"], abs=1e-6)
    png = _latest(project / "data/08_reporting/benchmark/heatmap.png", "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # resume: nothing is retrained or re-evaluated, the same children are read back
    n_before = len(client.search_runs([exp.experiment_id], max_results=1000))
    run_pipeline(project, "benchmark", params=short)
    assert len(client.search_runs([exp.experiment_id], max_results=1000)) == n_before + 1  # the new parent only
    again = pd.read_csv(_latest(project / "data/08_reporting/benchmark/comparison.csv", "comparison.csv")).set_index("method")
    assert again["reused"].astype(str).str.lower().eq("true").all()
    assert set(again["run_id"]) == {c.info.run_id for c in children}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_registered_model_serves_images(project, tmp_path):
    """The registered ``uad-dinomaly`` is a pyfunc with a signature, an input example, a
    description and tags; ``mlflow models serve`` on a free loopback port answers a JSON request
    carrying a PNG (base64) with the score the ``infer`` pipeline gives the same file, the decision
    at the stored threshold, and the map at the image's size."""
    import base64
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    from mlflow.tracking import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    if not client.search_model_versions("name='uad-dinomaly'"):
        if not (project / "data/06_models/dinomaly/train.safetensors").exists():
            run_pipeline(project, "dinomaly")
        run_pipeline(project, "export", namespaces=["dinomaly"])
    version = max(client.search_model_versions("name='uad-dinomaly'"), key=lambda v: int(v.version))
    assert "dinomaly" in version.description and "threshold" in version.description
    assert version.tags["method"] == "dinomaly" and version.tags["image_threshold"]
    assert version.tags["classes"] == ",".join(CLASSES) and "metric.image_auroc" in version.tags
    import mlflow

    info = mlflow.models.get_model_info(f"models:/uad-dinomaly/{version.version}")
    assert [c.name for c in info.signature.inputs.inputs] == ["image"] and info.saved_input_example_info

    folder = tmp_path / "one"
    folder.mkdir()
    src = sorted((project / "data/01_raw/synthetic/pcb/test").glob("*/*.png"))[-1]
    from PIL import Image

    Image.open(src).convert("RGB").resize((150, 100)).save(folder / "part.png")
    # the infer pipeline on the checkpoint version the registered model holds (the benchmark above
    # trained a newer Dinomaly into this project)
    run_pipeline(project, "infer", namespaces=["dinomaly"], params={"infer.images": str(folder)},
                 load_versions={"dinomaly.checkpoint_train": version.tags["checkpoint_version"]})
    res = pd.read_csv(_latest(project / "data/07_model_output/dinomaly/infer/results.csv", "results.csv"),
                      keep_default_na=False)
    want = float(res["score"][0])

    port = _free_port()
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    bindir = os.path.dirname(sys.executable)  # the server starts uvicorn from the environment's bin folder
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "UAD_SERVE_DEVICE": "cpu",
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    log_file = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([exe, "models", "serve", "-m", f"models:/uad-dinomaly/{version.version}", "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env, cwd=project,
                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the model server did not answer /ping within 240 s"
            time.sleep(1)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(
            (folder / "part.png").read_bytes()).decode()]]}, "params": {"return_map": True}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())["predictions"][0]
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log_file.close()
    assert out["status"] == "ok" and out["score"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert out["decision"] == ("anomalous" if want >= out["image_threshold"] else "normal")
    assert (out["height"], out["width"]) == (100, 150) and np.asarray(out["map"]).shape == (100, 150)


def test_infer_scores_every_pixel_at_the_images_own_size(project, tmp_path):
    """The default full frame: maps of exactly each image's size (300 x 200, 2000 x 1500),
    overlays at that size capped at 1024 px, and a defect painted in the outermost 5 % of a
    normal image flagged, where the evaluation's centre crop never sees it (its crop score does
    not move at all). The thresholds applied are the full frame's own, set by the evaluation on
    the test split scored the same way."""
    import json as _json

    from PIL import Image

    # the smoke profile's own PatchCore: the latest model may be an earlier test's variant (the
    # plug-in test's 1 % coreset on stages 1-2), whose thresholds are not this test's subject
    run_pipeline(project, "patchcore")
    thresholds = _json.loads(_latest(project / "data/08_reporting/patchcore/thresholds.json", "thresholds.json").read_text())
    assert thresholds["frame"] == "crop" and thresholds["full"]["frame"] == "full"
    goods = sorted((project / "data/01_raw/synthetic/fabric/test/good").glob("*.png"))
    from uad.inference import Inferencer

    ckpt = _latest(project / "data/06_models/patchcore/fit.safetensors", "fit.safetensors")
    full = Inferencer.from_checkpoint(ckpt, thresholds, device="cpu")
    clean = min(goods, key=lambda p: full.predict(str(p))[0].score)  # the most normal-looking good image
    img = np.asarray(Image.open(clean).convert("RGB")).copy()
    h, w = img.shape[:2]
    s = int(0.05 * w) - 1  # inside the outer 5 %
    border = img.copy()
    border[h // 2:h // 2 + 2 * s, w - s - 1:w - 1] = (255, 0, 255)
    folder = tmp_path / "parts"
    (folder / "line").mkdir(parents=True)
    Image.fromarray(img).save(folder / "clean.png")
    Image.fromarray(border).save(folder / "line" / "border.png")
    Image.fromarray(img).resize((300, 200)).save(folder / "small.png")
    Image.fromarray(img).resize((2000, 1500)).save(folder / "large.jpg", quality=95)

    run_pipeline(project, "infer", namespaces=["patchcore"], params={"infer.images": str(folder)})
    res = pd.read_csv(_latest(project / "data/07_model_output/patchcore/infer/results.csv", "results.csv"),
                      keep_default_na=False).set_index("relative_path")
    assert (res["frame"] == "full").all() and (res["threshold_frame"] == "full").all()
    # the threshold as results.csv writes it (%.6g): exact, whatever digits this CPU's kernels give it
    assert float(res.loc["clean.png", "image_threshold"]) == float(f"{thresholds['full']['image']:.6g}")
    assert res.loc["clean.png", "decision"] == "normal" and res.loc["line/border.png", "decision"] == "anomalous"
    maps = np.load(_latest(project / "data/07_model_output/patchcore/infer/anomaly_maps.npz", "anomaly_maps.npz"))
    by_path = {Path(p).name: maps[k] for p, k in zip(maps["image_paths"], maps["map_keys"])}
    assert by_path["small.png"].shape == (200, 300) and by_path["large.jpg"].shape == (1500, 2000)
    assert by_path["border.png"].shape == (h, w)
    peak = np.unravel_index(np.argmax(by_path["border.png"]), (h, w))
    assert peak[1] >= w - 3 * s, peak  # the map peaks at the painted border defect
    shots = _latest(project / "data/08_reporting/patchcore/infer_overlays", "infer_overlays")
    sizes = {p.name: Image.open(p).size for p in shots.glob("*.png")}
    assert sizes[res.loc["small.png", "overlay"]] == (300, 200) and sizes[res.loc["large.jpg", "overlay"]] == (1024, 768)
    assert sizes[res.loc["line/border.png", "overlay"]] == (w, h)
    # the evaluation's crop never sees the border: the painted image scores exactly as the clean one
    run_pipeline(project, "infer", namespaces=["patchcore"], params={"infer.images": str(folder), "infer.frame": "crop"})
    crop = pd.read_csv(_latest(project / "data/07_model_output/patchcore/infer/results.csv", "results.csv"),
                       keep_default_na=False).set_index("relative_path")
    assert float(crop.loc["line/border.png", "score"]) == float(crop.loc["clean.png", "score"])
    assert crop.loc["line/border.png", "decision"] == "normal"


def test_synthesis_smoke_writes_a_versioned_preview_logged_to_mlflow(project):
    run_pipeline(project, "synthesis")
    client, run = last_run(os.environ["MLFLOW_TRACKING_URI"])
    versions = _versions(project / "data/08_reporting/synthesis/preview.png")
    assert versions
    png = project / "data/08_reporting/synthesis/preview.png" / versions[-1] / "preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "synthesis")] == ["synthesis/preview.png"]
    assert run.data.tags["synthesis_texture_source"].startswith("fallback")


def test_failed_ingest_lists_every_problem_and_writes_nothing(project, tmp_path):
    from PIL import Image

    bad = tmp_path / "bad"
    for sub in ("widget/train/good", "widget/test/good", "widget/test/crack", "widget/ground_truth/crack"):
        (bad / sub).mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(bad / "widget/train/good/000.png")
    Image.new("RGB", (16, 16)).save(bad / "widget/test/good/000.png")
    (bad / "widget/test/crack/000.png").write_bytes(b"not a png")
    Image.new("RGB", (16, 16)).save(bad / "widget/test/crack/001.png")  # no mask
    before = {p: p.stat().st_mtime for p in (project / "data/02_intermediate").glob("*")}
    with pytest.raises(Exception) as err:
        run_pipeline(project, "ingest", params={"data.train": [{"name": "bad", "root": str(bad), "layout": "mvtec"}]})
    text = str(err.value)
    assert "crack/000.png" in text and "crack/001.png" in text
    after = {p: p.stat().st_mtime for p in (project / "data/02_intermediate").glob("*")}
    assert before == after


def test_one_class_setting_trains_one_model_per_class(project):
    run_pipeline(project, "patchcore", params={"data.setting": "one_class"})
    _, run = last_run(os.environ["MLFLOW_TRACKING_URI"])
    assert run.data.tags["setting"] == "one_class"
    for name in SEVEN:
        assert name in run.data.metrics
    from uad.engine import load_state

    ckpt_dir = project / "data/06_models/patchcore/fit.safetensors"
    latest = _versions(ckpt_dir)[-1]
    tensors, _ = load_state(ckpt_dir / latest / "fit.safetensors")
    assert {k.split("::")[0] for k in tensors} == set(CLASSES)


def test_few_shot_setting_records_its_seeded_choice(project):
    run_pipeline(project, "patchcore", params={"data.setting": "few_shot", "data.shots": 2})
    import json

    info = json.loads((project / "data/02_intermediate/split_info.json").read_text())
    train = pd.read_csv(project / "data/02_intermediate/train_index.csv")
    assert train.groupby("class_name").size().to_dict() == {c: 2 for c in CLASSES}
    assert sorted(sum(info["few_shot_choice"].values(), [])) == sorted(train["image_path"])
    _, run = last_run(os.environ["MLFLOW_TRACKING_URI"])
    assert run.data.tags["setting"] == "few_shot" and "image_auroc" in run.data.metrics


def test_super_multi_class_and_semi_supervised_ingest(project):
    params = {
        "data.train": [
            {"name": "synthA", "root": "data/01_raw/synthetic_a", "layout": "mvtec", "synthetic": True, "seed": 1,
             "generator": {"classes": ["fabric", "washer"]}},
            {"name": "synthB", "root": "data/01_raw/synthetic_b", "layout": "mvtec", "synthetic": True, "seed": 2,
             "generator": {"classes": ["wood", "pcb"]}},
        ],
        "data.anomaly_shots": 2,
    }
    run_pipeline(project, "ingest", params=params)
    train = pd.read_csv(project / "data/02_intermediate/train_index.csv", keep_default_na=False)
    test = pd.read_csv(project / "data/02_intermediate/test_index.csv", keep_default_na=False)
    assert set(train["dataset"]) == {"synthA", "synthB"}  # one model over both datasets
    labelled = train[train["label"] == 1]
    assert labelled.groupby("class_name").size().to_dict() == {c: 2 for c in CLASSES}
    assert not set(labelled["image_path"]) & set(test["image_path"]), "held-out anomalies must leave the test set"


def _n_runs(client) -> int:
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids, max_results=1000)) if ids else 0


def test_ddp_run_trains_on_two_ranks_and_writes_once(project):
    """``engine.strategy=ddp`` on CPU: the node starts 2 gloo ranks for training and for the
    sharded predict; one checkpoint version, one predictions version and one MLflow run come out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs_before = _n_runs(client)
    ckpts = project / "data/06_models/dinomaly/train.safetensors"
    preds = project / "data/07_model_output/dinomaly/anomaly_maps.npz"
    before = (len(_versions(ckpts)), len(_versions(preds)))
    run_pipeline(project, "dinomaly", params={"engine.strategy": "ddp", "engine.devices": 2, "engine.resume": False,
                                              "dinomaly.method.iterations": 8, "evaluation.full_frame": False})
    assert (len(_versions(ckpts)), len(_versions(preds))) == (before[0] + 1, before[1] + 1)
    assert _n_runs(client) == runs_before + 1
    _, run = last_run(os.environ["MLFLOW_TRACKING_URI"])
    _check_metrics(run, "dinomaly", 0.0)  # 8 steps: the point is the run's shape, not its quality
    tags = run.data.tags
    assert (tags["ddp_world_size"], tags["ddp_global_batch"], tags["ddp_batch_per_rank"], tags["ddp_backend"]) == \
        ("2", "4", "2", "gloo")
    out = dict(np.load(_latest(preds, "anomaly_maps.npz")))
    assert len(out["scores"]) == 100 and out["maps"].shape[0] == 100  # every test image, once


def test_torchrun_ranks_write_only_from_rank_zero(project):
    """``torchrun --nproc_per_node=2 -m kedro run``: both ranks run the pipeline (the training and
    the predict data-parallel), one checkpoint version and one MLflow run come out, and rank 1's
    catalog writes stay in its memory."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs_before = _n_runs(client)
    ckpts = project / "data/06_models/dinomaly/train.safetensors"
    before = len(_versions(ckpts))
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--nproc_per_node=2", "-m", "kedro", "run", "--pipeline=dinomaly", "--env=smoke",
                          "--params=dinomaly.method.iterations=6,engine.resume=false,evaluation.full_frame=false"],
                         cwd=project, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "250"})
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "rank 1: catalog writes stay in memory" in log and "data-parallel over 2" in log
    assert len(_versions(ckpts)) == before + 1
    assert _n_runs(client) == runs_before + 1
    _, run = last_run(os.environ["MLFLOW_TRACKING_URI"])
    assert run.data.tags["ddp_world_size"] == "2" and "image_auroc" in run.data.metrics


def test_notebooks_execute_on_the_runs_above(project, monkeypatch):
    """Both notebooks run top to bottom, headless, on this module's smoke outputs (a Kedro
    session on the project, the methods' metrics, pictures and MLflow runs; the Inferencer on
    images of the embedded dataset), so they never rot."""
    import nbformat
    from nbclient import NotebookClient

    if not (project / "data/06_models/patchcore/fit.safetensors").exists():
        run_pipeline(project, "patchcore")
    monkeypatch.setenv("UAD_ENV", "smoke")
    monkeypatch.setenv("UAD_PROJECT", str(project))
    root = Path(__file__).resolve().parents[1] / "notebooks"
    for name in ("01_getting_started.ipynb", "02_score_your_images.ipynb"):
        nb = nbformat.read(root / name, as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(project)}}).execute()
        errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, (name, errors)
        pictures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
        assert pictures >= 1, f"{name} drew no picture"
        text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
        assert "Loading data" not in text and "WARNING" not in text, text[:2000]
