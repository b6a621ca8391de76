"""Export a trained method's whole inference path to ONNX, and run it.

:class:`InferenceGraph` wraps :meth:`AnomalyMethod.predict` (encoder, decoder / memory bank,
anomaly map, smoothing and image score: everything the method does after preprocessing) as one
``nn.Module``: normalised images (B, 3, crop, crop) in, ``(maps (B, crop, crop), scores (B,))``
out. :func:`export_onnx` traces it with PyTorch's ``torch.export``-based ONNX exporter, with a
dynamic batch dimension where the method allows one (a fixed batch otherwise, recorded), and
:func:`onnx_predict` runs the file with onnxruntime (the test that the two agree uses it).
:func:`export_graph` is the one exporter: :mod:`uad.deploy.export` gives it its uint8-input graph.
:func:`preprocessing_spec` is the JSON a production runtime needs to prepare images exactly as
training did (square resize with PIL bilinear, centre crop, mean / std).

Core library: torch only at import; ``onnx`` / ``onnxruntime`` are imported when used.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .methods.base import AnomalyMethod

__all__ = ["InferenceGraph", "export_graph", "export_onnx", "onnx_predict", "preprocessing_spec"]

log = logging.getLogger(__name__)


class InferenceGraph(nn.Module):
    """``method.predict`` as a module: the method's modules are registered as submodules so the
    exporter sees their weights as parameters, not as captured constants."""

    def __init__(self, method: AnomalyMethod):
        super().__init__()
        self.method = method
        self.parts = nn.ModuleDict(method.modules())
        method.eval_mode()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.method.predict(images)
        return out.maps, out.scores


def preprocessing_spec(method: AnomalyMethod) -> dict[str, Any]:
    """How to prepare an image for the exported graph (the dataset's exact recipe)."""
    spec = method.input_spec
    return {
        "resize": int(spec["resize"]), "crop": int(spec["crop"]),
        "mean": [float(v) for v in spec["mean"]], "std": [float(v) for v in spec["std"]],
        "recipe": "RGB uint8 -> PIL bilinear resize to (resize, resize) -> centre crop (crop, crop) with offset "
                  "round((resize - crop) / 2) -> x / 255 -> (x - mean) / std -> float32 NCHW",
        "inputs": {"images": "float32 (batch, 3, crop, crop)"},
        "outputs": {"maps": "float32 (batch, crop, crop)", "scores": "float32 (batch,)"},
    }


def export_onnx(method: AnomalyMethod, path: str | Path | None = None, batch: int = 2, opset: int = 18,
                dynamic_batch: bool = True) -> tuple[bytes, dict[str, Any]]:
    """The ONNX model of ``method``'s inference path (on CPU, fp32, normalised float input) as
    bytes, and a record of how it was exported (``dynamic_batch`` honoured or the fixed batch it
    fell back to, opset, the check against torch).

    ``batch``: the example batch traced (and the fixed batch when the method's graph cannot keep
    the batch dimension symbolic)."""
    method.to("cpu", None)
    return export_graph(InferenceGraph(method).eval(), int(method.input_spec["crop"]), torch.float32, path=path,
                        batch=batch, opset=opset, dynamic_batch=dynamic_batch)


def export_graph(graph: nn.Module, crop: int, input_dtype: torch.dtype, path: str | Path | None = None, batch: int = 2,
                 opset: int = 18, dynamic_batch: bool = True, check: bool = True) -> tuple[bytes, dict[str, Any]]:
    """Any ``images (B, 3, crop, crop) -> (maps, scores)`` module as ONNX bytes (the one exporter of
    this project: :func:`export_onnx` gives it the normalised-float graph, :mod:`uad.deploy.export`
    the uint8 one). A dynamic batch where the graph allows it, else the fixed ``batch`` (logged and
    recorded); with ``check``, onnxruntime runs the file once against torch (:func:`_check`)."""
    name = getattr(getattr(graph, "method", None), "name", type(graph).__name__)
    if dynamic_batch:
        try:
            data = _export(graph, crop, input_dtype, batch, opset, dynamic=True, path=path)
            info: dict[str, Any] = {"opset": int(opset), "batch": "dynamic", "bytes": len(data)}
            if check:
                info.update(_check(graph, name, data, crop, input_dtype, batch + 1))
            return data, info
        except Exception as e:  # a graph that specialises on the batch size (at export or at run time)
            log.warning("%s: no dynamic batch (%s); exporting a fixed batch of %d", name,
                        str(e).strip().splitlines()[0][:200], batch)
    data = _export(graph, crop, input_dtype, batch, opset, dynamic=False, path=path)
    info = {"opset": int(opset), "batch": int(batch), "bytes": len(data)}
    if check:
        info.update(_check(graph, name, data, crop, input_dtype, batch))
    return data, info


def _export(graph: nn.Module, crop: int, input_dtype: torch.dtype, batch: int, opset: int, dynamic: bool,
            path: str | Path | None) -> bytes:
    example = (torch.zeros(batch, 3, crop, crop, dtype=input_dtype),)
    kwargs: dict[str, Any] = dict(input_names=["images"], output_names=["maps", "scores"], opset_version=opset,
                                  dynamo=True, external_data=False, verbose=False)
    if dynamic:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # predict() switches the modules to eval mode, a side effect the tracer reports at length
        warnings.filterwarnings("ignore", message=".*side effects.*")
        out = Path(path) if path is not None else Path(tmp) / "model.onnx"
        torch.onnx.export(graph, example, **kwargs).save(str(out))
        return out.read_bytes()


#: the largest difference an export may show against torch, relative to max(1, the largest |score|)
CHECK_TOLERANCE = 1e-4


def _check(graph: nn.Module, name: str, data: bytes, crop: int, input_dtype: torch.dtype, n: int) -> dict[str, Any]:
    """Run the exported model once with onnxruntime against torch on a batch of ``n`` (for a
    dynamic batch, not the traced one: random pixels of the input's type). An export that does
    not run, or differs by more than :data:`CHECK_TOLERANCE` of max(1, the largest |score|), is
    an error here rather than in production; the differences are recorded."""
    g = torch.Generator().manual_seed(0)
    if input_dtype == torch.uint8:
        x = torch.randint(0, 256, (n, 3, crop, crop), dtype=torch.uint8, generator=g)
    else:
        x = torch.randn(n, 3, crop, crop, generator=g).to(input_dtype)
    try:
        maps, scores = onnx_predict(data, x)
    except Exception as e:
        raise RuntimeError(f"the exported ONNX model of {name} does not run on a batch of {n}: {e}") from None
    with torch.no_grad():
        ref_maps, ref_scores = graph(x)
    scale = max(1.0, float(ref_scores.abs().max()))
    diff = {"check_max_abs_diff_maps": float(np.abs(maps - ref_maps.numpy()).max()),
            "check_max_abs_diff_scores": float(np.abs(scores - ref_scores.numpy()).max()), "check_batch": n,
            "check_scale": scale}
    if max(diff["check_max_abs_diff_maps"], diff["check_max_abs_diff_scores"]) > CHECK_TOLERANCE * scale:
        raise RuntimeError(f"the exported ONNX model of {name} differs from torch by "
                           f"{diff['check_max_abs_diff_maps']:.3g} (maps) / {diff['check_max_abs_diff_scores']:.3g} (scores), "
                           f"more than {CHECK_TOLERANCE:g} x {scale:.3g}")
    return diff


def onnx_predict(model: bytes | str | Path, images: np.ndarray | torch.Tensor, threads: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(maps, scores)`` of an exported model (float or uint8 input, as it was exported) with
    onnxruntime on CPU: the deployed runner's own code (:func:`uad.deploy.runtime.make_runner`)."""
    from uad.deploy.runtime import make_runner

    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return make_runner(model, "onnxruntime", threads)(x)
