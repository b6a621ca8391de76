"""Deployment of a trained model on CPUs: the exported files (ONNX fp32 / INT8, OpenVINO IR fp32 /
fp16 / INT8, all taking uint8 images) and the standalone runner they travel with.

* :mod:`uad.deploy.export` - :func:`export_bundle`, :func:`export_uint8_onnx`, :func:`quantize_int8`
  (INT8 calibrated on training normals), :func:`to_openvino`;
* :mod:`uad.deploy.runtime` - :func:`make_runner` (onnxruntime / OpenVINO; also the
  :class:`uad.inference.Inferencer` backends) and :class:`DeployedModel`, numpy + Pillow only, so
  an exported folder runs without torch or this package.

Core library (no Kedro, no MLflow); names load on first use.
"""

from uad.exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".export": ("DeployGraph", "FORMATS", "FILES", "export_bundle", "export_uint8_onnx", "quantize_int8", "to_openvino",
                "calibration_images", "check_formats"),
    ".runtime": ("BACKENDS", "DeployedModel", "make_runner", "prepare", "read_manifest"),
})
