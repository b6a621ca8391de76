"""Catalog datasets: safetensors checkpoints, pickle-free NPZ arrays, PNG bytes, MLflow tags.

Every file dataset writes atomically (temp file + rename) and supports Kedro versioning, so a
rerun never overwrites an earlier version and ``kedro run --load-versions`` reloads one. Nothing
here unpickles: NPZ is read with ``allow_pickle=False`` and checkpoints are safetensors.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from copy import deepcopy
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
from kedro_datasets._typing import ImagePreview
from kedro.io.core import AbstractDataset, AbstractVersionedDataset, DatasetError, Version, get_filepath_str, get_protocol_and_path

from uad.osutil import atomic_write_bytes


def _open_mlflow():
    """mlflow when a run is open, else None; never imported here (not imported: no run can be open,
    and a command that opens none must not pay its import)."""
    mlflow = sys.modules.get("mlflow")
    return mlflow if mlflow is not None and mlflow.active_run() is not None else None


class _LocalVersionedDataset(AbstractVersionedDataset):
    """Shared plumbing: a local (or fsspec) file, versioned, written atomically.

    ``mlflow_artifact_path``: when set, every saved version is also logged to the active MLflow
    run under that artifact folder. (kedro-mlflow's ``MlflowArtifactDataset`` gives each wrapped
    versioned dataset its own save timestamp, which Kedro 1.x's catalog rejects, so versioned
    datasets log themselves.)
    """

    def __init__(self, filepath: str, version: Version | None = None, metadata: dict[str, Any] | None = None,
                 mlflow_artifact_path: str | None = None):
        protocol, path = get_protocol_and_path(filepath, version)
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol)
        self.metadata = metadata
        self._mlflow_artifact_path = mlflow_artifact_path
        super().__init__(filepath=PurePosixPath(path), version=version, exists_function=self._fs.exists,
                         glob_function=self._fs.glob)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}

    _saved_version: str | None = None

    def resolve_load_version(self) -> str | None:
        """The version to load: the one asked for (``--load-versions``); else the one this
        dataset object saved in this run (so a node reads its own run's output even when another
        run in the same project saved a newer version meanwhile); else the latest on disk."""
        if self._version and not self._version.load and self._saved_version:
            return self._saved_version
        return super().resolve_load_version()

    def _mark_saved(self) -> None:
        if self._version:
            self._saved_version = self.resolve_save_version()

    def _path(self, which: str) -> str:
        p = self._get_load_path() if which == "load" else self._get_save_path()
        return get_filepath_str(p, self._protocol)

    def _write(self, data: bytes) -> None:
        path = self._path("save")
        if self._protocol == "file":
            atomic_write_bytes(path, data)
        else:
            with self._fs.open(path, "wb") as fh:
                fh.write(data)
        self._invalidate_cache()
        self._mark_saved()
        self._log_artifact(path)

    def _log_artifact(self, path: str) -> None:
        if self._mlflow_artifact_path is None:
            return
        mlflow = _open_mlflow()
        if mlflow is not None:
            mlflow.log_artifact(path, artifact_path=self._mlflow_artifact_path)

    def _read(self) -> bytes:
        path = self._path("load")
        with self._fs.open(path, "rb") as fh:
            return fh.read()

    def _exists(self) -> bool:
        try:
            path = self._path("load")
        except DatasetError:
            return False
        return self._fs.exists(path)

    def _invalidate_cache(self) -> None:
        self._fs.invalidate_cache(str(self._filepath))


class SafetensorsDataset(_LocalVersionedDataset):
    """A ``{"tensors": {name: Tensor}, "meta": dict}`` checkpoint in one safetensors file."""

    def load(self) -> dict[str, Any]:
        from uad.engine.checkpoint import load_state  # torch: imported by the nodes that use checkpoints

        path = self._path("load")
        tensors, meta = load_state(path)
        return {"tensors": tensors, "meta": meta, "path": str(path)}  # the path names it in errors

    def save(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict) or "tensors" not in data:
            raise DatasetError(f"{self._filepath}: expected {{'tensors': ..., 'meta': ...}}, got {type(data).__name__}")
        path = self._path("save")
        if self._protocol != "file":
            raise DatasetError("SafetensorsDataset writes local files only")
        meta = dict(data.get("meta") or {})
        run_id = _active_run_id()
        if run_id and "mlflow_run_id" not in meta:  # inference runs link back to the training run
            meta["mlflow_run_id"] = run_id
        from uad.engine.checkpoint import save_state

        save_state(path, data["tensors"], meta)
        self._invalidate_cache()
        self._mark_saved()
        self._log_artifact(path)


class NpzDataset(_LocalVersionedDataset):
    """A dict of numpy arrays as ``.npz`` (optionally compressed); loaded without pickle."""

    def __init__(self, filepath: str, compress: bool = False, version: Version | None = None,
                 metadata: dict[str, Any] | None = None, mlflow_artifact_path: str | None = None):
        super().__init__(filepath, version, metadata, mlflow_artifact_path)
        self._compress = compress

    def load(self) -> dict[str, np.ndarray]:
        raw = self._read()
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save(self, data: dict[str, Any]) -> None:
        arrays = {}
        for k, v in data.items():
            a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)  # a torch tensor
            if a.dtype == object:
                raise DatasetError(f"{self._filepath}: array {k!r} has dtype object; it would need pickle")
            arrays[k] = a
        buf = io.BytesIO()
        (np.savez_compressed if self._compress else np.savez)(buf, **arrays)
        self._write(buf.getvalue())


class PngDataset(_LocalVersionedDataset):
    """PNG bytes (as produced by :func:`uad.metrics.plots.figure_to_png_bytes`).

    ``kedro viz`` shows the latest version as an image preview in the dataset's side panel
    (``kedro viz run --include-previews``)."""

    def load(self) -> bytes:
        return self._read()

    def preview(self) -> ImagePreview:
        import base64

        return ImagePreview(base64.b64encode(self._read()).decode("ascii"))

    def save(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray)) or not bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
            raise DatasetError(f"{self._filepath}: expected PNG bytes")
        self._write(bytes(data))


class HtmlDataset(_LocalVersionedDataset):
    """A self-contained HTML page (str), versioned; with ``mlflow_artifact_path`` also an artifact
    of the run (MLflow's artifact viewer shows HTML pages)."""

    def load(self) -> str:
        return self._read().decode("utf-8")

    def save(self, data: str) -> None:
        if not isinstance(data, str) or "<html" not in data[:200].lower():
            raise DatasetError(f"{self._filepath}: expected an HTML page (str)")
        self._write(data.encode("utf-8"))


class JSONTagsDataset(_LocalVersionedDataset):
    """A small JSON dict (run information) kept on disk beside the run's other outputs."""

    def load(self) -> dict[str, Any]:
        raw = self._read()
        try:
            data = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError) as exc:
            from uad.errors import UadError

            raise UadError(f"{self._path('load')} is not valid JSON ({exc}); it is damaged: delete that version "
                           "folder (the run that wrote it can write it again) or restore it") from None
        if not isinstance(data, dict):
            from uad.errors import UadError

            raise UadError(f"{self._path('load')} holds {type(data).__name__}, not a JSON object; delete that version "
                           "folder or restore it")
        return data

    def save(self, data: dict[str, Any]) -> None:
        self._write(json.dumps(data, indent=2, sort_keys=True, default=str).encode())


class ThresholdsDataset(JSONTagsDataset):
    """The decision thresholds an evaluation stored (:func:`uad.metrics.thresholds.compute_thresholds`).
    Loads ``{}`` when none was stored yet, so a node can say what to do instead of a bare
    "dataset not found"."""

    def load(self) -> dict[str, Any]:
        try:
            path = self._path("load")  # no version saved yet: Kedro raises here
        except DatasetError:
            return {}
        if not self._fs.exists(path):
            return {}
        return super().load()  # a damaged file is an error naming it, never "no thresholds"


class CsvTableDataset(_LocalVersionedDataset):
    """A pandas table as CSV, written atomically, versioned when the catalog says so (and logged
    to MLflow when asked). ``load_args`` / ``save_args``: pandas' ``read_csv`` / ``to_csv``
    arguments (defaults: blanks stay empty strings; no index column, floats ``%.6g``)."""

    def __init__(self, filepath: str, version: Version | None = None, metadata: dict[str, Any] | None = None,
                 mlflow_artifact_path: str | None = None, load_args: dict[str, Any] | None = None,
                 save_args: dict[str, Any] | None = None):
        super().__init__(filepath, version, metadata, mlflow_artifact_path)
        self._load_args = {"keep_default_na": False} if load_args is None else dict(load_args)
        self._save_args = {"index": False, "float_format": "%.6g"} if save_args is None else dict(save_args)

    def load(self):
        import pandas as pd

        return pd.read_csv(io.BytesIO(self._read()), **self._load_args)

    def save(self, data) -> None:
        self._write(data.to_csv(**self._save_args).encode())


class FileFolderDataset(_LocalVersionedDataset):
    """``{file name: bytes}`` as one folder per version (each file written atomically; names are
    flat, no sub-folders); logged to MLflow as a folder of artifacts. An empty dict (the export's
    deployable formats when ``export.formats`` is empty) writes an empty version folder, so the
    version exists and loads back as ``{}`` (the run summary and later nodes resolve it)."""

    _pattern = "*"

    def _check(self, name: str, blob: bytes) -> None:
        """Refuse a file this folder must not hold (subclasses)."""

    def load(self) -> dict[str, bytes]:
        root = self._path("load")
        out = {}
        for p in sorted(self._fs.glob(f"{root}/{self._pattern}")):
            with self._fs.open(p, "rb") as fh:
                out[PurePosixPath(p).name] = fh.read()
        return out

    def save(self, data: dict[str, bytes]) -> None:
        root = self._path("save")
        if self._protocol != "file":
            raise DatasetError(f"{type(self).__name__} writes local files only")
        import os

        os.makedirs(root, exist_ok=True)
        for name, blob in data.items():
            self._check(name, blob)
            atomic_write_bytes(f"{root}/{PurePosixPath(name).name}", bytes(blob))
        self._invalidate_cache()
        self._mark_saved()
        mlflow = _open_mlflow()
        if data and self._mlflow_artifact_path is not None and mlflow is not None:
            mlflow.log_artifacts(root, artifact_path=self._mlflow_artifact_path)


class PngFolderDataset(FileFolderDataset):
    """``{name: PNG bytes}`` as one folder of PNG files per version (each file written atomically);
    logged to MLflow as a folder of artifacts."""

    _pattern = "*.png"

    def _check(self, name: str, blob: bytes) -> None:
        if not bytes(blob[:8]) == b"\x89PNG\r\n\x1a\n":
            raise DatasetError(f"{self._filepath}: {name!r} is not PNG bytes")


class OnnxModelDataset(_LocalVersionedDataset):
    """An ONNX model file (bytes), versioned. With ``registered_model_name`` and an active MLflow
    run, each saved version is also logged as an MLflow ONNX model and registered in the model
    registry under that name (a new model version per save)."""

    def __init__(self, filepath: str, registered_model_name: str | None = None, version: Version | None = None,
                 metadata: dict[str, Any] | None = None, mlflow_artifact_path: str | None = None):
        super().__init__(filepath, version, metadata, mlflow_artifact_path)
        self._registered_model_name = registered_model_name

    def load(self) -> bytes:
        return self._read()

    def save(self, data: bytes) -> None:
        self._write(bytes(data))
        if not self._registered_model_name:
            return
        import mlflow

        if mlflow.active_run() is None:
            return
        import mlflow.onnx
        import onnx

        mlflow.onnx.log_model(onnx.load_from_string(bytes(data)), name="onnx_model",
                              registered_model_name=self._registered_model_name)


class ServedModelDataset(AbstractDataset):
    """The servable MLflow model (:mod:`uad.framework.mlflow_model`): saving logs it to the active run as a
    pyfunc named ``model`` with the checkpoint, thresholds and frame settings as artifacts, and
    registers it as ``registered_model_name`` (description and tags on the version). Outside an
    MLflow run, nothing is logged (a log line says so); loading returns the last saved payload."""

    def __init__(self, registered_model_name: str | None = None, metadata: dict[str, Any] | None = None):
        self._registered_model_name = registered_model_name
        self.metadata = metadata
        self._last: dict[str, Any] = {}

    def _describe(self) -> dict[str, Any]:
        return {"registered_model_name": self._registered_model_name}

    def load(self) -> dict[str, Any]:
        return deepcopy(self._last)

    def save(self, data: dict[str, Any]) -> None:
        import logging

        import mlflow

        self._last = dict(data)
        if mlflow.active_run() is None:
            logging.getLogger(__name__).info("no active MLflow run: the servable model is not logged")
            return
        from uad.framework.mlflow_model import log_served_model

        info = log_served_model(data["checkpoint_path"], data["thresholds"], data["settings"], self._registered_model_name,
                                data.get("description", ""), data.get("tags"))
        logging.getLogger(__name__).info("servable model logged: %s%s", info.model_uri,
                                         f" (registered {self._registered_model_name} version {info.registered_model_version})"
                                         if info.registered_model_version is not None else "")

    def _exists(self) -> bool:
        return bool(self._last)


def _active_run_id() -> str | None:
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a dependency of the project
        return None
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


#: a run-tags entry ``"param:<key>"`` is logged as the MLflow parameter ``<key>``
from uad.params import PARAM_PREFIX  # noqa: E402


def _log_new_params(mlflow, params: dict[str, str]) -> None:
    """Log ``params`` on the active run; keys it holds already are left alone (MLflow parameters
    cannot change), and a different value for one of them is reported, not raised."""
    if not params:
        return
    run = mlflow.active_run()
    held = mlflow.tracking.MlflowClient().get_run(run.info.run_id).data.params
    clash = {k: (held[k], v) for k, v in params.items() if k in held and held[k] != v}
    for k, (old, new) in sorted(clash.items())[:5]:
        logging.getLogger(__name__).warning("MLflow parameter %s is %r in this run already; %r not logged", k, old, new)
    fresh = {k: v for k, v in params.items() if k not in held}
    items = sorted(fresh.items())
    for s in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
        mlflow.log_params(dict(items[s:s + 100]))


class MlflowTagsDataset(AbstractDataset):
    """Sets its dict as tags on the active MLflow run (kedro-mlflow opens one per ``kedro run``);
    entries named ``param:<key>`` are logged as the run's parameter ``<key>`` instead.

    Outside an MLflow run (``kedro run`` with tracking disabled) saving is a no-op; loading
    returns the tags last saved in this session.
    """

    def __init__(self, metadata: dict[str, Any] | None = None):
        self.metadata = metadata
        self._last: dict[str, str] = {}

    def _describe(self) -> dict[str, Any]:
        return {"kind": "mlflow tags"}

    def load(self) -> dict[str, str]:
        return deepcopy(self._last)

    def save(self, data: dict[str, Any]) -> None:
        mlflow = _open_mlflow()
        tags = {str(k): str(v) for k, v in data.items() if v is not None}
        self._last = tags
        if mlflow is not None:
            params = {k[len(PARAM_PREFIX):]: v for k, v in tags.items() if k.startswith(PARAM_PREFIX)}
            mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith(PARAM_PREFIX)})
            _log_new_params(mlflow, params)

    def _exists(self) -> bool:
        return bool(self._last)
