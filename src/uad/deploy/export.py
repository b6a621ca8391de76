"""A trained method as deployable files: ONNX fp32 and INT8, OpenVINO IR fp32 / fp16 / INT8, each
taking uint8 images, with ``deploy.json`` and the standalone runner (:mod:`uad.deploy.runtime`).

:class:`DeployGraph` is the method's whole inference path behind the image normalisation: uint8
``(B, 3, crop, crop)`` in, ``maps (B, crop, crop)`` and ``scores (B,)`` out, so a runtime needs only
the resize and the centre crop outside (``deploy.json``). For PatchCore the nearest-neighbour
search is written without chunk loops (one ``MatMul`` against the memory bank, as
``torch.cdist``'s own matrix form computes it) so the batch stays dynamic and the bank product is one
node the INT8 recipe can keep in fp32; every other method exports ``method.predict`` as is.

INT8 (:func:`quantize_int8`): onnxruntime's static post-training quantisation in the QDQ format,
calibrated on training normals only (the export node reads them from the training index), weights
per channel (int8) and activations per tensor (int8, symmetric); the map filters and the first
layers stay in float. OpenVINO reads a QDQ file and runs it in INT8 (VNNI / AMX). PatchCore's
memory-bank product (16 GFLOP an image against the backbone's 0.4) stays in float in
``onnx_int8`` (onnxruntime's 8-bit product was slower than its fp32 one) and is quantised in
``openvino_int8`` (3x the images/s of its float product at equal AUROC: docs/benchmarks.md);
a method without a bank gets one INT8 file for both.

Core library: torch at import; onnx, onnxruntime and openvino are imported when used.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from uad.errors import ConfigError
from uad.deploy.runtime import SELF_CHECK_TOLERANCE
from uad.export import InferenceGraph, export_graph

__all__ = ["FORMATS", "DeployGraph", "export_uint8_onnx", "quantize_int8", "to_openvino", "export_bundle",
           "calibration_images", "FILES"]

#: what ``export.formats`` may ask for, and the file each is written to
FILES = {"onnx": "model.onnx", "onnx_int8": "model_int8.onnx", "openvino_fp32": "openvino_fp32.xml",
         "openvino_fp16": "openvino_fp16.xml", "openvino_int8": "openvino_int8.xml"}
FORMATS = tuple(FILES)
#: the ONNX operations quantised by default (the convolutions and matrix products that hold the weights)
INT8_OPS = ("Conv", "MatMul", "Gemm")


class DeployGraph(InferenceGraph):
    """uint8 images in, ``(maps, scores)`` out: the normalisation and ``method.predict``."""

    def __init__(self, method):
        super().__init__(method)
        spec = method.input_spec
        self.register_buffer("mean", torch.tensor(spec["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.bank_matmul = method.name == "patchcore" and not bool(method.cfg.reweight)
        if self.bank_matmul:
            bank = method.memory_bank.detach().float().cpu()
            self.register_buffer("memory_bank_t", bank.t().contiguous())  # D, M: one MatMul's weight
            self.register_buffer("memory_bank_sq", (bank * bank).sum(1)[None])  # 1, M

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.float() / 255.0 - self.mean) / self.std
        if not self.bank_matmul:
            return super().forward(x)
        from uad.methods.patchcore.model import smooth_maps

        feats = self.method.features(x)  # B, D, h, w
        b, d, h, w = feats.shape
        q = feats.permute(0, 2, 3, 1).reshape(-1, d)
        d2 = (q * q).sum(1, keepdim=True) - 2.0 * (q @ self.memory_bank_t) + self.memory_bank_sq
        patch = d2.min(dim=1).values.clamp_min(0.0).sqrt().reshape(b, h * w)
        maps = smooth_maps(patch.reshape(b, h, w), tuple(x.shape[-2:]), float(self.method.cfg.sigma))
        return maps, patch.max(dim=1).values


def export_uint8_onnx(method, batch: int = 2, opset: int = 18, check: bool = True) -> tuple[bytes, dict[str, Any]]:
    """The ONNX model (fp32 weights, uint8 input, dynamic batch where the graph allows it) of
    ``method`` as bytes and a record (opset, batch, bytes, export seconds, with ``check`` the
    largest difference to torch): :func:`uad.export.export_graph` on :class:`DeployGraph`."""
    method.to("cpu", None)
    t0 = time.perf_counter()
    data, info = export_graph(DeployGraph(method).eval(), int(method.input_spec["crop"]), torch.uint8, batch=batch,
                              opset=opset, check=check)
    info.update({"export_s": round(time.perf_counter() - t0, 2), "input": "uint8 (batch, 3, crop, crop)"})
    return data, info


# ---------------------------------------------------------------------------------------- INT8
def keep_fp32_nodes(onnx_bytes: bytes, bank: bool = True) -> list[str]:
    """The nodes the INT8 recipe keeps in float: every map filter (a ``Conv`` with one input and
    one output channel: the Gaussian smoothing of the anomaly map; no feature layer of a CNN or ViT
    has that shape) and, with ``bank``, PatchCore's product with the memory bank."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    keep = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and any("memory_bank" in i for i in n.input):
            if bank:
                keep.append(n.name)
        elif n.op_type == "Conv" and len(n.input) > 1 and shapes.get(n.input[1], (0, 0))[:2] == (1, 1):
            keep.append(n.name)
    return keep


def quantize_int8(onnx_bytes: bytes, calibration: np.ndarray, keep_fp32: Sequence[str] | None = None,
                  keep_first: int = 10, op_types: Sequence[str] = INT8_OPS, per_channel: bool = True, batch: int = 8
                  ) -> tuple[bytes, dict[str, Any]]:
    """Static INT8 (QDQ) of an exported uint8-input model, calibrated on ``calibration`` (uint8
    (N, 3, crop, crop) training normals; min-max ranges), int8 weights per channel and symmetric
    int8 activations (asymmetric uint8 activations ran wrong in OpenVINO 2026.4's QDQ import:
    scores uncorrelated with fp32, measured). ``keep_fp32``: node names left in float (None:
    :func:`keep_fp32_nodes`); ``keep_first``: the first quantisable nodes also stay in float (the
    stem and first blocks: their 8-bit activation grid is coarser than the uint8 image; one node
    quantised alone, the stem and the two after it were the three largest score errors of
    PatchCore's Lite0, and keeping the first five cut the largest score error from 22 % to 4 %,
    measured on the embedded set at 64 px). Ten is the default: on the quick PatchCore, RLR and
    AGPNet (224 px) it gave the smallest score error against fp32 of the recipes tried (mean 0.42-0.49 %
    of the largest score on the test images, both runtimes; five: 0.57-0.71 %; none: 13 %; weights on
    onnxruntime's 7-bit grid doubled the error) and image / pixel AUROC within 0.5 point of fp32 on
    all three (docs/benchmarks.md)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calibration = np.asarray(calibration)
    if calibration.dtype != np.uint8 or calibration.ndim != 4 or len(calibration) == 0:
        raise ConfigError(f"export.calibration_images: the INT8 calibration needs uint8 (N, 3, crop, crop) training "
                          f"images, got {calibration.dtype} {calibration.shape}")
    import onnx

    keep = list(keep_fp32_nodes(onnx_bytes) if keep_fp32 is None else keep_fp32)
    quantisable = [n.name for n in onnx.load_from_string(onnx_bytes).graph.node if n.op_type in op_types and n.name not in keep]
    keep += quantisable[:max(0, int(keep_first))]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([calibration[i:i + batch] for i in range(0, len(calibration), batch)])

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {"images": x}

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                        per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=keep, extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        data = dst.read_bytes()
    info = {"calibration_images": int(len(calibration)), "method": "onnxruntime static QDQ, min-max",
            "weights": "int8 per channel" if per_channel else "int8 per tensor", "activations": "int8 per tensor, symmetric",
            "op_types": list(op_types), "quantised_nodes": len(quantisable) - min(len(quantisable), max(0, int(keep_first))),
            "kept_fp32": keep, "quantize_s": round(time.perf_counter() - t0, 2),
            "bytes": len(data)}
    return data, info


# ------------------------------------------------------------------------------------- OpenVINO
def to_openvino(onnx_bytes: bytes, fp16: bool = False) -> tuple[bytes, bytes]:
    """The OpenVINO IR (``.xml``, ``.bin``) of an ONNX model; ``fp16`` stores the weights in half
    precision (computed in the inference precision: f32, or bf16 on request). A QDQ INT8 model
    becomes OpenVINO's INT8 IR (FakeQuantize), which its CPU plugin runs in 8-bit."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(onnx_bytes)
        model = ov.convert_model(str(src))
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=bool(fp16))
        return xml.read_bytes(), xml.with_suffix(".bin").read_bytes()


# --------------------------------------------------------------------------------------- bundle
def calibration_images(paths: Iterable[str], resize: int, crop: int, limit: int = 64, seed: int = 0) -> np.ndarray:
    """Up to ``limit`` training images (an even random pick, fixed ``seed``), prepared as the
    graph's uint8 input by the runtime's own :func:`uad.deploy.runtime.prepare`."""
    from uad.data.images import load_image
    from uad.deploy.runtime import prepare

    paths = list(paths)
    if not paths:
        raise ConfigError("export: no training images to calibrate INT8 on (the training index is empty); "
                          "run the method's pipeline first or drop the int8 formats from export.formats")
    if len(paths) > limit:
        pick = np.random.default_rng(seed).choice(len(paths), size=limit, replace=False)
        paths = [paths[i] for i in sorted(pick)]
    return np.stack([prepare(load_image(p), resize, crop) for p in paths])


def check_formats(formats: Sequence[str] | str) -> list[str]:
    """``export.formats`` as a list, each one known (one ``ConfigError`` naming the setting)."""
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.replace("+", ",").split(",") if f.strip()]
    bad = [f for f in formats if f not in FILES]
    if bad or not formats:
        raise ConfigError(f"export.formats: {bad or formats!r} not among {', '.join(FORMATS)}; "
                          f"e.g. --params=\"export.formats=[onnx,openvino_fp16,onnx_int8]\"")
    return list(dict.fromkeys(formats))


#: training normals the self-test of a deployed folder runs (``selftest.npz``)
SELFTEST_IMAGES = 4


def export_bundle(method, formats: Sequence[str], calibration: np.ndarray | None = None,
                  thresholds: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                  onnx_model: bytes | None = None, int8_keep_first: int = 10,
                  reference_images: np.ndarray | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files of a deployable folder: each asked-for format, ``deploy.json``, ``uad_runtime.py``
    (the standalone runner) and ``selftest.npz`` (``reference_images``, by default the first
    :data:`SELFTEST_IMAGES` calibration images, with torch's fp32 maps and scores: every load
    checks its backend against them on its own CPU, :func:`uad.deploy.runtime.check_against_reference`).
    Returns ``({file name: bytes}, manifest)``. ``onnx_model``: an already exported uint8 ONNX
    model of ``method`` (exported here otherwise)."""
    formats = check_formats(formats)
    info: dict[str, Any] = {}
    if onnx_model is None:
        onnx_model, info["onnx"] = export_uint8_onnx(method)
    files: dict[str, bytes] = {}
    models: dict[str, str] = {}
    int8: dict[str, bytes] = {}
    if any(f.endswith("int8") for f in formats):
        if calibration is None:
            raise ConfigError("export.formats asks for INT8 but no calibration images were given")
        # PatchCore's memory-bank product: in float for onnxruntime (its 8-bit product ran slower than
        # fp32), in INT8 for OpenVINO (3x the images/s at equal AUROC; docs/benchmarks.md)
        keep_bank = keep_fp32_nodes(onnx_model, bank=True)
        if "onnx_int8" in formats:
            int8["onnx_int8"], info["onnx_int8"] = quantize_int8(onnx_model, calibration, keep_fp32=keep_bank,
                                                               keep_first=int8_keep_first)
        if "openvino_int8" in formats:
            keep = keep_fp32_nodes(onnx_model, bank=False)
            if keep == keep_bank and "onnx_int8" in int8:  # no bank product: one quantisation serves both
                int8["openvino_int8"], info["openvino_int8"] = int8["onnx_int8"], info["onnx_int8"]
            else:
                int8["openvino_int8"], info["openvino_int8"] = quantize_int8(onnx_model, calibration, keep_fp32=keep,
                                                                           keep_first=int8_keep_first)
    for f in formats:
        if f == "onnx":
            files[FILES[f]] = onnx_model
        elif f == "onnx_int8":
            files[FILES[f]] = int8[f]
        else:
            xml, bin_ = to_openvino(int8[f] if f == "openvino_int8" else onnx_model, fp16=(f == "openvino_fp16"))
            files[FILES[f]], files[FILES[f].replace(".xml", ".bin")] = xml, bin_
        models[f] = FILES[f]
    selftest = None
    ref_images = reference_images if reference_images is not None else (
        None if calibration is None else calibration[:SELFTEST_IMAGES])
    if ref_images is not None and len(ref_images):
        files["selftest.npz"], selftest = _selftest(method, np.ascontiguousarray(ref_images, dtype=np.uint8))
    spec = method.input_spec
    manifest = {
        "format_version": 1, "method": method.name, "identity": method.identity(), "models": models,
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW RGB", "shape": ["batch", 3, int(spec["crop"]), int(spec["crop"])]},
        "outputs": {"maps": "float32 (batch, crop, crop)", "scores": "float32 (batch,)"},
        "preprocessing": {"resize": int(spec["resize"]), "crop": int(spec["crop"]),
                          "recipe": "RGB uint8 -> PIL bilinear resize to (resize, resize) -> centre crop (crop, crop) at "
                                    "offset round((resize - crop) / 2) -> uint8 NCHW; normalisation is inside the model",
                          "mean": [float(v) for v in spec["mean"]], "std": [float(v) for v in spec["std"]]},
        "thresholds": {k: v for k, v in dict(thresholds or {}).items() if not isinstance(v, Mapping)},
        "export": info, "runner": "uad_runtime.py (numpy + Pillow + onnxruntime or openvino)",
        "selftest": selftest or {}, **dict(extra or {})}
    files["deploy.json"] = json.dumps(manifest, indent=2, default=str).encode()
    files["uad_runtime.py"] = (Path(__file__).with_name("runtime.py")).read_bytes()
    return files, manifest


def _selftest(method, images: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    """``selftest.npz`` (uint8 images, the library's torch fp32 maps and scores: ``method.predict``
    on the images normalised as the Inferencer does) and its manifest entry."""
    import io

    from uad.engine.scoring import normalise_uint8

    method.to("cpu", None)
    method.eval_mode()
    spec = method.input_spec
    mean, std = (torch.tensor(spec[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        out = method.predict(normalise_uint8(torch.from_numpy(images), mean, std))
        maps, scores = out.maps, out.scores
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, maps=maps.float().numpy(), scores=scores.float().numpy())
    return buf.getvalue(), {"file": "selftest.npz", "images": int(len(images)), "source": "training normals",
                            "reference": "torch fp32", "tolerance": dict(SELF_CHECK_TOLERANCE)}
