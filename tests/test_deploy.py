"""Deployment backends agree with torch, and an exported folder runs without torch or this package.

One PatchCore (bundled ImageNet EfficientNet-Lite0, real weights; 64 px so it fits the suite's
budget) fitted on the embedded dataset's training normals, exported once to every format
(ONNX fp32 / INT8, OpenVINO IR fp32 / fp16 / INT8; INT8 calibrated on the training normals), then:

* fp32 backends (onnxruntime, OpenVINO) equal the torch Inferencer's scores and maps to 1e-4
  relative to the largest score, on all 100 test images (``frame="crop"``, the evaluation's
  protocol);
* every backend's decision at the stored (F1-optimal, torch) threshold equals torch's on every
  test image, or the differing images are listed and their count bounded (INT8, fp16); the image
  whose torch score *is* the threshold (within 1e-4) is listed apart, as on it;
* the exported folder's own ``uad_runtime.py`` scores the images in a subprocess where importing
  torch or uad fails, and gets the Inferencer's scores;
* a perturbed side (the wrong resize) is caught by the same comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import openvino  # noqa: F401
except ImportError:  # a skip only off CI: the test extra installs it, and CI must run these checks
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off"):
        raise
    pytest.skip("openvino is not installed: pip install -e '.[test]' (under CI=true this fails instead)",
                allow_module_level=True)

from uad.errors import ConfigError  # noqa: E402

SIZE = 64
PARAMS = dict(backbone="tf_efficientnet_lite0", weights="bundled", layers=[2, 3], resize=SIZE, crop=SIZE, target_dim=64,
              coreset_ratio=0.1, projection_dim=32)
#: differing decisions allowed against torch at the stored threshold, off the threshold. fp32: none.
#: Reduced precision: measured on this project's CPU machine (AVX-512 VNNI + AMX) 0 (OpenVINO fp16),
#: 1 (onnxruntime INT8), 3 (OpenVINO INT8); INT8 kernels differ by CPU, so the bound is 5 of 100 and
#: the lists are printed
ALLOWED_FLIPS = {"onnxruntime:model.onnx": 0, "openvino:openvino_fp32.xml": 0, "openvino:openvino_fp16.xml": 5,
                 "onnxruntime:model_int8.onnx": 5, "openvino:openvino_int8.xml": 5}
#: what a load says when the export's self-test fails on this CPU (a reduced-precision model only: see
#: uad.deploy.runtime.check_against_reference; OpenVINO INT8 was measured wrong with oneDNN held to AVX2)
REFUSED = "disagrees with the export's torch fp32 reference on this CPU"


@pytest.fixture(scope="module")
def deployed(synthetic_root, tmp_path_factory):
    import torch

    from uad.data.layouts import scan_dataset
    from uad.deploy.export import calibration_images, export_bundle
    from uad.engine.scoring import normalise_uint8
    from uad.inference import Inferencer
    from uad.metrics.thresholds import compute_thresholds
    from uad.methods.registry import build_method

    idx = scan_dataset(synthetic_root, "mvtec")
    train, test = idx[idx.split == "train"], idx[idx.split == "test"].reset_index(drop=True)
    method = build_method("patchcore", PARAMS)
    x = calibration_images(train.image_path, SIZE, SIZE, limit=len(train))
    mean, std = (torch.tensor(method.input_spec[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    method.fit_from_features(method.features(normalise_uint8(torch.from_numpy(x), mean, std)))
    ref = Inferencer(method, {}, frame="crop", device="cpu", precision="fp32", workers=0, progress=False)
    res = ref.predict(list(test.image_path))
    scores = np.array([r.score for r in res])
    thresholds = compute_thresholds(test.label.to_numpy(), scores)
    folder = tmp_path_factory.mktemp("deploy")
    files, manifest = export_bundle(method, ["onnx", "onnx_int8", "openvino_fp32", "openvino_fp16", "openvino_int8"],
                                    calibration=x[::2], thresholds=thresholds)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    maps = np.stack([r.map for r in res])
    return dict(method=method, test=test, scores=scores, maps=maps, thr=float(thresholds["image"]), folder=folder,
                manifest=manifest)


def _decisions(scores, thr):
    return np.asarray(scores) >= thr


def test_every_backend_agrees_with_torch(deployed):
    from uad.inference import Inferencer

    d = deployed
    paths = list(d["test"].image_path)
    scale = float(np.abs(d["scores"]).max())
    want = _decisions(d["scores"], d["thr"])
    report = {}
    for key, limit in ALLOWED_FLIPS.items():
        backend, name = key.split(":")
        try:
            inf = Inferencer(d["method"], {"image": d["thr"]}, frame="crop", device="cpu", precision="fp32", workers=0,
                             progress=False, backend=backend, backend_model=d["folder"] / name)
        except ConfigError as e:  # refused by its self-test on this CPU: allowed for reduced precision only
            assert REFUSED in str(e) and limit > 0, (key, str(e))
            print(f"{key}: refused on this CPU: {e}")
            report[key] = "refused"
            continue
        res = inf.predict(paths)
        scores = np.array([r.score for r in res])
        if not name.endswith(("int8.onnx", "int8.xml", "fp16.xml")):  # fp32: equal to torch
            assert np.abs(scores - d["scores"]).max() / scale < 1e-4, key
            assert np.nanmax(np.abs(np.stack([r.map for r in res]) - d["maps"])) / scale < 1e-4, key
        differ = np.flatnonzero(_decisions(scores, d["thr"]) != want)
        flips = [f"{Path(paths[i]).parent.name}/{Path(paths[i]).name}" for i in differ]
        # the stored F1-optimal threshold is a torch score: that image sits on it, and a 1e-7 change flips it
        on_threshold = [f for i, f in zip(differ, flips) if abs(d["scores"][i] - d["thr"]) <= 1e-4 * scale]
        assert [r.decision for r in res] == ["anomalous" if s >= d["thr"] else "normal" for s in scores]
        report[key] = [f for f in flips if f not in on_threshold]
        print(f"{key}: {len(flips)} of {len(paths)} decisions differ from torch: {flips} "
              f"({len(on_threshold)} on the threshold: {on_threshold})")
        assert len(report[key]) <= limit, f"{key}: {len(flips)} decisions differ from torch (allowed {limit}): {flips}"
    assert report["onnxruntime:model.onnx"] == [] and report["openvino:openvino_fp32.xml"] == []


def test_the_agreement_check_can_fail(deployed):
    """The same comparison on images prepared at a wrong size: scores move far beyond 1e-4."""
    from uad.deploy.runtime import make_runner, prepare

    d = deployed
    paths = list(d["test"].image_path)[:8]
    run = make_runner(d["folder"] / "model.onnx", "onnxruntime")
    _, good = run(np.stack([prepare(p, SIZE, SIZE) for p in paths]))
    _, bad = run(np.stack([prepare(p, SIZE + 8, SIZE) for p in paths]))
    scale = float(np.abs(d["scores"]).max())
    assert np.abs(good - d["scores"][:8]).max() / scale < 1e-4
    assert np.abs(bad - d["scores"][:8]).max() / scale > 1e-2


_BLOCKED_RUN = r"""
import importlib.abc, importlib.util, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "uad", "torchvision", "timm"):
            raise ImportError(f"{name} is blocked in this process")
        return None
sys.meta_path.insert(0, Block())
try:
    import torch  # noqa
    raise SystemExit("the import blocker let torch through")
except ImportError:
    pass
folder, images = sys.argv[1], sys.argv[2:]
spec = importlib.util.spec_from_file_location("uad_runtime", folder + "/uad_runtime.py")
rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)
out = {}
for model in ("onnx", "onnx_int8", "openvino_fp32", "openvino_int8"):
    try:
        out[model] = [r["score"] for r in rt.DeployedModel(folder + "/deploy.json", model).predict(images)]
    except rt.RuntimeConfigError as e:  # its self-test failed on this CPU
        out[model] = str(e)
out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "uad"))
print(json.dumps(out))
"""


def test_exported_folder_runs_without_torch_or_uad(deployed):
    d = deployed
    paths = list(d["test"].image_path)[::5]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # stdin from /dev/null: under pytest-xdist the worker's stdin is its channel to the controller,
    # and a child that inherits it can take the controller's next messages (the worker then dies
    # and the run hangs: measured in the full suite, not when this module runs alone)
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, str(d["folder"]), *paths], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(d["folder"]), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["modules"] == []
    ref = d["scores"][::5]
    scale = float(np.abs(d["scores"]).max())
    for model in ("onnx", "openvino_fp32"):
        assert np.abs(np.array(out[model]) - ref).max() / scale < 1e-4, model
    for model in ("onnx_int8", "openvino_int8"):  # scored alike, or refused by the self-test on this CPU
        assert (REFUSED in out[model]) if isinstance(out[model], str) else np.corrcoef(out[model], ref)[0, 1] > 0.95, model
    manifest = json.loads((d["folder"] / "deploy.json").read_text())
    assert manifest["thresholds"]["image"] == pytest.approx(d["thr"]) and manifest["input"]["dtype"] == "uint8"


def test_bad_backend_settings_are_one_clear_error(deployed, tmp_path):
    from uad.deploy.export import check_formats
    from uad.inference import Inferencer

    m = deployed["method"]
    with pytest.raises(ConfigError, match="infer.backend: 'tensorrt' is not one of torch, onnxruntime, openvino"):
        Inferencer(m, {}, device="cpu", backend="tensorrt")
    with pytest.raises(ConfigError, match="infer.backend_model: .* is not a file"):
        Inferencer(m, {}, device="cpu", backend="onnxruntime", backend_model=tmp_path / "missing.onnx")
    with pytest.raises(ConfigError, match="backend_precision: 'bf16' is not available with onnxruntime"):
        Inferencer(m, {}, device="cpu", backend="onnxruntime", backend_model=deployed["folder"] / "model.onnx",
                   backend_precision="bf16")
    with pytest.raises(ConfigError, match=r"export.formats: \['tflite'\] not among onnx, onnx_int8"):
        check_formats(["onnx", "tflite"])


def test_full_frame_on_a_backend_is_tiled_as_torch_tiles_it(deployed):
    """An exported graph takes the training crop: the full frame is cut into crop-size tiles, the
    same tiles torch scores when the image exceeds ``max_side``; maps and scores agree."""
    from uad.inference import Inferencer

    d = deployed
    paths = list(d["test"].image_path)[:3]
    common = dict(frame="full", short_side=SIZE + 32, device="cpu", precision="fp32", workers=0, progress=False)
    ref = Inferencer(d["method"], {}, max_side=SIZE, **common).predict(paths)
    got = Inferencer(d["method"], {}, backend="openvino", backend_model=d["folder"] / "openvino_fp32.xml",
                     **common).predict(paths)
    scale = float(np.abs(d["scores"]).max())
    for r, g in zip(ref, got):
        assert g.pieces == r.pieces == 4 and g.map.shape == r.map.shape == (128, 128)
        assert abs(g.score - r.score) / scale < 1e-4 and np.abs(g.map - r.map).max() / scale < 1e-4


def test_a_loaded_model_checks_itself_on_this_cpu_and_a_wrong_one_is_refused(deployed, tmp_path):
    """Every load runs the export's self-test (training normals, torch fp32 outputs) on the CPU it
    runs on: fp32 models within 1e-3 (score and mean map difference, relative), reduced precision within 0.2; a model that disagrees
    (here: the reference perturbed, as a wrong INT8 kernel would show it) is refused with one line
    naming the folder, the model and the fix, through the standalone runner and the Inferencer."""
    import shutil

    from uad.deploy.runtime import DeployedModel, RuntimeConfigError
    from uad.inference import Inferencer

    d = deployed
    for model in ("onnx", "openvino_fp32", "onnx_int8", "openvino_int8", "openvino_fp16"):
        try:
            c = DeployedModel(d["folder"], model).check
        except RuntimeConfigError as e:  # a reduced-precision kernel wrong on this CPU: refused, as it must be
            assert REFUSED in str(e) and model not in ("onnx", "openvino_fp32"), (model, str(e))
            print(model, "refused:", e)
            continue
        print(model, c)
        assert c["checked"] and c["images"] == 4 and c["difference"] <= c["limit"]
        assert (c["kind"], c["limit"]) == (("exact", 1e-3) if model in ("onnx", "openvino_fp32") else ("reduced", 0.2))
    bad = tmp_path / "bad"
    shutil.copytree(d["folder"], bad)
    with np.load(bad / "selftest.npz") as z:
        ref = {k: z[k] for k in z.files}
    ref["scores"] = ref["scores"] * 1.5  # a third of the largest score off: beyond the reduced limit (0.2) too
    np.savez(bad / "selftest.npz", **ref)
    for model in ("onnx", "openvino_fp16"):
        with pytest.raises(RuntimeConfigError, match=f"bad: model {model} on .* disagrees with the export's torch fp32 "
                                                     f"reference on this CPU"):
            DeployedModel(bad, model)
        assert not DeployedModel(bad, model, check=False).check["checked"]
    with pytest.raises(ConfigError, match="model openvino_fp32 on openvino .* disagrees"):
        Inferencer(d["method"], {}, device="cpu", backend="openvino", backend_model=bad / "openvino_fp32.xml")
    # the standalone command: one Error line, exit 2
    proc = subprocess.run([sys.executable, str(bad / "uad_runtime.py"), str(bad), "--model", "onnx",
                           str(d["test"].image_path[0])], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("Error: "), proc.stderr
