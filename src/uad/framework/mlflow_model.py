"""The servable MLflow model: :class:`uad.inference.Inferencer` as an MLflow pyfunc.

The ``export`` pipeline logs it (:func:`log_served_model`) with three artifacts, the trained
checkpoint (``.safetensors``), the stored ``thresholds.json`` and ``inference.json`` (the frame
settings), and registers it as ``uad-<method>``. Loading it rebuilds the method from the
checkpoint, so preprocessing (resize, tiles, normalisation) happens inside the model, from the
checkpoint's own spec.

Input: a DataFrame with one column ``image`` of encoded image bytes (PNG, JPEG, BMP, TIFF ...;
in a JSON request to ``mlflow models serve``, base64 strings: the signature declares the column
binary, and MLflow decodes it). From Python, ``inferencer_from_mlflow(uri)`` reads the same
artifacts and takes arrays, PIL images and paths as well.

Output: one row per image: ``score``, ``decision`` (``anomalous`` / ``normal`` / ``error``),
``image_threshold``, ``anomalous_area``, ``height``, ``width``, ``status``, ``error``; with the
parameter ``return_map=true``, ``map``: the anomaly map at the image's own size (nested lists).

This module is the MLflow-facing layer (it imports mlflow); the core library does not import it.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
import pandas as pd

__all__ = ["UadModel", "log_served_model", "example_image_bytes", "model_signature"]


class UadModel(mlflow.pyfunc.PythonModel):
    """Images in, image scores, decisions at the stored threshold and (optionally) maps out."""

    def load_context(self, context) -> None:
        from uad.inference import Inferencer

        arts = context.artifacts
        settings = json.loads(Path(arts["inference"]).read_text()) if "inference" in arts else {}
        device = os.environ.get("UAD_SERVE_DEVICE", "auto")
        self.inferencer = Inferencer.from_checkpoint(arts["checkpoint"], arts.get("thresholds"), device=device,
                                                     progress=False, **settings)

    def predict(self, context, model_input: pd.DataFrame, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        want_map = bool((params or {}).get("return_map", False))
        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise ValueError(f"the input needs a column 'image' of encoded image bytes; got columns {list(model_input.columns)}")
            images = [bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else v for v in model_input["image"]]
        else:  # called from Python without the signature: arrays, PIL images or bytes
            images = list(model_input) if not isinstance(model_input, np.ndarray) or model_input.ndim == 4 else [model_input]
        results = self.inferencer.predict(images, maps=want_map)
        thr = self.inferencer.thresholds["image"]
        rows = []
        for r in results:
            row = {"score": r.score, "decision": r.decision, "image_threshold": thr if thr is not None else float("nan"),
                   "anomalous_area": r.anomalous_area if r.anomalous_area is not None else float("nan"),
                   "height": int(r.size[0]), "width": int(r.size[1]), "status": r.status, "error": r.error}
            if want_map:
                row["map"] = r.map.tolist() if r.map is not None else None
            rows.append(row)
        return pd.DataFrame(rows)


def example_image_bytes(size: tuple[int, int] = (64, 96)) -> bytes:
    """A small PNG (a grey gradient) for the logged input example."""
    from PIL import Image

    h, w = size
    ramp = np.linspace(60, 200, w, dtype=np.float32)[None, :].repeat(h, 0)
    img = np.stack([ramp, ramp, ramp], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def model_signature():
    """Input: a binary column ``image``; output: the result columns; parameter ``return_map``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("binary", "image")])
    outputs = Schema([ColSpec("double", "score"), ColSpec("string", "decision"), ColSpec("double", "image_threshold"),
                      ColSpec("double", "anomalous_area"), ColSpec("long", "height"), ColSpec("long", "width"),
                      ColSpec("string", "status"), ColSpec("string", "error")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("return_map", "boolean", False)]))


def log_served_model(checkpoint_path: str | os.PathLike, thresholds: Mapping[str, Any], settings: Mapping[str, Any],
                     registered_model_name: str | None, description: str = "", tags: Mapping[str, str] | None = None,
                     name: str = "model"):
    """Log the pyfunc to the active run (and register it when ``registered_model_name`` is set),
    with signature, input example, description and tags on the registered version. Returns the
    ``ModelInfo``."""
    from mlflow.tracking import MlflowClient

    import uad

    with tempfile.TemporaryDirectory() as tmp:
        thr = Path(tmp) / "thresholds.json"
        thr.write_text(json.dumps(dict(thresholds), indent=2, default=float))
        inf = Path(tmp) / "inference.json"
        inf.write_text(json.dumps(dict(settings), indent=2))
        info = mlflow.pyfunc.log_model(
            name=name, python_model=UadModel(),
            artifacts={"checkpoint": str(checkpoint_path), "thresholds": str(thr), "inference": str(inf)},
            signature=model_signature(), input_example=pd.DataFrame({"image": [example_image_bytes()]}),
            pip_requirements=[f"uad=={uad.__version__}", "torch", "timm", "safetensors", "pillow", "pandas"],
            registered_model_name=registered_model_name, tags=dict(tags or {}))
    if registered_model_name and info.registered_model_version is not None:
        client = MlflowClient()
        version = str(info.registered_model_version)
        if description:
            client.update_model_version(registered_model_name, version, description=description)
            client.update_registered_model(registered_model_name, description=description.split("\n\n")[0])
        for k, v in (tags or {}).items():
            client.set_model_version_tag(registered_model_name, version, k, str(v))
    return info


def inferencer_from_mlflow(model_uri: str, **options: Any):
    """An :class:`uad.inference.Inferencer` from a model logged by the ``export`` pipeline
    (``models:/uad-<method>/<version>`` or ``runs:/<id>/model``): its files downloaded, then
    :meth:`~uad.inference.Inferencer.from_model_folder`."""
    import mlflow

    from uad.inference import Inferencer

    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    return Inferencer.from_model_folder(local, **options)
