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
from PIL import Image

from kedro_harness import make_project_copy, run_pipeline, tracked_project
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
    yield from tracked_project(tmp_path_factory)


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
    # 4 training images per class; the quick profile holds out a fifth of them (at least one) as
    # the validation split no method trains on, smoke none
    validation = pd.read_csv(project / "data/02_intermediate/validation_index.csv")
    held = 2 if env == "quick" else 0
    assert len(validation) == held and set(validation["split"]) <= {"validation"} and (validation["label"] == 0).all()
    assert len(train) == 8 - held and set(test["class_name"]) == {"washer", "wood"}
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


@pytest.mark.parametrize("args, expected", [
    (["--pipeline=dinomaly", "--params=engine.batch_size=abc"], "Error: engine.batch_size: 'abc' is not an integer"),
    (["--pipeline=dinomaly", "--params=engine.checkpoint_every=0"], "Error: engine.checkpoint_every: 0 is not >= 1"),
    (["--pipeline=dinomaly", "--params=engine.iterations=-5"], "Error: engine.iterations: -5 is not >= 1"),
    (["--pipeline=dinomaly", "--params=dinomaly.method.lr=fast"], "Error: dinomaly.method.lr: 'fast' is not a number"),
    (["--pipeline=ingest", "--params=data.setting=bogus"], "Error: data.setting: 'bogus' is not one of"),
    (["--pipeline=export", "--namespaces=dinomaly"], "Error: no trained dinomaly model in"),
    (["--pipeline=infer", "--namespaces=rlr", "--params=infer.images={images}"], "Error: no trained rlr model in"),
    # a parameter of the parent reaches the benchmark's child, whose own Error line the parent repeats
    (["--pipeline=benchmark", "--params=benchmark.methods=patchcore,patchcore.method.coreset_ratio=7"],
     "Error: benchmark: no child finished (patchcore multi_class seed 1: invalid patchcore parameters: coreset_ratio"),
], ids=["batch_size", "checkpoint_every", "iterations", "method_lr", "setting", "export_untrained", "infer_untrained",
        "benchmark_child"])
def test_every_bad_parameter_or_missing_model_is_one_error_line(tmp_path_factory, args, expected):
    """Each bad parameter, and infer / export before any training, ends in exactly one ``Error:``
    line naming the setting (or the model and the command to run first), exit 1, no traceback."""
    project = make_project_copy(tmp_path_factory.mktemp("p"))
    images = project / "new_images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "a.png")
    args = [a.replace("{images}", str(images)) for a in args]
    out = subprocess.run([str(BIN / "kedro"), "run", "--env=smoke", *args], cwd=project, env=_cli_env(project),
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), errors or text[-3000:]
    if any(a.startswith("--params=engine.") or ".method." in a for a in args) and "--pipeline=benchmark" not in args:
        # an engine or method setting is checked before the first node (ParamsCheckHook): no ingest, no model built
        assert "Running node" not in text, text[-3000:]


def test_a_dead_tracking_server_is_one_line_within_seconds(tmp_path):
    """MLFLOW_TRACKING_URI pointing at nothing: one Error line naming the URI and the fix, before
    anything runs, within seconds (MLflow alone retries for minutes)."""
    import socket
    import time

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    project = make_project_copy(tmp_path / "p")
    env = {**_cli_env(project), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    t0 = time.monotonic()
    out = subprocess.run([str(BIN / "kedro"), "run", "--env=smoke", "--pipeline=synthesis"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    text = out.stdout + out.stderr
    errors = [ln for ln in text.splitlines() if ln.startswith("Error:")]
    assert out.returncode == 1 and "Traceback" not in text, text[-3000:]
    assert len(errors) == 1 and f"http://127.0.0.1:{port}" in errors[0] and "unset MLFLOW_TRACKING_URI" in errors[0]
    assert "Running node" not in text  # nothing ran
    assert elapsed < 30, elapsed  # start-up included; a refused connection is answered at once


def test_two_runs_at_once_in_one_project_do_not_corrupt_each_other(tmp_path):
    """Two ``kedro run --pipeline=dinomaly --env=smoke`` started together on different classes: the
    second waits for the first (saying so), each run's metrics are those of its own class, both
    MLflow runs finish, and every checkpoint version loads."""
    import time

    from mlflow.tracking import MlflowClient

    from uad.engine.checkpoint import load_state

    project = make_project_copy(tmp_path / "p")
    env = _cli_env(project)
    base = [str(BIN / "kedro"), "run", "--env=smoke", "--pipeline=dinomaly"]
    logs = {c: open(tmp_path / f"{c}.log", "w") for c in ("fabric", "pcb")}
    first = subprocess.Popen(base + ["--params=data.classes=fabric,engine.iterations=6,evaluation.full_frame=false"], cwd=project, env=env,
                             stdout=logs["fabric"], stderr=subprocess.STDOUT)
    time.sleep(3)
    second = subprocess.Popen(base + ["--params=data.classes=pcb,engine.iterations=6,evaluation.full_frame=false"], cwd=project, env=env,
                              stdout=logs["pcb"], stderr=subprocess.STDOUT)
    assert first.wait(timeout=600) == 0 and second.wait(timeout=600) == 0, (tmp_path / "pcb.log").read_text()[-3000:]
    for fh in logs.values():
        fh.close()
    assert "waiting for the run that holds this project" in (tmp_path / "pcb.log").read_text()
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("uad-synthetic")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`uad.method` = 'dinomaly'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    seen = set()
    for run in runs:
        classes = {k.split("/")[0] for k in run.data.metrics
                   if k.endswith("/image_auroc") and k.count("/") == 1 and not k.startswith("full_frame/")}
        assert len(classes) == 1, classes  # one class each, its own
        seen |= classes
    assert seen == {"fabric", "pcb"}
    versions = sorted((project / "data/06_models/dinomaly/train.safetensors").iterdir())
    assert len(versions) == 2
    for v in versions:
        load_state(v / "train.safetensors")


def test_an_untracked_run_after_a_tracked_one_leaves_no_mlflow_run_open(tmp_path, monkeypatch):
    """Several sessions in one process (notebooks, tests): ``ingest`` (not tracked) after a tracked
    run must not re-open the earlier run and leave it active for whatever comes next."""
    import mlflow

    project = make_project_copy(tmp_path / "p")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    run_pipeline(project, "synthesis")
    run_pipeline(project, "ingest")
    assert mlflow.active_run() is None


def test_infer_thresholds_that_are_not_numbers_are_refused():
    from uad.errors import ConfigError
    from uad.framework.pipelines.method.serving import infer_images

    with pytest.raises(ConfigError, match=r"infer.image_threshold: 'abc' is not a number"):
        infer_images("patchcore", pd.DataFrame(), {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "layers": [2, 3],
                                                   "resize": 64, "crop": 64},
                     {"device": "cpu"}, {}, _tiny_patchcore_checkpoint(), {"image": 1.0}, {"image_threshold": "abc"})


def _tiny_patchcore_checkpoint() -> dict:
    import torch

    from uad.methods.registry import build_method

    m = build_method("patchcore", {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "layers": [2, 3],
                                   "resize": 64, "crop": 64})
    m.fit_from_features(torch.randn(2, m.cfg.target_dim, 2, 2))
    return {"tensors": m.state_dict(), "meta": {**m.identity(), "stage": "fit"}, "path": "x/fit.safetensors"}


def test_a_wrong_checkpoint_gives_one_short_error_naming_file_and_makers():
    """A PatchCore checkpoint where RLR's is expected, or ViT-S weights under ViT-B settings: one
    line naming the file, what made it and what was expected (not hundreds of missing keys)."""
    from uad.errors import CheckpointMismatchError
    from uad.methods.registry import build_method
    from uad.framework.pipelines.method.nodes import predict

    rlr_params = dict(backbone="tf_efficientnet_lite0", weights="bundled", resize=64, crop=64, windows=[5, 3, 3])
    patchcore_ckpt = {"tensors": {"extra.memory_bank": __import__("torch").zeros(4, 8)},
                      "meta": {"method": "patchcore", "backbone": "wide_resnet50_2", "crop": "224",
                               "params_sha": "0123456789ab", "stage": "fit"},
                      "path": "data/06_models/patchcore/fit.safetensors/2026-01-01T00.00.00.000Z/fit.safetensors"}
    test_index = pd.DataFrame({"dataset": ["d"], "class_name": ["wood"], "split": ["test"], "label": [0],
                               "defect_type": ["good"], "image_path": ["x.png"], "mask_path": [""]})
    with pytest.raises(CheckpointMismatchError) as err:
        predict("rlr", test_index, {}, rlr_params, {"device": "cpu"}, {}, patchcore_ckpt)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    assert patchcore_ckpt["path"] in msg and "patchcore (backbone wide_resnet50_2, crop 224" in msg
    assert "expects rlr (backbone tf_efficientnet_lite0, crop 64" in msg

    vits = build_method("dinomaly", dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True,
                                         resize=64, crop=56))
    made_by_vitb = {**vits.identity(), "backbone": "dinov2_vitb14_reg"}
    with pytest.raises(CheckpointMismatchError, match="made by dinomaly \\(backbone dinov2_vitb14_reg"):
        vits.check_checkpoint(made_by_vitb, "ckpt.safetensors")
    vits.check_checkpoint(vits.identity(), "ckpt.safetensors")  # its own identity loads


def test_tags_are_true_and_killed_runs_end_as_killed(project, monkeypatch):
    """A default run (no --env) is tagged kedro_env=quick; a run left RUNNING by a process that was
    killed (its pid is gone) is ended as KILLED when the next run starts; a run that fails with an
    error ends as FAILED."""
    from mlflow.tracking import MlflowClient

    from kedro_harness import last_run

    monkeypatch.delenv("UAD_DATA_ROOT", raising=False)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri)
    name = "uad-synthetic"  # the embedded dataset's experiment (one experiment per dataset)
    exp = client.get_experiment_by_name(name) or client.get_experiment(client.create_experiment(name))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    orphan = client.create_run(exp.experiment_id, tags={"uad.host": socket.gethostname(), "uad.pid": str(dead.pid)})
    assert client.get_run(orphan.info.run_id).info.status == "RUNNING"

    run_pipeline(project, "synthesis", env=None)  # ingest alone is not tracked
    _, run = last_run(uri)
    assert run.data.tags["kedro_env"] == "quick" and run.data.tags["pipeline"] == "synthesis"
    assert run.info.status == "FINISHED"
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"

    with pytest.raises(Exception, match="is not a folder"):
        run_pipeline(project, "synthesis", env="smoke", params={"data.root": "/no/such/folder"})
    _, failed = last_run(uri)
    assert failed.info.status == "FAILED" and failed.data.tags["kedro_env"] == "smoke"


def test_ingest_decodes_every_image_and_warns_about_empty_class_folders(my_data, tmp_path, caplog):
    """A half-written PNG fails ingest (not training, hours later), listed with every other
    problem; an empty class folder is reported, not dropped without a word."""
    from uad.data.index import DatasetValidationError
    from uad.framework.pipelines.ingest.nodes import build_sample_index

    root = tmp_path / "parts"
    shutil.copytree(my_data, root)
    (root / "empty_class" / "train" / "good").mkdir(parents=True)
    with caplog.at_level("WARNING"):
        index = build_sample_index({"root": str(root), "layout": "mvtec"})
    assert set(index["class_name"]) == {"washer", "wood"}
    assert any("empty_class" in r.getMessage() and "no images" in r.getMessage() for r in caplog.records)

    victim = sorted((root / "wood" / "train" / "good").glob("*.png"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated: the header still reads fine
    other = sorted((root / "washer" / "test").rglob("*.png"))[0]
    other.write_bytes(b"not an image")
    with pytest.raises(DatasetValidationError) as err:
        build_sample_index({"root": str(root), "layout": "mvtec"})
    problems = "\n".join(err.value.problems)
    assert str(victim) in problems and str(other) in problems


def test_missing_dtd_fails_before_the_first_stage_trains(tmp_path):
    """INP-Former++ with texture_source dtd and no DTD folder: the reconstruction stage (hours at
    paper scale) must not start."""
    from uad.errors import UadError
    from uad.framework.pipelines.method.nodes import train_stage

    root = tmp_path / "d"
    ensure_synthetic_dataset(root, seed=0, classes=["wood"], n_train=2, n_test_good=1, n_test_bad_per_defect=1)
    from uad.framework.pipelines.ingest.nodes import build_sample_index

    index = build_sample_index({"root": str(root), "layout": "mvtec"})
    train = index[index["split"] == "train"]
    params = dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True, resize=64, crop=56,
                  iterations=2, residual_iterations=1)
    with pytest.raises(UadError, match="dtd"):
        train_stage("inpformer", "reconstruction", train, {}, params, {"device": "cpu", "progress": False}, {},
                    synthesis={"texture_source": "dtd", "dtd_root": str(tmp_path / "no_dtd")})
    assert not (tmp_path / "no_dtd").exists()


def test_training_key_follows_contents_not_paths(tmp_path, monkeypatch, caplog):
    """A moved project (and dataset) reuses its finished training; the same file names with new
    contents retrain, the log says which happened and why; the earlier resume folder is pruned."""
    import numpy as np
    from PIL import Image

    from uad.framework.pipelines.ingest.nodes import build_sample_index
    from uad.framework.pipelines.method.nodes import train_stage

    params = dict(backbone="tf_efficientnet_lite0", weights="bundled", resize=64, crop=64, windows=[5, 3, 3],
                  iterations=2, batch_size=2)
    engine = {"device": "cpu", "progress": False, "checkpoint_dir": "data/06_models/checkpoints",
              "checkpoint_every": 1}

    def train(project: Path):
        monkeypatch.chdir(project)
        index = build_sample_index({"root": str(project / "data/01_raw/parts"), "layout": "mvtec"})
        caplog.clear()
        with caplog.at_level("INFO", logger="uad.engine"):
            ckpt, history, _ = train_stage("rlr", "train", index[index["split"] == "train"], {}, params, engine, {})
        return ckpt, history, " ".join(r.getMessage() for r in caplog.records)

    first = tmp_path / "first"
    ensure_synthetic_dataset(first / "data/01_raw/parts", seed=1, classes=["wood"], n_train=4, n_test_good=1,
                             n_test_bad_per_defect=1)
    ckpt_a, hist_a, log_a = train(first)
    assert "training from scratch: no earlier training" in log_a and hist_a

    moved = tmp_path / "moved"
    shutil.move(str(first), str(moved))
    ckpt_b, hist_b, log_b = train(moved)
    assert "reusing the finished training" in log_b and not hist_b  # no step ran
    for k in ckpt_a["tensors"]:
        assert (ckpt_a["tensors"][k] == ckpt_b["tensors"][k]).all()

    victim = sorted((moved / "data/01_raw/parts/wood/train/good").glob("*.png"))[0]
    Image.fromarray(np.full((128, 128, 3), 7, np.uint8)).save(victim)  # same name, new contents
    _, hist_c, log_c = train(moved)
    assert hist_c and "training from scratch: the training data changed" in log_c
    folders = list((moved / "data/06_models/checkpoints").glob("rlr-train-*"))
    assert len(folders) == 1 and (folders[0] / "last.safetensors").is_file()  # the earlier one is pruned
    assert "removed the earlier resume checkpoint" in log_c


def test_a_from_nodes_run_after_an_in_memory_output_is_one_error_line_naming_where_to_start():
    """``--from-nodes=costfilter_patchcore.synthesis`` skips ``compose_params`` (kept in memory):
    Kedro's ValueError becomes one line that says which node to start from (that start was tried:
    it runs)."""
    from uad.framework.cli import _user_error

    kedro_error = ValueError("Pipeline input(s) {'costfilter_patchcore.method_params'} not found in the "
                             "DataCatalogWithCatalogCommandsMixin")
    err = _user_error(kedro_error)
    assert err is not None and "--from-nodes=costfilter_patchcore.compose_params" in str(err)
    assert _user_error(ValueError("some other bug")) is None  # a real bug keeps its traceback


def test_a_missing_ingest_table_is_one_line_naming_the_run_that_writes_it(tmp_path):
    """``kedro run --pipeline=submission --namespaces=patchcore`` before any ingest: Kedro's
    DatasetError over a missing CSV (as it raises it) becomes one line naming the file and ingest."""
    from kedro.io import DataCatalog

    from uad.framework.cli import _user_error
    from uad.framework.io.datasets import CsvTableDataset

    path = tmp_path / "data/02_intermediate/unlabelled_index.csv"
    catalog = DataCatalog({"unlabelled_index": CsvTableDataset(filepath=str(path))})
    with pytest.raises(Exception) as raised:
        catalog.load("unlabelled_index")
    err = _user_error(raised.value)
    assert err is not None, raised.value
    assert str(err).startswith(f"unlabelled_index: {path} does not exist yet") and "--pipeline=ingest" in str(err)
