"""Run an exported anomaly model with onnxruntime or OpenVINO alone: numpy and Pillow, no torch,
no ``uad``.

This file is self-contained on purpose: the export writes a copy of it (``uad_runtime.py``) beside
the model files and ``deploy.json``, so the folder runs on a machine that has never installed this
project::

    python uad_runtime.py deploy.json part_001.png part_002.png            # onnxruntime, fp32
    python uad_runtime.py deploy.json --model openvino_int8 part_001.png   # OpenVINO, INT8

or from Python::

    from uad_runtime import DeployedModel
    model = DeployedModel("deploy.json", model="onnx_int8")
    for r in model.predict(["part_001.png"]):
        print(r["score"], r["decision"])

The exported graph takes **uint8** images ``(batch, 3, crop, crop)`` (RGB, NCHW) and does the rest
inside: ``x / 255``, ``(x - mean) / std``, the method's whole inference path, the map and the image
score. Outside it only the square resize (PIL bilinear, as training) and the centre crop remain
(:func:`prepare`); ``deploy.json`` holds their sizes, the stored thresholds and which file is which
format. Scores then equal :class:`uad.inference.Inferencer`'s with ``frame="crop"`` (the
evaluation's protocol) for the same image.

:func:`make_runner` is also what :class:`uad.inference.Inferencer` uses for its ``onnxruntime`` and
``openvino`` backends, so the library and a bare deployment run the same code.

Loading a model runs the export's self-test on the CPU it runs on (:func:`check_against_reference`:
``selftest.npz``, a few training normals with torch's fp32 outputs): an INT8 kernel that is wrong
on this CPU is refused with one line naming the model and the fix, not found later in the scores.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["BACKENDS", "DeployedModel", "check_against_reference", "make_runner", "prepare", "read_manifest",
           "self_test_difference"]

#: the runtimes a model runs on; ``torch`` is the library's own path (uad.inference)
BACKENDS = ("torch", "onnxruntime", "openvino")
#: OpenVINO inference precisions (``INFERENCE_PRECISION_HINT``): f32 everywhere, bf16 where the CPU has it
OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
#: the model keys whose output must equal torch's fp32 (run in fp32 precision); the others are reduced precision
EXACT_MODELS = ("onnx", "openvino_fp32")
#: the self-check's limits on :func:`self_test_difference`: fp32 models run in fp32 equal torch up to
#: float rounding (measured up to 2.4e-4); reduced precision (INT8, fp16, bf16) by 0.010-0.062 where it
#: is right and by 7.7-24 where a kernel was wrong (docs/benchmarks.md, CPU deployment)
SELF_CHECK_TOLERANCE = {"exact": 1e-3, "reduced": 0.2}


class RuntimeConfigError(ValueError):
    """A bad file or setting of a deployed model (one line naming it and the fix)."""


# ----------------------------------------------------------------------------------- preprocessing
def prepare(image: Any, resize: int, crop: int) -> np.ndarray:
    """One image (a path, encoded bytes, a PIL image or an RGB uint8 (H, W, 3) array) as the
    graph's input: uint8 (3, crop, crop). PIL bilinear resize to (resize, resize), then the centre
    crop at offset ``round((resize - crop) / 2)`` (the training recipe)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            pil = im.convert("RGB")
    elif isinstance(image, (bytes, bytearray)):
        import io

        with Image.open(io.BytesIO(bytes(image))) as im:
            pil = im.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise RuntimeConfigError(f"an array image must be RGB uint8 (H, W, 3), not {image.dtype} {image.shape}")
        pil = Image.fromarray(image)
    else:
        pil = image.convert("RGB")
    if pil.size != (resize, resize):
        pil = pil.resize((resize, resize), Image.BILINEAR)
    arr = np.asarray(pil)
    o = int(round((resize - crop) / 2.0))
    return np.ascontiguousarray(arr[o:o + crop, o:o + crop].transpose(2, 0, 1))


# ----------------------------------------------------------------------------------------- runners
def make_runner(model: str | os.PathLike | bytes, backend: str, threads: int | None = None,
                precision: str = "fp32") -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A function ``uint8 (B, 3, crop, crop) -> (maps float32 (B, crop, crop), scores float32 (B,))``
    (the input cast to the model's own input type: uint8 for the deployable graphs, float32 for
    the normalised-input ``model.onnx`` of :func:`uad.export.export_onnx`).

    ``model``: an ``.onnx`` file or its bytes (onnxruntime, OpenVINO) or an OpenVINO ``.xml``
    (its ``.bin`` beside it). ``precision``: OpenVINO's inference precision, ``fp32`` (exact) or
    ``bf16`` (on CPUs with AVX-512 BF16 / AMX); an INT8 model runs its quantised layers in INT8
    either way. ``threads``: the runtime's intra-op threads (None: its default, all cores)."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        if precision != "fp32":
            raise RuntimeConfigError(f"infer.backend_precision: {precision!r} is not available with onnxruntime "
                                     f"(its CPU kernels are fp32 and INT8); use fp32, or backend openvino for bf16")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        src = bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)
        sess = ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
        dtype = np.uint8 if sess.get_inputs()[0].type == "tensor(uint8)" else np.float32

        def run_ort(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            maps, scores = sess.run(["maps", "scores"], {"images": np.ascontiguousarray(images, dtype=dtype)})
            return maps, scores

        return run_ort
    if backend == "openvino":
        import openvino as ov

        if precision not in OV_PRECISIONS:
            raise RuntimeConfigError(f"infer.backend_precision: {precision!r} is not one of {', '.join(OV_PRECISIONS)}")
        core = ov.Core()
        if isinstance(model, (bytes, bytearray)):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                p = Path(tmp) / "model.onnx"
                p.write_bytes(bytes(model))
                net = core.read_model(str(p))
        else:
            net = core.read_model(str(model))
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = core.compile_model(net, "CPU", config)
        request = compiled.create_infer_request()
        out_maps, out_scores = compiled.output("maps"), compiled.output("scores")
        dtype = compiled.input("images").get_element_type().to_dtype()

        def run_ov(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            res = request.infer({"images": np.ascontiguousarray(images, dtype=dtype)})
            return np.array(res[out_maps], dtype=np.float32), np.array(res[out_scores], dtype=np.float32)

        return run_ov
    raise RuntimeConfigError(f"infer.backend: {backend!r} is not one of {', '.join(b for b in BACKENDS if b != 'torch')} "
                             f"here (torch runs inside the library: uad.inference.Inferencer)")


# ------------------------------------------------------------------------------------- self-check
def self_test_difference(maps: np.ndarray, scores: np.ndarray, ref_maps: np.ndarray, ref_scores: np.ndarray) -> float:
    """How far a backend's output is from the reference: the larger of the scores' largest
    difference (relative to the largest reference score) and the maps' mean absolute difference
    (relative to the reference maps' mean absolute value). The maps' mean, not their maximum:
    the reference images are training normals, whose patches sit in (or next to) PatchCore's
    memory bank, and the square root of a distance near 0 turns rounding into a large local
    difference (measured up to 2.8e-3 of the largest score in fp32 OpenVINO, 0.2 in INT8) that
    says nothing about the kernels."""
    ref_scores, ref_maps = np.asarray(ref_scores, np.float64), np.asarray(ref_maps, np.float64)
    s = float(np.abs(np.asarray(scores, np.float64) - ref_scores).max()) / max(float(np.abs(ref_scores).max()), 1e-12)
    m = float(np.abs(np.asarray(maps, np.float64) - ref_maps).mean()) / max(float(np.abs(ref_maps).mean()), 1e-12)
    return max(s, m)


def check_against_reference(run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], spec: Mapping[str, Any],
                            model: str, backend: str, precision: str = "fp32") -> dict[str, Any]:
    """Run the export's reference images (``selftest.npz``: a few training normals with torch's fp32
    maps and scores, written by the export) through ``run`` on *this* CPU and compare. Kernels
    differ between CPUs (VNNI, AMX, AVX2 only), and a runtime's INT8 kernels have been measured
    wrong on one ISA and right on another, so a deployed model is checked where it runs, when it
    is loaded. The difference (:func:`self_test_difference`) must stay within
    ``SELF_CHECK_TOLERANCE`` (``exact`` for fp32 models run in fp32, ``reduced`` otherwise);
    beyond it: one :class:`RuntimeConfigError` naming the model, the backend and the fix. A
    manifest without a self-test returns ``{"checked": False}``."""
    info = spec.get("selftest") or {}
    if not info.get("file"):
        return {"checked": False}
    path = Path(spec.get("_folder", ".")) / info["file"]
    try:
        with np.load(path, allow_pickle=False) as ref:
            images, ref_maps, ref_scores = ref["images"], ref["maps"], ref["scores"]
    except (OSError, KeyError, ValueError) as e:
        raise RuntimeConfigError(f"{path}: the export's self-test file is unreadable ({e}); export the model again") from None
    maps, scores = run(images)
    diff = self_test_difference(maps, scores, ref_maps, ref_scores)
    kind = "exact" if (model in EXACT_MODELS and precision == "fp32") else "reduced"
    limit = float(dict(SELF_CHECK_TOLERANCE, **(info.get("tolerance") or {}))[kind])
    out = {"checked": True, "images": int(len(images)), "difference": diff, "limit": limit, "kind": kind}
    if not diff <= limit:
        hint = ("use the fp32 model (onnx or openvino_fp32) on this machine, or onnx_int8 on onnxruntime"
                if kind == "reduced" else "export the model again with this version of the runtime")
        raise RuntimeConfigError(f"{path.parent}: model {model} on {backend} ({precision}) disagrees with the export's "
                                 f"torch fp32 reference on this CPU: difference {diff:.3g} (scores and mean map), "
                                 f"allowed {limit:g}; {hint}")
    return out


# ----------------------------------------------------------------------------------------- models
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """``deploy.json`` (a file, or the folder that holds it), checked for what running needs."""
    p = Path(path)
    if p.is_dir():
        p = p / "deploy.json"
    try:
        spec = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeConfigError(f"{p}: not a readable deploy.json ({e}); give the file the export wrote") from None
    missing = [k for k in ("models", "preprocessing", "thresholds") if k not in spec]
    if missing:
        raise RuntimeConfigError(f"{p}: no {', '.join(missing)}: it was not written by the export pipeline")
    spec["_folder"] = str(p.parent)
    return spec


class DeployedModel:
    """An exported model folder (``deploy.json`` + model files) on onnxruntime or OpenVINO.

    ``model``: a key of ``deploy.json``'s ``models`` (``onnx``, ``onnx_int8``, ``openvino_fp32``,
    ``openvino_fp16``, ``openvino_int8``); its backend is OpenVINO for ``openvino_*`` keys and
    onnxruntime otherwise unless ``backend`` says (OpenVINO also runs the ONNX files). Loading runs
    the export's self-test on this CPU (:func:`check_against_reference`) unless ``check=False``."""

    def __init__(self, manifest: str | os.PathLike | Mapping[str, Any], model: str = "onnx", backend: str | None = None,
                 threads: int | None = None, precision: str = "fp32", batch_size: int = 8, check: bool = True):
        self.spec = read_manifest(manifest) if not isinstance(manifest, Mapping) else dict(manifest)
        files = self.spec["models"]
        if model not in files:
            raise RuntimeConfigError(f"model {model!r} is not in this export (it holds {', '.join(files)}); "
                                     f"export it with export.formats or pick one of those")
        self.name = model
        self.backend = backend or ("openvino" if model.startswith("openvino") else "onnxruntime")
        path = Path(self.spec.get("_folder", ".")) / files[model]
        self._run = make_runner(path, self.backend, threads, precision)
        #: the self-check on this CPU (:func:`check_against_reference`); ``check=False`` skips it
        self.check = check_against_reference(self._run, self.spec, model, self.backend, precision) if check else {"checked": False}
        pre = self.spec["preprocessing"]
        self.resize, self.crop = int(pre["resize"]), int(pre["crop"])
        self.thresholds = self.spec["thresholds"]
        self.batch_size = max(1, int(batch_size))

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps and scores of a prepared uint8 batch (B, 3, crop, crop)."""
        return self._run(batch)

    def predict(self, images: Iterable[Any], maps: bool = False) -> list[dict[str, Any]]:
        """Per image: ``score``, ``decision`` at the stored image threshold (``anomalous`` /
        ``normal`` / ``unknown``), and the (crop, crop) map with ``maps=True``."""
        items = list(images)
        out: list[dict[str, Any]] = []
        thr = self.thresholds.get("image")
        for b in range(0, len(items), self.batch_size):
            part = items[b:b + self.batch_size]
            x = np.stack([prepare(im, self.resize, self.crop) for im in part])
            m, s = self._run(x)
            for k, item in enumerate(part):
                score = float(s[k])
                dec = "unknown" if thr is None else ("anomalous" if score >= float(thr) else "normal")
                r = {"source": str(item) if isinstance(item, (str, os.PathLike)) else f"<input {b + k}>",
                     "score": score, "decision": dec}
                if maps:
                    r["map"] = m[k]
                out.append(r)
        return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Score images with an exported anomaly model (onnxruntime / OpenVINO).")
    ap.add_argument("manifest", help="deploy.json (or its folder)")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--model", default="onnx", help="onnx, onnx_int8, openvino_fp32, openvino_fp16, openvino_int8")
    ap.add_argument("--backend", default=None, choices=("onnxruntime", "openvino"))
    ap.add_argument("--precision", default="fp32", choices=tuple(OV_PRECISIONS))
    ap.add_argument("--no-check", action="store_true", help="skip the self-test against the export's reference outputs")
    args = ap.parse_args(argv)
    try:
        model = DeployedModel(args.manifest, args.model, args.backend, precision=args.precision, check=not args.no_check)
        for r in model.predict(args.images):
            print(json.dumps(r))
    except RuntimeConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
